"""Other libraries' memory-saving AdamW rows in svi-bench (issue 24), beside torch fused AdamW.

bitsandbytes' ``AdamW8bit`` (its CPU build runs the 8-bit blockwise update) and torchao's ``AdamW8bit``
(its update compiled by ``torch.compile``, on CPU too), at the versions pinned in pyproject's ``bench``
extra. Neither is a dependency: a peer that is not installed gives a skipped row that says how to install
it (``unavailable.RowUnavailable``), and one that fails on this device a skipped row with its error.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Optional

from .unavailable import RowUnavailable

# The versions measured and documented (docs/benchmarks.md); pyproject's bench extra pins the same
PINNED = {"bitsandbytes": "0.50.2", "torchao": "0.18.0"}
# Both quantise each moment in blocks of 256 elements with one fp32 scale per block (bitsandbytes' CPU
# update: blocksize 256; torchao: block_size=256) and keep tensors under 4096 elements in fp32.
BLOCK = 256
INT8_STATE_ITEMSIZE = 1 + 4 / BLOCK  # bytes per element of one 8-bit moment, its scales included


def installed_version(package: str) -> Optional[str]:
    """The installed distribution's version, without importing it (None when not installed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe() -> str:
    """One line for the run's header: each peer's installed version beside the pinned one."""
    parts = []
    for package, pinned in PINNED.items():
        found = installed_version(package)
        state = (f"{found}" if found == pinned else f"{found} (measured at {pinned})") if found else \
            f"not installed (pip install {package}=={pinned})"
        parts.append(f"{package} {state}")
    return "peers: " + ", ".join(parts)


def _import(module: str):
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RowUnavailable(f"{package} is not installed ({exc}); `pip install {package}=={PINNED[package]}` "
                             f"(or the bench extra: `pip install '.[bench]'`) installs the version measured") from exc


def bnb_adamw8bit(params, lr: float, weight_decay: float):
    """bitsandbytes' 8-bit AdamW (blockwise dynamic quantisation of both moments)."""
    bnb = _import("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def torchao_adamw8bit(params, lr: float, weight_decay: float):
    """torchao's AdamW8bit: its first step compiles the update once per parameter shape (minutes on 2
    cores; later runs reuse inductor's on-disk cache)."""
    optim = _import("torchao.optim")
    return optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


BUILDERS = {"bitsandbytes": ("bnb_adamw8bit", bnb_adamw8bit), "torchao": ("torchao_adamw8bit", torchao_adamw8bit)}
