"""Find the compiled library for the torch that runs, or compile it on first use.

``load()`` imports ``svi_kernels._C`` when the installed one was built for this torch (the version is
read from the file before loading: build_spec.MARKER). When it is missing (a pure-Python install) or
was built for another torch, the kernels are compiled once with ``torch.utils.cpp_extension.load``
(ninja) from the sources the package ships (``svi_kernels/_csrc``, or ``csrc/`` in a checkout), into
a cache directory keyed by torch version, CPU/CUDA flavour, Python version and a hash of the
sources; later processes import the cached library without building. build_cache.py makes that safe:
one process builds while the others wait (a lock that dies with its holder, so an interrupted build
never wedges the next), the library appears whole by an atomic rename, and it is loaded only from a
place no one else can write.

Environment:
- ``SVI_KERNELS_CACHE_DIR``: where the builds go (default ``$XDG_CACHE_HOME/svi_kernels/extensions``,
  else ``~/.cache/svi_kernels/extensions``);
- ``SVI_KERNELS_NO_JIT=1``: never compile here; a library already in the cache is still used
  (without one, the ``cpu``/``cuda`` backends report why they are unavailable, and ``backend=None``
  warns that it uses ``reference``);
- ``SVI_KERNELS_NO_CUDA=1``: compile only the CPU kernels;
- ``SVI_KERNELS_JIT_VERBOSE=1``: show the compiler's output;
- ``SVI_KERNELS_BUILD_TIMEOUT``: how many seconds to wait for another process's build (default 3600,
  ``inf``: for ever).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from types import ModuleType

import torch

from . import build_cache, build_spec

NAME = "svi_kernels._C"
LIBRARY = "_C.so"  # as cpp_extension.load names it; in the cache only once complete (build_cache)
# In the cache key: entries of the earlier layout (built in place, torch's lock file beside the library)
# are never read, so a build interrupted under it cannot be taken for a complete one.
LAYOUT = "cache-layout-2"


class ExtensionUnavailable(RuntimeError):
    """The compiled library is neither installed for this torch nor buildable here (says why)."""


def package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_dir() -> str:
    """The C++/CUDA sources: shipped as svi_kernels/_csrc in a wheel, csrc/ beside the package in a checkout."""
    for path in (os.path.join(package_dir(), "_csrc"), os.path.join(os.path.dirname(package_dir()), "csrc")):
        if os.path.isfile(os.path.join(path, "ops_schema.cpp")):
            return path
    raise ExtensionUnavailable("the package ships no C++ sources (svi_kernels/_csrc is missing); reinstall svi_kernels")


def cache_root() -> str:
    if os.environ.get("SVI_KERNELS_CACHE_DIR"):
        return os.environ["SVI_KERNELS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "svi_kernels", "extensions")  # svi_kernels/ also holds svi-finetune's data


def _want_cuda() -> bool:
    from torch.utils import cpp_extension
    return build_spec.want_cuda(torch, cpp_extension.CUDA_HOME)[0]


def build_dir(csrc: str, with_cuda: bool) -> str:
    """Where the library for this torch, flavour and source tree is (or will be) built."""
    flavour = f"cuda{torch.version.cuda}" if with_cuda else "cpu"
    digest = build_spec.fingerprint(csrc, torch.__version__, flavour, sys.version, LAYOUT)[:16]
    tag = f"torch{torch.__version__}-{flavour}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    return os.path.join(cache_root(), tag.replace("+", "_"))


def installed_status() -> tuple[str | None, str]:
    """(path of an installed svi_kernels._C built for this torch or None, why it cannot be used)."""
    spec = importlib.util.find_spec(NAME)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None, "svi_kernels._C is not installed (a pure-Python install)"
    built_for = build_spec.built_for(spec.origin)
    if built_for != torch.__version__:
        return None, (f"the installed svi_kernels._C was built for torch {built_for or 'unknown (no version record)'}, "
                      f"this is torch {torch.__version__}")
    return spec.origin, ""


def _import_from(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(attempt: str, csrc: str, with_cuda: bool) -> ModuleType:
    """Compile and import the library in the private directory ``attempt`` (torch's ninja build)."""
    from torch.utils import cpp_extension

    define = build_spec.version_define(torch.__version__)
    return cpp_extension.load(
        name="_C", sources=build_spec.sources(csrc, with_cuda), extra_cflags=build_spec.CXX_FLAGS + [define],
        extra_cuda_cflags=build_spec.NVCC_FLAGS + [define], extra_ldflags=build_spec.LINK_FLAGS,
        extra_include_paths=build_spec.include_dirs(csrc), build_directory=attempt, with_cuda=with_cuda,
        verbose=os.environ.get("SVI_KERNELS_JIT_VERBOSE") == "1")


def _build(attempt: str, directory: str, csrc: str, with_cuda: bool, why: str) -> tuple[ModuleType, str]:
    flavour = "CPU + CUDA" if with_cuda else "CPU"
    build_cache.say(f"{why}; compiling the {flavour} kernels for torch {torch.__version__} into {directory} "
                    "(once, a few minutes; SVI_KERNELS_NO_JIT=1 turns this off)")
    t0 = time.perf_counter()
    try:
        module = _compile(attempt, csrc, with_cuda)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ExtensionUnavailable(
            f"{why}, and compiling it on first use failed ({type(exc).__name__}: {first}); "
            "it needs a C++ compiler (g++ or clang++, C++20) and ninja (`pip install ninja`); "
            "SVI_KERNELS_JIT_VERBOSE=1 shows the compiler output") from exc
    build_cache.say(f"compiled in {time.perf_counter() - t0:.0f} s")
    return module, os.path.join(attempt, LIBRARY)


def _load_cached(path: str) -> ModuleType:
    try:
        return _import_from(path)
    except Exception as exc:
        raise ExtensionUnavailable(
            f"the cached library {path} could not be imported ({type(exc).__name__}: {exc}); delete "
            f"{os.path.dirname(path)} and the next process compiles it again") from exc


def load() -> str:
    """Import svi_kernels._C (installed, cached, or compiled now); returns where it came from.

    Raises ExtensionUnavailable with the reason and the fix when there is none for this torch.
    """
    installed, why = installed_status()
    if installed is not None:
        importlib.import_module(NAME)
        return "compiled extension svi_kernels._C"
    csrc = source_dir()
    with_cuda = _want_cuda()
    directory = build_dir(csrc, with_cuda)
    try:
        if os.environ.get("SVI_KERNELS_NO_JIT") == "1" and build_cache.published(directory, LIBRARY) is None:
            raise ExtensionUnavailable(f"{why}, and compiling it on first use is off (SVI_KERNELS_NO_JIT=1)")
        module = build_cache.obtain(directory, LIBRARY, _load_cached,
                                    lambda attempt: _build(attempt, directory, csrc, with_cuda, why),
                                    what="compiling the kernels")
    except build_cache.CacheError as exc:
        raise ExtensionUnavailable(f"{why}; {exc}") from exc
    # A fresh build was imported from its attempt directory, then renamed here: the same file.
    module.__file__ = module.__spec__.origin = os.path.join(directory, LIBRARY)
    sys.modules[NAME] = module
    setattr(sys.modules["svi_kernels"], "_C", module)
    return f"svi_kernels._C compiled on first use for torch {torch.__version__} ({directory})"
