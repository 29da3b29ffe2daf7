"""Shared helpers of the rnnfused examples: device choice, twin models (torch.nn and rnnfused with the
same initial weights), a training loop that times each epoch, and the side-by-side report.

Every example builds its model from a "layer library", a namespace with ``LSTM``, ``GRU`` and
``RNN`` attributes: ``torch.nn`` for the reference model and ``rnnfused`` for the fused one. The
reference is built first and its ``state_dict`` is loaded into the fused model, so both start from
the same weights; both are then trained with the same data order and the same random stream.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn as nn

import rnnfused

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


def base_parser(description, epochs, batch_size, lr):
    """An argparse parser with the options every example shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"minibatch size (default {batch_size})")
    parser.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the initial weights")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when available and rnnfused has its CUDA kernels)"
    )
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test): fewer epochs, less data")
    return parser


def pick_device(name=None):
    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available() and rnnfused.cuda_built():
        return torch.device("cuda")
    return torch.device("cpu")


def describe(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, rnnfused {rnnfused.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__}, rnnfused {rnnfused.__version__})"


def twin_models(build, device, seed):
    """``build(lib)`` twice: on torch.nn, then on rnnfused with the torch.nn model's weights."""
    torch.manual_seed(seed)
    reference = build(nn).to(device)
    fused = build(rnnfused).to(device)
    fused.load_state_dict(reference.state_dict(), strict=True)
    return {"torch.nn": reference, "rnnfused": fused}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(tensors, batch_size, generator=None):
    """Minibatches of a tuple of equally long tensors; shuffled when a generator is given."""
    count = tensors[0].shape[0]
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch_size):
        index = order[start : start + batch_size]
        yield tuple(t[index.to(t.device)] for t in tensors)


class _RandomState:
    """The global random streams (CPU and CUDA) of one model's training run."""

    def __init__(self, seed, device):
        self.device = device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.state = self._get()

    def _get(self):
        return (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def __enter__(self):
        self.saved = self._get()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        self.state = self._get()
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


def train_side_by_side(models, train_tensors, loss_of_batch, epochs, batch_size, lr, seed, device, clip=None,
                       cosine_lr=False, log_every=0):
    """Adam training of each model; returns {name: [wall time of each epoch in seconds]}.

    Each model gets its own optimizer, its own shuffling generator and its own random stream
    (dropout), all seeded with ``seed``: the runs are exactly those of training the models one
    after the other. The epochs are interleaved (epoch 1 of every model, then epoch 2, ...) so
    that a busy machine slows every model alike and the time ratio stays fair. ``cosine_lr``
    anneals the learning rate to zero over the epochs; ``clip`` clips the gradient norm.
    """
    runs = {
        name: dict(
            optimizer=torch.optim.Adam(model.parameters(), lr=lr),
            generator=torch.Generator().manual_seed(seed),
            random=_RandomState(seed, device),
            times=[],
        )
        for name, model in models.items()
    }
    for run in runs.values():
        run["schedule"] = torch.optim.lr_scheduler.CosineAnnealingLR(run["optimizer"], epochs) if cosine_lr else None
    for epoch in range(epochs):
        for name, model in models.items():
            run = runs[name]
            with run["random"]:
                model.train()
                synchronize(device)
                start = time.perf_counter()
                total, count = 0.0, 0
                for batch in batches(train_tensors, batch_size, run["generator"]):
                    run["optimizer"].zero_grad(set_to_none=True)
                    loss = loss_of_batch(model, *batch)
                    loss.backward()
                    if clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), clip)
                    run["optimizer"].step()
                    total += loss.detach() * batch[0].shape[0]
                    count += batch[0].shape[0]
                if run["schedule"] is not None:
                    run["schedule"].step()
                synchronize(device)
                run["times"].append(time.perf_counter() - start)
            if log_every and ((epoch + 1) % log_every == 0 or epoch == 0):
                mean_loss = float(total) / count
                print(f"  epoch {epoch + 1:3d} [{name:>8}] train loss {mean_loss:.5f}  ({run['times'][-1]:.2f}s)")
    return {name: run["times"] for name, run in runs.items()}


def print_header(title, device, details):
    print(f"== {title} ==")
    print(f"device: {describe(device)}")
    for line in details:
        print(line)


def print_comparison(rows, times):
    """rows: [(label, {library: formatted value})]; times: {library: [seconds per epoch]}."""
    names = list(times)
    width = max(len(label) for label, _ in rows + [("train time / epoch (median)", None)])
    print()
    print(" " * width + "".join(f"  {name:>12}" for name in names))
    for label, values in rows:
        print(f"{label:<{width}}" + "".join(f"  {values[name]:>12}" for name in names))
    median = {name: statistics.median(t) for name, t in times.items()}
    total = {name: sum(t) for name, t in times.items()}
    print(f"{'train time / epoch (median)':<{width}}" + "".join(f"  {median[n]:>11.3f}s" for n in names))
    print(f"{'train time, total':<{width}}" + "".join(f"  {total[n]:>11.2f}s" for n in names))
    if "torch.nn" in median and "rnnfused" in median:
        print(
            "speed ratio (torch.nn time / rnnfused time): "
            f"{median['torch.nn'] / median['rnnfused']:.2f}x per epoch (median), "
            f"{total['torch.nn'] / total['rnnfused']:.2f}x in total"
        )
