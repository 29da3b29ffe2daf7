"""Contention mode (``--contention``): each CPU case is timed a second time while another process
keeps one core busy, the way a data loader, a second job or a noisy neighbour does on a shared
machine. A recurrence that forks and joins threads every step, or spin-waits for a thread whose
core was taken, slows down by far more than the share of the machine it lost; the slowdown of
each side (time under contention / time alone) shows it.

The spinner is a separate Python process, pinned (where the OS allows) to the last core this
process may use, running a busy loop until the case is done; it is always stopped, also when the
case fails, and it stops by itself when the process that started it is gone (killed, or crashed
in native code, where no cleanup runs): a spinner left behind would make every later measurement
on the machine a measurement under contention.
"""
import contextlib
import os
import subprocess
import sys

# argv: the core to spin on, the pid of the process that started it (polled every 2^20 turns of
# the loop, a few milliseconds).
_SPIN = """import os, sys
cpu, parent = int(sys.argv[1]), int(sys.argv[2])
try:
    os.sched_setaffinity(0, {cpu})
except (AttributeError, OSError):
    pass
turns = 0
while True:
    turns += 1
    if turns & 0xFFFFF == 0 and os.getppid() != parent:
        break
"""


def spinner_core():
    """The core the spinner takes: the highest one this process may run on."""
    try:
        return max(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (not Linux)
        return (os.cpu_count() or 1) - 1


@contextlib.contextmanager
def busy_core():
    """A process spinning on one core for the duration of the block; yields its Popen."""
    process = subprocess.Popen([sys.executable, "-c", _SPIN, str(spinner_core()), str(os.getpid())],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def slowdowns(alone, contended):
    """Per side: its median under contention and the slowdown factor over its median alone."""
    return {
        name: {"median_ms": contended[name].median_ms, "slowdown": contended[name].median_ms / alone[name].median_ms}
        for name in contended if name in alone and alone[name].median_ms > 0
    }
