"""Build of rnnfused._C: the C++ CPU kernels always, the CUDA kernels when a CUDA build is possible.

Environment switches:
  FORCE_CUDA=1          build the CUDA kernels even where torch sees no GPU (needs nvcc and a CUDA build of torch)
  FORCE_ONLY_CPU=1      never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX": sm_80 and sm_90 with PTX)
  MAX_JOBS              parallel compile jobs (ninja)
  RNNFUSED_DEBUG=1      -O0 -g instead of -O3
  RNNFUSED_BUILD_SIM=1  also build rnnfused._sim_C, the test build of the CUDA path on the CUDA simulator
                        (csrc/cuda/sim/): the CUDA sources compiled by the host compiler, run on CPU
                        tensors as the ops rnnfused_sim::*; `make test` builds it, a plain install does not
Build with `pip install --no-build-isolation -e .` so that the installed torch is the one built against.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if env_flag("FORCE_ONLY_CPU"):
        return False
    import torch

    if env_flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 but this torch is a CPU-only build; install a CUDA build of torch")
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()


# Files compiled for one instruction set each (selected at run time by csrc/cpu/pointwise_dispatch.cpp):
# *_avx2.cpp for AVX2 + FMA, *_avx512.cpp for AVX-512 F, BW, VL, DQ (what ATen's AVX512 capability
# needs); both with F16C, which every such processor has (c10::Half's conversions use it). The
# CPU_CAPABILITY macros select at::vec's vector types for that instruction set.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512",
                    "-DCPU_CAPABILITY_AVX512"],
}


def builds_x86_isas():
    return platform.machine().lower() in ("x86_64", "amd64")


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus per-file flags: *_avx2.cpp / *_avx512.cpp get their ISA_FLAGS on top."""

    def build_extension(self, ext):
        by_suffix = {suffix: [s for s in ext.sources if s.endswith(suffix)] for suffix in ISA_FLAGS}
        ext.sources = [s for s in ext.sources if not any(s.endswith(suffix) for suffix in ISA_FLAGS)]
        for suffix, isa_sources in by_suffix.items():
            if not isa_sources or not builds_x86_isas():
                continue
            flags = {key: list(value) for key, value in ext.extra_compile_args.items()}
            flags["cxx"] = flags.get("cxx", []) + ISA_FLAGS[suffix]
            objects = self.compiler.compile(
                isa_sources,
                # One folder per instruction set: the object names of two ISA files must not collide.
                output_dir=os.path.join(self.build_temp, suffix.strip("_.").replace(".", "_")),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=flags,
                depends=ext.depends,
            )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def extension():
    root = os.path.dirname(os.path.abspath(__file__))
    debug = env_flag("RNNFUSED_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp at compile time only: at::parallel_for is an inline OpenMP loop, and its GOMP
    # calls bind at load time to the OpenMP runtime libtorch_cpu already carries.
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(root, "csrc")]
    x86 = "1" if builds_x86_isas() else "0"
    macros = [("RNNFUSED_HAVE_AVX2_KERNELS", x86), ("RNNFUSED_HAVE_AVX512_KERNELS", x86)]
    depends = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    if not want_cuda():
        return cpp_extension.CppExtension(
            "rnnfused._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            depends=depends,
            extra_compile_args={"cxx": cxx},
        )

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # cuBLAS headers (ATen/cuda/CUDAContext.h includes cublas_v2.h): pip's CUDA builds of torch
    # carry them in site-packages/nvidia/cu*/include. Nothing links cuBLAS itself: the kernels
    # reach it through ATen (at::mm_out), i.e. through libtorch_cuda, which pip's wheels ship
    # with only a versioned libcublas.so.N, so -lcublas would not even resolve.
    import torch

    nvidia_root = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    include_dirs += sorted(glob.glob(os.path.join(nvidia_root, "cu*", "include")))
    include_dirs += sorted(glob.glob(os.path.join(nvidia_root, "cublas", "include")))
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "rnnfused._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros + [("RNNFUSED_WITH_CUDA", None)],
        depends=depends,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


def simulator_extension():
    """rnnfused._sim_C: csrc/cuda's host code and kernels built for the CUDA simulator (tests only)."""
    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "sim", "*.cpp")))
    depends = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    depends += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu*")))
    opt = ["-O0", "-g"] if env_flag("RNNFUSED_DEBUG") else ["-O2"]
    return cpp_extension.CppExtension(
        "rnnfused._sim_C",
        sources,
        include_dirs=[os.path.join(root, "csrc")],
        define_macros=[("RNNFUSED_CUDA_SIM", "1")],
        depends=depends,
        extra_compile_args={"cxx": opt + ["-Wall", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]},
    )


def extensions():
    exts = [extension()]
    if env_flag("RNNFUSED_BUILD_SIM"):
        exts.append(simulator_extension())
    return exts


setup(
    name="rnnfused",
    version="0.1.0",
    description="Fused LSTM, GRU and Elman RNN kernels for PyTorch: drop-in replacements for torch.nn",
    packages=find_packages(include=["rnnfused", "rnnfused.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
