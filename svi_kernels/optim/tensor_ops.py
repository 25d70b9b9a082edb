"""The tensor ops path (AMP GradScaler, capturable=True, torch.compile): hyperparameters and flags
read by the kernels on the device instead of host numbers."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import hyperparams


def amp_attributes(opt) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad_scale, found_inf) as torch.amp.GradScaler sets them on an optimizer with
    ``_step_supports_amp_scaling`` just before ``step()`` (and deletes them after)."""
    return getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)


def use_tensor_path(group, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> bool:
    """The tensor ops (values read by the kernels) instead of the float path (host numbers).
    Under torch.compile too: the float path reads the step counts back (``.item()``), which would
    put a new constant, hence a recompile, into every step; a tensor lr changed by a scheduler
    is then read in place as well, with no recompile."""
    return (bool(group.get("capturable", False)) or grad_scale is not None or found_inf is not None
            or torch.compiler.is_compiling())


class DeviceScalars:
    """lr, grad_scale and found_inf for the tensor ops, on each device that needs them (moved there
    once per step, asynchronously, never read back)."""

    def __init__(self, lr: Union[float, Tensor], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]):
        self._lr, self._grad_scale, self._found_inf = lr, grad_scale, found_inf
        self._moved: Dict[tuple, Tensor] = {}

    def _on(self, name: str, t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
        if t is None or t.device == device:
            return t
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = t.to(device, non_blocking=True)
        return self._moved[key]

    def lr(self, device: torch.device) -> Union[float, Tensor]:
        lr = self._lr
        if not isinstance(lr, Tensor):
            return float(lr)
        hyperparams.one_element(lr, "lr")
        if lr.device != device and lr.device.type == "cpu":
            return float(lr)  # a host tensor: reading it waits for nothing (put lr on the device for graphs)
        return self._on("lr", lr, device)

    def grad_scale(self, device: torch.device) -> Optional[Tensor]:
        return self._on("grad_scale", self._grad_scale, device)

    def found_inf(self, device: torch.device) -> Optional[Tensor]:
        return self._on("found_inf", self._found_inf, device)
