#!/usr/bin/env bash
# CI step 2: prove that rnnfused's CUDA kernels compile, on a machine without a GPU.
#
# Builds the extension with FORCE_CUDA=1 against a CUDA build of torch kept in its own virtual
# environment (.venv-cuda), in a scratch copy of the checkout, so that the CPU build which
# `make test` made in place (.venv, build/, rnnfused/_C*.so) stays as it is. Then imports the
# result (loading the CUDA kernels needs no GPU) and checks that it reports them.
#
# Variables:
#   CUDA_VENV              the virtual environment (default .venv-cuda)
#   CUDA_TORCH_SPEC        the torch it installs (default torch==2.14.1, a CUDA 13.0 build)
#   CUDA_HOME              the CUDA toolkit with nvcc (default /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default 9.0)
#   MAX_JOBS               parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${CUDA_VENV:-$root/.venv-cuda}
torch_spec=${CUDA_TORCH_SPEC:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export FORCE_CUDA=1
unset FORCE_ONLY_CPU

start=$(date +%s)
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_compile: no nvcc in CUDA_HOME=$CUDA_HOME/bin" >&2
  exit 1
fi
test -x "$venv/bin/python" || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "$torch_spec" numpy pybind11 ninja setuptools wheel
"$venv/bin/python" -c '
import sys, torch
if torch.version.cuda is None:
    sys.exit(f"cuda_compile: torch {torch.__version__} is a CPU build; set CUDA_TORCH_SPEC to a CUDA build")
print(f"cuda_compile: torch {torch.__version__} (CUDA {torch.version.cuda})")
'
echo "cuda_compile: environment ready in $(( $(date +%s) - start )) s"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/rnnfused-cuda.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
tar -C "$root" --exclude=.git --exclude='.venv*' --exclude=build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=.pytest_cache --exclude=__pycache__ -cf - . | tar -C "$scratch" -xf -
build_start=$(date +%s)
# The compiler's full command lines go to a log, shown whole when the build fails; on success
# only its warnings are shown (there should be none from csrc/).
if ! (cd "$scratch" && "$venv/bin/python" setup.py -q build_ext --inplace) > "$scratch/build.log" 2>&1; then
  cat "$scratch/build.log"
  echo "cuda_compile: the CUDA build failed" >&2
  exit 1
fi
grep -i -A3 "warning" "$scratch/build.log" | grep -v "No CUDA runtime is found" || true
echo "cuda_compile: built in $(( $(date +%s) - build_start )) s"
(cd "$scratch" && "$venv/bin/python" -c '
import rnnfused
info = rnnfused.build_info()
print("rnnfused", info)
assert info["cuda"], "the build carries no CUDA kernels"
# The time loops call cuBLAS through the libcublas that torch loaded: it must resolve here too.
print("cuBLAS GEMMs from", rnnfused._C._cuda_gemm_library())
')
echo "cuda_compile: CUDA build of rnnfused checked in $(( $(date +%s) - start )) s"
