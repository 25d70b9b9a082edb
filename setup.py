"""Build svi_kernels and its compiled extension svi_kernels._C.

The C++ CPU kernels (csrc/cpu) are always built. The CUDA kernels (csrc/cuda) are added when
torch is a CUDA build and nvcc is found (CUDA_HOME), unless SVI_KERNELS_NO_CUDA=1; set
SVI_KERNELS_FORCE_CUDA=1 to fail instead of silently skipping them. Install with
    pip install torch==2.13.0 ninja && pip install --no-build-isolation .
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # a clear message instead of a traceback deep in setuptools
    sys.exit(
        "svi_kernels builds a PyTorch C++ extension and needs torch installed first:\n"
        "    pip install torch==2.13.0 ninja numpy\n"
        "    pip install --no-build-isolation .\n"
        "(--no-build-isolation builds against the torch you run; an isolated build would fetch another one.)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def want_cuda():
    if os.environ.get("SVI_KERNELS_NO_CUDA") == "1":
        return False, "SVI_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc/CUDA_HOME not found"
    return True, f"CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"


def extension():
    sources = rel([os.path.join(HERE, "csrc", "ops_schema.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # No -march: csrc/cpu/isa_avx2.cpp and isa_avx512.cpp enable their instruction sets with GCC
    # target pragmas and are picked at run time, so one build runs on any x86-64 CPU
    # (docs/kernels.md, "CPU backend"). -fno-math-errno lets sqrt compile to one instruction;
    # -Wno-unknown-pragmas silences ATen's `#pragma unroll` in the at::vec headers.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"]
    extra_link = ["-fopenmp"]
    use_cuda, why = want_cuda()
    if os.environ.get("SVI_KERNELS_FORCE_CUDA") == "1" and not use_cuda:
        sys.exit(f"SVI_KERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    print(f"svi_kernels: CUDA kernels {'ON' if use_cuda else 'OFF'} ({why})")
    if use_cuda:
        sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "svi_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)
    return cpp_extension.CppExtension(
        "svi_kernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
