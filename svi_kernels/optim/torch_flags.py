"""torch.optim's implementation keywords (``foreach``, ``fused``, ``differentiable``) and the parts of
torch's optimizer contract that go with them, for AdamW and SVI.

What each keyword does here (docs/api.md, "torch keywords"):

- ``foreach``: accepted, changes nothing: the step is always one fused multi-tensor launch per
  (device, dtype). ``foreach=True`` refuses what torch's foreach path refuses (a tensor lr or tensor
  betas without ``capturable=True``).
- ``fused``: accepted; the step is fused anyway. ``fused=True`` additionally demands that a kernel
  serves every parameter: a parameter that is not floating point or lives on a device without
  kernels (e.g. ``meta``) raises at its first step, as torch does. ``fused=True`` with
  ``foreach=True`` or ``differentiable=True`` is refused at construction, as in torch.
- ``differentiable=True``: the step runs the plain PyTorch update (optim/plain_step.py) with
  autograd on, so gradients flow through the step to the parameters, the state and tensor
  hyperparameters, as torch's ``differentiable=True``. Slow by design; never taken otherwise.
"""
from __future__ import annotations

import functools
from typing import Iterable, List

import torch
from torch import Tensor

# Device types that have fused kernels here (compiled CPU/CUDA, Triton on CUDA).
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def check_impl_flags(foreach, fused, differentiable) -> None:
    """torch's refusals of contradictory implementation flags, at construction."""
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None or a bool, got {type(value).__name__} {value!r}")
    if not isinstance(differentiable, bool):
        raise TypeError(f"differentiable must be a bool, got {type(differentiable).__name__} {differentiable!r}")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`: differentiable=True runs the plain "
                           "PyTorch update with autograd")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_fused_param(p: Tensor) -> None:
    """``fused=True``: a kernel must serve p (checked when p's state is created, as torch does)."""
    if not (p.device.type in FUSED_DEVICE_TYPES and torch.is_floating_point(p)):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                           f"devices: {list(FUSED_DEVICE_TYPES)} but {p.dtype} and {p.device.type}")


def set_defaults(groups: Iterable[dict]) -> None:
    """Groups from a checkpoint of an older torch (or of this package before the keywords) lack them."""
    for group in groups:
        group.setdefault("foreach", None)
        group.setdefault("fused", None)
        group.setdefault("differentiable", False)


def steps_as_tensors(state) -> None:
    """A numeric ``step`` (checkpoints of torch before 1.12 or hand-made) becomes a float32 0-d tensor,
    as torch converts it on load; the float path reads the steps as tensors."""
    for st in state.values():
        if isinstance(st, dict) and "step" in st and not isinstance(st["step"], Tensor):
            st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)


def real_views(*lists: List[Tensor]) -> List[List[Tensor]]:
    """Each complex tensor as its real view (no copy: the update writes through it), as torch optimises
    complex parameters; real tensors as they are. Called only when some parameter is complex."""
    return [[torch.view_as_real(t) if t.is_complex() else t for t in tl] for tl in lists]


def real_views_with_owners(owners: List[Tensor], working: List[Tensor], *lists: List[Tensor]):
    """real_views of (owners, working tensors, *lists), keeping ``working[i] is owners[i]`` where it held
    (step_with_masters tells a parameter from its fp32 master by identity)."""
    owners_v, *rest = real_views(owners, working, *lists)
    rest[0] = [o if w is p else v for o, v, w, p in zip(owners_v, rest[0], working, owners)]
    return [owners_v] + rest


def check_steps_not_differentiable(steps: List[Tensor]) -> None:
    if any(s.requires_grad for s in steps):
        raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")


def grad_mode_of_differentiable(step):
    """``step()`` runs under no_grad, or with autograd on where the optimizer was built with
    ``differentiable=True`` (torch's rule: the constructor's default decides)."""
    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return step(self, *args, **kwargs)
    return wrapper
