"""Helpers shared by the optimizers: input checks, hyperparameter validation, fused grouping."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Hashable, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

import importlib

# The subpackage, not the ``svi_kernels.backends()`` function that shadows it as a package attribute.
_backends = importlib.import_module("svi_kernels.backends")


def as_float(x, name: str) -> float:
    """A hyperparameter given as a number or a 0-d tensor, as a Python float."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def check_lr(lr, name: str = "lr") -> None:
    v = as_float(lr, name)
    if not v >= 0.0:  # also catches NaN
        raise ValueError(f"Invalid {name}: {v} (must be >= 0)")


def check_betas(betas) -> None:
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        b = as_float(b, f"betas[{i}]")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")


def check_nonneg(value, name: str) -> None:
    v = as_float(value, name)
    if not v >= 0.0:
        raise ValueError(f"Invalid {name}: {v} (must be >= 0)")


def check_open_unit(value, name: str) -> None:
    v = as_float(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"Invalid {name}: {v} (must be in (0, 1))")


def check_positive(value, name: str) -> None:
    v = as_float(value, name)
    if not v > 0.0:
        raise ValueError(f"Invalid {name}: {v} (must be > 0)")


def check_params(opt_name: str, params: Iterable[Tensor]) -> None:
    """Reject what no backend supports, before anything is modified."""
    for p in params:
        if p.is_complex():
            raise RuntimeError(
                f"{opt_name} does not support complex parameters (got {p.dtype}); "
                "optimise torch.view_as_real(p) as a real parameter instead")
        if not p.is_floating_point():
            raise RuntimeError(f"{opt_name} needs floating-point parameters, got {p.dtype}")
        g = p.grad
        if g is None:
            continue
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{opt_name} does not support sparse gradients (got layout {g.layout})")
        if g.is_complex():
            raise RuntimeError(f"{opt_name} does not support complex gradients (got {g.dtype})")
        if g.shape != p.shape:
            raise RuntimeError(f"{opt_name}: gradient shape {tuple(g.shape)} does not match parameter shape "
                               f"{tuple(p.shape)}")
        if g.device != p.device:
            raise RuntimeError(f"{opt_name}: gradient on {g.device} but parameter on {p.device}")


def closure_then_check(opt_name: str, closure, param_groups):
    """torch's optional closure, then every group checked before any is touched (no half updates)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for group in param_groups:
        check_params(opt_name, group["params"])
    return loss


def group_by(tensor_lists: Sequence[Sequence[Tensor]], extra_keys: Sequence[Hashable] | None = None
             ) -> Dict[tuple, Tuple[List[List[Tensor]], List[int]]]:
    """Bucket parallel tensor lists by (device, dtype[, extra key]); one fused launch per bucket.

    Returns {key: (lists, indices)}, where ``indices`` are the positions in the input lists.
    """
    buckets: Dict[tuple, Tuple[List[List[Tensor]], List[int]]] = {}
    first = tensor_lists[0]
    for i, p in enumerate(first):
        key = (p.device, p.dtype) if extra_keys is None else (p.device, p.dtype, extra_keys[i])
        if key not in buckets:
            buckets[key] = ([[] for _ in tensor_lists], [])
        lists, idx = buckets[key]
        for li, tl in enumerate(tensor_lists):
            lists[li].append(tl[i])
        idx.append(i)
    return buckets


def needs_contiguous(backend: str, tensors: Sequence[Tensor]) -> bool:
    """The compiled and Triton kernels walk flat memory; strided tensors go to the reference path."""
    return backend != "reference" and not all(t.is_contiguous() for t in tensors)


def backend_for(name, device: torch.device, lists: Sequence[Sequence[Tensor]]):
    """Resolve the backend module for one fused bucket (reference for non-contiguous tensors)."""
    chosen = _backends.resolve(name, device)
    if any(needs_contiguous(chosen, tl) for tl in lists):
        chosen = "reference"
    return _backends.get(chosen)


def check_state_dict(opt_name: str, state_dict, group_keys: Sequence[str], param_keys: Sequence[str] = ()) -> None:
    """Refuse a state_dict from another optimizer (or a damaged one) before anything is loaded."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{opt_name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
    for i, g in enumerate(state_dict["param_groups"]):
        missing = [k for k in group_keys if k not in g]
        if missing:
            raise ValueError(f"{opt_name}.load_state_dict: param group {i} lacks {missing}; "
                             f"is this a state_dict of another optimizer?")
    for k, st in state_dict["state"].items():
        if not isinstance(k, int) or not st:
            continue
        missing = [key for key in param_keys if key not in st]
        if missing:
            raise ValueError(f"{opt_name}.load_state_dict: state of parameter {k} lacks {missing}; "
                             f"is this a state_dict of another optimizer?")
