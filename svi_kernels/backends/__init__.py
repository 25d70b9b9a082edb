"""Backend registry and the small dispatcher that picks one per (device, dtype) group.

A backend is a module with the same functional signature for every fused op
(``adam_step``, ``sgd_momentum_step``, ``ls_save_sgd``, ``ls_save_adam``, ``ls_trial_sgd``,
``ls_trial_adam``, ``ls_final_adam``, ``ls_final_adam_from_trial``, and the AMP / capturable variants
``adam_step_tensor`` and ``sgd_momentum_step_tensor``); see ``reference.py`` for the contract.

- ``reference``: plain PyTorch, any device, always available (the oracle).
- ``cpu``: the C++ kernels of ``svi_kernels._C`` (vectorised, OpenMP), CPU tensors.
- ``cuda``: the CUDA kernels of ``svi_kernels._C`` (multi-tensor apply), CUDA tensors.
- ``triton``: Triton kernels, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import importlib
import os
import warnings
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


def check_device(name: str, device: torch.device) -> None:
    """Refuse a named backend that cannot take tensors on ``device`` (checked on every step: no imports)."""
    dev = device.type
    if name == "cpu" and dev != "cpu":
        raise RuntimeError(f"backend 'cpu' needs CPU tensors, but the parameters are on {device}")
    if name == "cuda" and dev != "cuda":
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, but the parameters are on {device}")
    if name == "triton" and dev != "cuda" and not (dev == "cpu" and _interpreting()):
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before triton "
            f"is imported), but the parameters are on {device}")


def check_param_groups(param_groups) -> None:
    """Construction-time check (as torch refuses an unsupported ``fused=True``): every group's named
    backend can serve the devices of its parameters. Called at the end of each optimizer's __init__."""
    for group in param_groups:
        name = group.get("backend")
        if name is None:
            continue
        for device in {p.device for p in group["params"]}:
            if device.type != "meta":  # not materialised yet (deferred init): checked at step()
                check_device(name, device)
        ok, why = _status(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")


# What backend=None picks per device type; the first pick on a device warns when it is the slow
# reference backend although a compiled one is built for that device type.
_default_cache: Dict[str, str] = {}
_COMPILED_FOR = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
_FIX = {
    "cpu": "install a C++ compiler and ninja so the kernels compile on first use, or reinstall with "
           "`pip install --no-build-isolation .` against the torch you run (README, \"Install\")",
    "cuda": "`pip install triton`, or build the CUDA kernels: nvcc on PATH, then "
            "`pip install --no-build-isolation .` (README, \"Install\")",
}


def _pick_default(dev: str) -> str:
    order = _COMPILED_FOR.get(dev, ())
    reasons = []
    for cand in order:
        ok, why = _status(cand)
        if ok:
            return cand
        reasons.append(f"{cand}: {why}")
    if order:
        warnings.warn(
            f"svi_kernels: backend=None falls back to the plain PyTorch 'reference' backend for {dev} tensors, "
            f"several times slower than the fused kernels ({'; '.join(reasons)}). To fix: {_FIX[dev]}. "
            f"Pass backend='reference' to choose it explicitly and silence this warning.",
            RuntimeWarning, stacklevel=4)
    return "reference"


def resolve(name: Optional[str], device: torch.device) -> str:
    """The backend to use for tensors on ``device``: the given one (checked), or the fastest available."""
    if name is not None:
        check_device(name, device)
        return name
    dev = device.type
    if dev not in _default_cache:
        _default_cache[dev] = _pick_default(dev)
    return _default_cache[dev]
