#!/usr/bin/env bash
# The one command for a machine with a GPU (`make gpu-check OUT=dir`): build rnnfused with its CUDA
# kernels against the machine's own torch, run the CUDA tests, compute-sanitizer (memcheck,
# racecheck, synccheck) and the GPU benchmark against cuDNN, and write every log, the test report
# and the benchmark JSON into OUT. Ends with a summary of what passed and what failed (also in
# OUT/summary.txt); exits non-zero if anything failed. Meant to finish in under 10 minutes on an
# H100.
#
#   .ci/gpu_check.sh OUT [STEP ...]    STEP: build, tests, sanitizer, bench (default: all, in order)
#
# Steps can be run separately (build first), e.g. to split the round over two calls of a
# machine that limits each command's time; each appends to OUT/summary.txt.
#
# Variables:
#   PYTHON                 the python whose torch (a CUDA build) is used (default python3)
#   TORCH_CUDA_ARCH_LIST   GPU architectures (default 9.0)
#   MAX_JOBS               parallel compile jobs (default 16)
#   BENCH_ARGS             benchmark arguments (default: the quick preset on cuda, float32 and bfloat16)
#   CUDA_HOME              CUDA toolkit with compute-sanitizer (default /usr/local/cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: .ci/gpu_check.sh OUTPUT_DIR [build] [tests] [sanitizer] [bench]}
shift
steps=${*:-build tests sanitizer bench}
for s in $steps; do
  case "$s" in build|tests|sanitizer|bench) ;; *) echo "gpu-check: unknown step '$s'" >&2; exit 2 ;; esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
bench_args=${BENCH_ARGS:---preset quick --device cuda --dtype float32,bfloat16}
failed=0
start_all=$(date +%s)
# On a machine without a GPU every CUDA test would skip and the round would "pass": refuse.
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-check: $py's torch sees no GPU (torch.cuda.is_available() is False); nothing to check" | tee -a "$out/summary.txt"
  exit 1
fi

step() {
  local name=$1
  shift
  local start=$(date +%s) status
  if "$@" > "$out/$name.log" 2>&1; then status="passed"; else status="FAILED (exit $?)"; failed=1; fi
  echo "$name: $status in $(( $(date +%s) - start )) s   ($out/$name.log)" | tee -a "$out/summary.txt"
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null
  nvidia-smi 2>&1
  "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
} > "$out/machine.txt" 2>&1

wants() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if wants build; then
  step build env FORCE_CUDA=1 RNNFUSED_BUILD_SIM=1 "$py" -m pip install --no-build-isolation -e .
fi
if wants tests; then
  step cuda-tests "$py" -m pytest -q -rs tests/test_cuda.py --junitxml="$out/cuda-tests.xml"
fi
if wants sanitizer; then
  step compute-sanitizer env RNNFUSED_SANITIZER_LOGS="$out" "$py" -m pytest -q -rs tests/test_cuda.py -m sanitizer
fi
if wants bench; then
  # shellcheck disable=SC2086
  step benchmark "$py" -m benchmarks $bench_args --json "$out/benchmark.json" --plot "$out/benchmark-plots"
fi

echo "gpu-check: $steps done in $(( $(date +%s) - start_all )) s; logs in $out" | tee -a "$out/summary.txt"
if [ "$failed" -ne 0 ]; then
  echo "gpu-check: SOME STEPS FAILED (see above)" | tee -a "$out/summary.txt"
  exit 1
fi
echo "gpu-check: everything passed" | tee -a "$out/summary.txt"
