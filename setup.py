"""Build svi_kernels and its compiled extension svi_kernels._C.

The C++ CPU kernels (csrc/cpu) are always built; the CUDA kernels (csrc/cuda) are added when torch
is a CUDA build and nvcc is found (CUDA_HOME), unless SVI_KERNELS_NO_CUDA=1; SVI_KERNELS_FORCE_CUDA=1
fails instead of skipping them. Build against the torch you run:
    pip install torch==2.13.0 ninja && pip install --no-build-isolation .
Without torch at build time (an isolated `pip install .`), or with SVI_KERNELS_NO_EXT=1, the package
is built without the extension: it ships csrc/ (as svi_kernels/_csrc) and compiles the kernels on
first use against the torch it runs with (svi_kernels/backends/jit.py). The sources and flags of both
builds come from svi_kernels/backends/build_spec.py.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def load_build_spec():
    # By path: importing the package would import torch and the rest of svi_kernels.
    path = os.path.join(HERE, "svi_kernels", "backends", "build_spec.py")
    spec = importlib.util.spec_from_file_location("svi_kernels_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(paths):
    return [os.path.relpath(p, HERE) for p in paths]


def no_extension_reason():
    if os.environ.get("SVI_KERNELS_NO_EXT") == "1":
        return "SVI_KERNELS_NO_EXT=1"
    if importlib.util.find_spec("torch") is None:
        return "torch is not importable here (an isolated build? `pip install --no-build-isolation .` builds now)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; install g++ or set CXX)"
    return None


def extension(spec):
    import torch
    from torch.utils import cpp_extension

    use_cuda, why = spec.want_cuda(torch, cpp_extension.CUDA_HOME)
    if os.environ.get("SVI_KERNELS_FORCE_CUDA") == "1" and not use_cuda:
        sys.exit(f"SVI_KERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    print(f"svi_kernels: building svi_kernels._C for torch {torch.__version__}; "
          f"CUDA kernels {'ON' if use_cuda else 'OFF'} ({why})")
    sources = rel(spec.sources(CSRC, use_cuda))
    cxx = spec.CXX_FLAGS + [spec.version_define(torch.__version__)]
    kind = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    flags = {"cxx": cxx, "nvcc": spec.NVCC_FLAGS + [spec.version_define(torch.__version__)]} if use_cuda else {"cxx": cxx}
    ext = kind("svi_kernels._C", sources, include_dirs=spec.include_dirs(CSRC), extra_compile_args=flags,
               extra_link_args=spec.LINK_FLAGS)

    class BuildExt(cpp_extension.BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # SVI_KERNELS_BUILD_TEMP keeps ninja's objects between builds (.ci/setup): a rebuild then
            # recompiles only the changed sources.
            self.build_temp = os.environ.get("SVI_KERNELS_BUILD_TEMP") or self.build_temp

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


skip = no_extension_reason()
if skip:
    print(f"svi_kernels: building without svi_kernels._C ({skip}); the kernels compile on first use")
    setup()
else:
    ext_modules, cmdclass = extension(load_build_spec())
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
