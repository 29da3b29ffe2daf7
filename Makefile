# The two commands of the README, each doing all the set-up on a fresh machine:
#   make test    build rnnfused into a virtual environment and run the test suite
#   make bench   build it and run the benchmark suite (rnnfused vs torch.nn, side by side)
# and, on a machine with a GPU and a CUDA build of torch:
#   make gpu-check OUT=dir   build with the CUDA kernels, CUDA tests, compute-sanitizer, GPU
#                            benchmark; every log and the benchmark JSON in dir (.ci/gpu_check.sh);
#                            STEPS="build tests" runs only those steps
#
# Variables:
#   VENV=.venv            where the virtual environment lives
#   SYSTEM_PYTHON=1       use the current python and its torch instead (no venv, no torch install),
#                         e.g. on a machine whose CUDA build of torch is already installed
#   TORCH_SPEC=torch==2.13.0   the torch the venv installs (2.13.0 is a CPU build; plain `torch`
#                         gives a CUDA build, with which the CUDA kernels are built too)
#   BENCH_ARGS=...        arguments of the benchmark suite (python -m benchmarks --help)
#   PYTEST_ARGS=...       extra pytest arguments
#   MAX_JOBS=2            parallel compile jobs
#   TEST_DEPS=...         optional test dependencies `make test` installs (default: onnx,
#                         onnxruntime, onnxscript for the ONNX export tests, matplotlib for the
#                         benchmark plots' test); `make bench` installs matplotlib (the plots)
#   SIM=1                 also build the test build of the CUDA path on the CUDA simulator
#                         (rnnfused._sim_C, tests/test_cuda_sim.py); SIM=0 skips it

VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= 2
BENCH_ARGS ?=
PYTEST_ARGS ?=
SIM ?= 1
# Optional test dependencies: the ONNX export tests (tests/test_onnx.py) and the plot test skip
# without them.
TEST_DEPS ?= onnx onnxruntime onnxscript matplotlib
OUT ?= gpu-check
STEPS ?=

ifeq ($(SYSTEM_PYTHON),1)
PY := python3
else
PY := $(VENV)/bin/python
endif

.PHONY: setup test bench gpu-check clean

setup:
ifneq ($(SYSTEM_PYTHON),1)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy pybind11 ninja pytest
endif
	RNNFUSED_BUILD_SIM=$(SIM) MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -c "import rnnfused; print('rnnfused', rnnfused.build_info())"

test: setup
ifneq ($(SYSTEM_PYTHON),1)
	$(PY) -m pip install -q $(TEST_DEPS)
endif
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
ifneq ($(SYSTEM_PYTHON),1)
	$(PY) -m pip install -q matplotlib
endif
	$(PY) -m benchmarks $(BENCH_ARGS)

gpu-check:
	PYTHON=python3 .ci/gpu_check.sh $(OUT) $(STEPS)

clean:
	rm -rf build rnnfused/*.so *.egg-info
