"""Integrations with training frameworks. Each is imported on first use, so ``import svi_kernels``
never needs the framework:

    from svi_kernels.integrations.hf import LineSearchTrainer, build_trainer   # needs transformers + accelerate
    from svi_kernels.integrations import LineSearchTrainer                     # same, lazily
"""
from __future__ import annotations

import importlib

_LAZY = {"LineSearchTrainer": "hf", "StepSizeSchedule": "hf", "build_trainer": "hf"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name == "hf":
        return importlib.import_module(f"{__name__}.hf")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
