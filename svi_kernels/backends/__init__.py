"""Backend registry and the small dispatcher that picks one per (device, dtype) group.

A backend is a module with the same functional signature for every fused op
(``adam_step``, ``sgd_momentum_step``, ``ls_save_sgd``, ``ls_save_adam``, ``ls_trial_sgd``,
``ls_trial_adam``, ``ls_final_adam``, and the AMP / capturable variants ``adam_step_tensor`` and
``sgd_momentum_step_tensor``); see ``reference.py`` for the contract.

- ``reference``: plain PyTorch, any device, always available (the oracle).
- ``cpu``: the C++ kernels of ``svi_kernels._C`` (vectorised, OpenMP), CPU tensors.
- ``cuda``: the CUDA kernels of ``svi_kernels._C`` (multi-tensor apply), CUDA tensors.
- ``triton``: Triton kernels, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Optional

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(name: str) -> tuple[bool, str]:
    if name == "reference":
        from . import reference
        return reference.available()
    if name == "cpu":
        from . import compiled
        return compiled.load()
    if name == "cuda":
        from . import compiled
        ok, why = compiled.load()
        if not ok:
            return False, why
        if not compiled.has_cuda_kernels():
            return False, "svi_kernels._C was built without CUDA kernels (no CUDA torch/nvcc at build time)"
        if not torch.cuda.is_available():
            return False, "CUDA kernels are built, but no CUDA device is available"
        return True, "CUDA kernels of svi_kernels._C"
    if name == "triton":
        try:
            mod = importlib.import_module("svi_kernels.backends.triton")
        except Exception as exc:
            return False, f"Triton backend could not be imported ({type(exc).__name__}: {exc})"
        return mod.available()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")


def backends() -> Dict[str, dict]:
    """Which backends are available here, and why not: ``{name: {"available": bool, "reason": str}}``."""
    out = {}
    for name in BACKENDS:
        ok, why = _status(name)
        out[name] = {"available": ok, "reason": why}
    return out


def get(name: str) -> ModuleType:
    """The module implementing backend ``name`` (raises a clear error when it is unavailable)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
    ok, why = _status(name)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    if name == "reference":
        from . import reference
        return reference
    if name in ("cpu", "cuda"):
        from . import compiled
        return compiled
    return importlib.import_module("svi_kernels.backends.triton")


def validate(name: Optional[str]) -> Optional[str]:
    """Check a user-given backend name at construction time."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
    return name


_default_cache: Dict[str, str] = {}


def resolve(name: Optional[str], device: torch.device) -> str:
    """The backend to use for tensors on ``device``: the given one (checked), or the fastest available."""
    dev = device.type
    if name is not None:
        if name == "cpu" and dev != "cpu":
            raise RuntimeError(f"backend 'cpu' needs CPU tensors, but the parameters are on {device}")
        if name == "cuda" and dev != "cuda":
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, but the parameters are on {device}")
        if name == "triton" and dev != "cuda" and not (dev == "cpu" and _interpreting()):
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                f"but the parameters are on {device}")
        return name
    if dev not in _default_cache:
        order = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(dev, ())
        chosen = "reference"
        for cand in order:
            if _status(cand)[0]:
                chosen = cand
                break
        _default_cache[dev] = chosen
    return _default_cache[dev]
