"""What ``svi_kernels._C`` is compiled from and with which flags.

Read by setup.py (the build at install time, loaded by path: it must not import the package) and by
``jit.py`` (the build on first use), so both builds compile the same sources with the same flags.
Only the standard library at import time; torch is passed in.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import List, Tuple

# csrc/cpu/python_module.cpp embeds MARKER + <torch version> + ";" in the binary, so the torch a
# built library is for can be read from the file without loading it (loading one built for another
# torch can crash or register the ops twice).
MARKER = b"svi_kernels-built-for-torch="
VERSION_MACRO = "SVI_KERNELS_TORCH_VERSION"

# No -march: csrc/cpu/isa_avx2.cpp and isa_avx512.cpp enable their instruction sets with GCC
# target pragmas and are picked at run time, so one build runs on any x86-64 CPU
# (docs/kernels.md, "CPU backend"). -fno-math-errno lets sqrt compile to one instruction;
# -Wno-unknown-pragmas silences ATen's `#pragma unroll` in the at::vec headers.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]
SOURCE_PATTERNS = ("*.cpp", "*.h", "*.cu", "*.cuh")


def sources(csrc: str, with_cuda: bool) -> List[str]:
    """Absolute paths of the translation units under ``csrc``."""
    out = [os.path.join(csrc, "ops_schema.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        out += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")) + glob.glob(os.path.join(csrc, "cuda", "*.cpp")))
    return out


def include_dirs(csrc: str) -> List[str]:
    return [os.path.join(csrc, "include")]


def version_define(torch_version: str) -> str:
    """The -D flag that records the torch version in the binary (stringised in python_module.cpp)."""
    return f"-D{VERSION_MACRO}={torch_version}"


def want_cuda(torch, cuda_home) -> Tuple[bool, str]:
    """Whether to add the CUDA kernels, and why (or why not)."""
    if os.environ.get("SVI_KERNELS_NO_CUDA") == "1":
        return False, "SVI_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if cuda_home is None:
        return False, "nvcc/CUDA_HOME not found"
    return True, f"CUDA {torch.version.cuda}, CUDA_HOME={cuda_home}"


def source_files(csrc: str) -> List[str]:
    """Every file a build reads from ``csrc`` (sources and headers), sorted, relative to ``csrc``."""
    found = set()
    for pattern in SOURCE_PATTERNS:
        found.update(glob.glob(os.path.join(csrc, "**", pattern), recursive=True))
    return sorted(os.path.relpath(p, csrc) for p in found)


def fingerprint(csrc: str, *extra: str) -> str:
    """A hash of every source and header under ``csrc`` and of ``extra`` (flags, versions)."""
    h = hashlib.sha256()
    for rel in source_files(csrc):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(csrc, rel), "rb") as fh:
            h.update(fh.read())
    for item in (*extra, *CXX_FLAGS, *NVCC_FLAGS, *LINK_FLAGS):
        h.update(item.encode() + b"\0")
    return h.hexdigest()


def built_for(library: str) -> str:
    """The torch version recorded in a built library, or "" when it has none (an older build)."""
    import mmap

    with open(library, "rb") as fh:
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(MARKER)
            if start < 0:
                return ""
            start += len(MARKER)
            end = data.find(b";", start, start + 200)
            return data[start:end].decode("ascii", "replace") if end > 0 else ""
