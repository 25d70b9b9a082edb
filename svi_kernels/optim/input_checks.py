"""What a step refuses before it changes anything: parameters and gradients no backend supports,
a state_dict of another optimizer."""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple

import torch
from torch import Tensor

from . import sharding


def check_params(opt_name: str, params: Iterable[Tensor], *, complex_ok: bool = False,
                 sparse_ok: bool = False) -> Tuple[bool, bool]:
    """Reject what no backend supports, before anything is modified. Returns (some parameter is
    complex, some gradient is sparse), so the step needs no second pass to find out.

    ``complex_ok``: the caller optimises complex parameters as real views (AdamW, SVI, as torch does).
    ``sparse_ok``: the caller takes sparse gradients (SVI's SGD base, on the plain PyTorch path).
    Kept to a few attribute reads per tensor: it runs every step. Shape and device agreement of a
    gradient with its parameter are checked by the kernels (autograd guarantees them anyway).
    """
    strided = torch.strided
    has_complex = has_sparse = False
    for p in params:
        if not p.is_floating_point():
            if p.is_complex():
                if not complex_ok:
                    raise RuntimeError(
                        f"{opt_name} does not support complex parameters (got {p.dtype}); "
                        "optimise torch.view_as_real(p) as a real parameter instead")
                has_complex = True
            else:
                raise RuntimeError(f"{opt_name} needs floating-point parameters, got {p.dtype}")
        g = p.grad
        if g is None:
            continue
        if g.layout is not strided:
            if not sparse_ok:
                raise RuntimeError(f"{opt_name} does not support sparse gradients (got layout {g.layout})")
            has_sparse = True
        if g.is_complex() and not p.is_complex():
            raise RuntimeError(f"{opt_name} does not support complex gradients (got {g.dtype})")
    return has_complex, has_sparse


def closure_then_check(opt_name: str, closure, param_groups, **allowed):
    """torch's optional closure, then every group checked before any is touched (no half updates).
    ``allowed``: check_params's complex_ok / sparse_ok, each a bool or a function of the group.
    Returns the loss and, per group, check_params's (has_complex, has_sparse)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    kinds = []
    for group in param_groups:
        kinds.append(check_params(opt_name, group["params"],
                                  **{k: v(group) if callable(v) else v for k, v in allowed.items()}))
        sharding.check(opt_name, group["params"])
    return loss, kinds


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
