"""The SVI optimizer: a fused momentum-SGD or Adam step along whatever is in ``p.grad``.

With ``svi_kernels.svi.attach(model)`` the backward pass writes the monotone-VI field
``D_W = Gᵀ X`` into the ``.grad`` of every (Linear, activation) layer, so this optimizer then moves
along the SVI field (Xu, Cheng & Xie's released code feeds the field to ``torch.optim.SGD(lr=1e-3,
momentum=0.95, nesterov=True)`` or ``torch.optim.Adam``; these are the defaults here).

State layout: ``momentum_buffer`` (as torch.optim.SGD) for ``base="sgd"``; ``step``, ``exp_avg``,
``exp_avg_sq`` (as torch.optim.Adam) for ``base="adam"``, plus ``max_exp_avg_sq`` with ``amsgrad=True``
(AMSGrad, as torch.optim.Adam(amsgrad=True); fused in the same launch). Weight decay is L2 (added to the field),
as in torch.optim.SGD and torch.optim.Adam.

Like ``AdamW``, it takes ``torch.amp.GradScaler`` in its fused kernels (``_step_supports_amp_scaling``:
the field of the scaled loss is unscaled in place, a step with inf/nan is skipped without a host
sync) and has a ``capturable`` mode (lr a number or a device tensor, steps on the device).

``master_weights=True``: as in ``AdamW``, every fp16/bf16 parameter is updated through a float32 copy
(state ``master_param``; its momentum buffer or moments in float32) and rounded into the parameter.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _common as C
from .adamw import adam_group_step


class SVI(Optimizer):
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.0, base="sgd",
                 betas=(0.9, 0.999), eps=1e-8, *, maximize: bool = False, amsgrad: bool = False, capturable: bool = False,
                 master_weights: bool = False, backend: Optional[str] = None):
        C.check_lr(lr)
        C.check_nonneg(momentum, "momentum")
        C.check_nonneg(weight_decay, "weight_decay")
        C.check_betas(betas)
        C.check_nonneg(eps, "eps")
        if base not in ("sgd", "adam"):
            raise ValueError(f"Invalid base {base!r}: expected 'sgd' or 'adam'")
        if amsgrad and base != "adam":
            raise ValueError("amsgrad=True needs base='adam'")
        if base == "sgd" and nesterov and C.as_float(momentum, "momentum") <= 0.0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, base=base,
                        betas=betas, eps=eps, maximize=maximize, amsgrad=bool(amsgrad), capturable=bool(capturable),
                        master_weights=C.check_bool(master_weights, "master_weights"),
                        backend=C._backends.validate(backend))
        super().__init__(params, defaults)
        C._backends.check_param_groups(self.param_groups)  # a backend that cannot serve the devices: refused now

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("base", "sgd")
            group.setdefault("maximize", False)
            group.setdefault("backend", None)
            group.setdefault("betas", (0.9, 0.999))
            group.setdefault("eps", 1e-8)
            group.setdefault("capturable", False)
            group.setdefault("amsgrad", False)
            group.setdefault("master_weights", False)

    def load_state_dict(self, state_dict):
        C.check_state_dict("SVI", state_dict, ("lr", "momentum", "nesterov", "weight_decay"))
        for k, st in state_dict["state"].items():
            if st and not ({"momentum_buffer"} <= set(st) or {"step", "exp_avg", "exp_avg_sq"} <= set(st)):
                raise ValueError(f"SVI.load_state_dict: state of parameter {k} has neither a momentum buffer nor "
                                 f"Adam moments (keys {sorted(st)}); is this a state_dict of another optimizer?")
        flags = [g["master_weights"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        C.keep_master_state(self, state_dict, flags)

    @torch.no_grad()
    def step(self, closure=None):
        loss = C.closure_then_check("SVI", closure, self.param_groups)
        grad_scale, found_inf = C.amp_attributes(self)
        for group in self.param_groups:
            tensor_path = C.use_tensor_path(group, grad_scale, found_inf)
            if group["base"] == "adam":
                adam_group_step(self.state, group, tensor_path=tensor_path, grad_scale=grad_scale,
                                found_inf=found_inf, correct_bias=True, decoupled=False)
                continue
            owners = [p for p in group["params"] if p.grad is not None]
            params = [C.working_tensor(group, self.state[p], p) for p in owners]  # p, or its fp32 master
            grads = [p.grad for p in owners]
            bufs = []
            for p, w in zip(owners, params):
                st = self.state[p]
                if "momentum_buffer" not in st or st["momentum_buffer"] is None:
                    st["momentum_buffer"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            hyper = dict(lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                         weight_decay=group["weight_decay"], maximize=group["maximize"], backend=group["backend"],
                         capturable=tensor_path, grad_scale=grad_scale, found_inf=found_inf)
            C.step_with_masters(lambda *ls: svi_sgd(*ls, **hyper), [params, grads, bufs], owners, grad_scale)
        return loss


def svi_sgd(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *, lr, momentum: float,
            nesterov: bool, weight_decay: float, maximize: bool = False, backend: Optional[str] = None,
            capturable: bool = False, grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None) -> None:
    """Functional momentum SGD (torch.optim.SGD semantics, dampening 0), one launch per (device, dtype).

    With ``capturable`` or AMP tensors it runs the tensor op: lr (number or device tensor), loss scale
    and skip flag are read by the kernel, never by the host.
    """
    if not params:
        return
    if capturable or grad_scale is not None or found_inf is not None:
        scalars = C.DeviceScalars(lr, grad_scale, found_inf)
        for (device, _dtype), (lists, _idx) in C.group_by([params, grads, momentum_buffers]).items():
            impl = C.backend_for(backend, device, lists)
            impl.sgd_momentum_step_tensor(*lists, lr=scalars.lr(device), momentum=C.as_float(momentum, "momentum"),
                                          nesterov=bool(nesterov), weight_decay=C.as_float(weight_decay, "weight_decay"),
                                          maximize=maximize, grad_scale=scalars.grad_scale(device),
                                          found_inf=scalars.found_inf(device))
        return
    lr = C.as_float(lr, "lr")
    for (device, _dtype), (lists, _idx) in C.group_by([params, grads, momentum_buffers]).items():
        impl = C.backend_for(backend, device, lists)
        impl.sgd_momentum_step(*lists, lr=lr, momentum=C.as_float(momentum, "momentum"), nesterov=bool(nesterov),
                               weight_decay=C.as_float(weight_decay, "weight_decay"), maximize=maximize)
