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
``"kahan"``, ``"8bit"``, ``"stochastic"``: as in ``AdamW`` (master_weights.py).

``state_dtype=``: the dtype of the momentum buffer or the moments, as in ``AdamW``: None (the working
tensor's), ``torch.float32``, or ``torch.bfloat16`` (stored with stochastic rounding; not with capturable,
differentiable, sparse gradients, float16 or float64 parameters), or ``"int8"`` (blockwise 8-bit codes,
one float32 scale per ``state_block_size`` elements; not float64, complex or FSDP2 parameters).
``load_state_dict`` keeps this optimizer's setting and converts the loaded state to it (state_storage.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import bucketing
from . import hyperparams
from . import input_checks
from . import master_weights
from . import master_weights as master_weights_mod
from . import tensor_ops
from . import plain_step
from . import state_storage
from . import torch_flags as F
from . import step_plan
from .adamw import adam_group_step


class SVI(Optimizer):
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=None, weight_decay=0.0, base="sgd",
                 betas=(0.9, 0.999), eps=1e-8, *, dampening=0.0, maximize: bool = False, amsgrad: bool = False,
                 capturable: bool = False, master_weights=False, backend: Optional[str] = None,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, differentiable: bool = False,
                 state_dtype: Optional[torch.dtype] = None, state_block_size: int = 256):
        foreach_of_adam = foreach if base == "adam" else None  # torch's SGD takes a tensor lr with foreach
        hyperparams.check_lr(lr, foreach=foreach_of_adam, capturable=capturable)
        hyperparams.check_nonneg(momentum, "momentum")
        hyperparams.check_nonneg(dampening, "dampening")
        hyperparams.check_nonneg(weight_decay, "weight_decay")
        hyperparams.check_nonneg(eps, "eps")
        hyperparams.check_betas(betas, foreach=foreach_of_adam, capturable=capturable)
        F.check_impl_flags(foreach, fused, differentiable)
        if base not in ("sgd", "adam"):
            raise ValueError(f"Invalid base {base!r}: expected 'sgd' or 'adam'")
        if amsgrad and base != "adam":
            raise ValueError("amsgrad=True needs base='adam'")
        momentum_on, undamped = hyperparams.as_float(momentum, "momentum") > 0.0, hyperparams.as_float(dampening, "dampening") == 0.0
        if nesterov is None:  # the SVI paper's Nesterov momentum wherever it is defined
            nesterov = momentum_on and undamped
        if base == "sgd" and nesterov and not (momentum_on and undamped):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                             f"(got momentum={momentum}, dampening={dampening})")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=bool(nesterov),
                        weight_decay=weight_decay, base=base, betas=betas, eps=eps, maximize=maximize,
                        amsgrad=bool(amsgrad), capturable=bool(capturable),
                        master_weights=master_weights_mod.check_mode(master_weights),
                        backend=bucketing._backends.validate(backend), foreach=foreach, fused=fused,
                        differentiable=differentiable, state_dtype=state_storage.check_value(state_dtype),
                        state_block_size=state_storage.check_block_size(state_block_size))
        super().__init__(params, defaults)
        bucketing._backends.check_param_groups(self.param_groups)  # a backend that cannot serve the devices: refused now

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        master_weights.check_new_group(self, "SVI")
        state_storage.check_new_group(self, "SVI")

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
            group.setdefault("dampening", 0.0)
            group.setdefault(state_storage.KEY, None)
            group.setdefault(state_storage.BLOCK_KEY, state_storage.DEFAULT_BLOCK_SIZE)
        F.set_defaults(self.param_groups)
        F.steps_as_tensors(self.state)

    def load_state_dict(self, state_dict):
        input_checks.check_state_dict("SVI", state_dict, ("lr", "momentum", "nesterov", "weight_decay"))
        for k, st in state_dict["state"].items():
            if st and not ({"momentum_buffer"} <= set(st) or {"step", "exp_avg", "exp_avg_sq"} <= set(st)):
                raise ValueError(f"SVI.load_state_dict: state of parameter {k} has neither a momentum buffer nor "
                                 f"Adam moments (keys {sorted(st)}); is this a state_dict of another optimizer?")
        state_storage.check_groups("SVI", self)  # (parameters whose dtype changed since construction)
        state_storage.check_checkpoint("SVI", self, state_dict)
        flags, kept = [g["master_weights"] for g in self.param_groups], state_storage.settings(self)
        super().load_state_dict(state_dict)
        master_weights.keep_master_state(self, state_dict, flags)
        state_storage.keep_after_load(self, kept, state_dict)

    @F.grad_mode_of_differentiable
    def step(self, closure=None):
        loss = input_checks.closure_then_check("SVI", closure, [])[0]
        step_plan.step(self, self._general_step, decoupled=False)  # built once, reused while nothing changes
        return loss

    def _general_step(self, groups, seeds: state_storage.StepSeeds) -> None:
        """Every check, the state of new parameters, and any path (AMP, capturable, masters, sparse...)."""
        _, kinds = input_checks.closure_then_check("SVI", None, groups, complex_ok=True,
                                        sparse_ok=lambda group: group["base"] == "sgd")
        for group, (_, has_sparse) in zip(groups, kinds):
            if has_sparse and group["master_weights"] not in (False, True):
                raise RuntimeError(f"SVI: sparse gradients take the plain PyTorch update of the parameter itself; "
                                   f"master_weights={group['master_weights']!r} is not supported with them (use "
                                   f"master_weights=False or True)")
            if has_sparse and group.get(state_storage.KEY) is not None:
                raise RuntimeError(f"SVI: sparse gradients take the plain PyTorch update, which keeps the momentum "
                                   f"buffer in the parameter's dtype; state_dtype={group[state_storage.KEY]} is "
                                   f"not supported with them (use state_dtype=None)")
        grad_scale, found_inf = tensor_ops.amp_attributes(self)
        for group, (has_complex, has_sparse) in zip(groups, kinds):
            tensor_path = tensor_ops.use_tensor_path(group, grad_scale, found_inf)
            if group["base"] == "adam":
                adam_group_step(self.state, group, tensor_path=tensor_path, grad_scale=grad_scale,
                                found_inf=found_inf, correct_bias=True, decoupled=False, has_complex=has_complex,
                                seeds=seeds)
            elif group["differentiable"] or has_sparse:
                self._plain_sgd_group_step(group)
            else:
                self._sgd_group_step(group, tensor_path, grad_scale, found_inf, has_complex, seeds)

    def _sgd_group_step(self, group, tensor_path: bool, grad_scale, found_inf, has_complex: bool,
                        seeds: state_storage.StepSeeds) -> None:
        owners = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in owners]
        params = [master_weights.working_tensor(group, self.state[p], p) for p in owners]  # p, or its fp32 master
        bufs, fresh = [], []
        state_dtype = group.get(state_storage.KEY)
        for p, w in zip(owners, params):
            st = self.state[p]
            if "momentum_buffer" not in st or st["momentum_buffer"] is None:
                if group["fused"]:
                    F.check_fused_param(p)
                state_storage.create(st, "momentum_buffer", w, group, state_storage.working_dtype(group, p))
                fresh.append(len(bufs))
            elif not state_storage.matches(st, "momentum_buffer", state_storage.working_dtype(group, p), group):
                state_storage.conform(st, state_storage.working_dtype(group, p), state_dtype,
                                      state_storage.block_size(group))  # (setting changed)
            bufs.append(st["momentum_buffer"])
        if has_complex:  # optimised as real views, as torch does (no copy)
            owners, params, grads, bufs = F.real_views_with_owners(owners, params, grads, bufs)
        lists = [params, grads, bufs]
        if state_dtype == state_storage.INT8:  # the buffers' block scales ride along (sliced with them)
            block = state_storage.block_size(group)
            lists.append([state_storage.scales(self.state[p], "momentum_buffer", block) for p in owners])
        # without momentum torch keeps no buffer, so dampening has nothing to damp
        dampening = group["dampening"] if hyperparams.as_float(group["momentum"], "momentum") != 0.0 else 0.0
        hyper = dict(lr=group["lr"], momentum=group["momentum"], dampening=dampening,
                     nesterov=group["nesterov"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                     backend=group["backend"], capturable=tensor_path, grad_scale=grad_scale, found_inf=found_inf,
                     block_size=state_storage.block_size(group))
        if fresh and hyper["dampening"] != 0:
            # torch starts a buffer as the gradient itself: dampening applies from its second step, so the
            # new (zero) buffers take one undamped step (mu * 0 + g == g) in a launch of their own.
            is_fresh = set(fresh)
            new = [[tl[i] for i in fresh] for tl in lists]
            master_weights.step_with_masters(lambda *ls: svi_sgd(*ls[:3], **{**hyper, "dampening": 0.0},
                                                                 momentum_buffer_scales=_scales(ls),
                                                                 state_seed=seeds.next(group)), new,
                                [owners[i] for i in fresh], grad_scale, group, self.state)
            keep = [i for i in range(len(owners)) if i not in is_fresh]
            lists, owners = [[tl[i] for i in keep] for tl in lists], [owners[i] for i in keep]
        master_weights.step_with_masters(lambda *ls: svi_sgd(*ls[:3], **hyper, momentum_buffer_scales=_scales(ls),
                                                             state_seed=seeds.next(group)), lists, owners, grad_scale,
                                         group, self.state)

    def _plain_sgd_group_step(self, group) -> None:
        """differentiable=True or sparse gradients: torch.optim.SGD's update in plain PyTorch (plain_step.py)."""
        owners = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in owners]
        states = [self.state[p] for p in owners]
        params, grads = F.real_views(owners, grads)
        bufs = [st.get("momentum_buffer") for st in states]
        bufs = [F.real_views([b])[0][0] if b is not None else None for b in bufs]
        new = plain_step.sgd(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                             dampening=group["dampening"], nesterov=group["nesterov"],
                             weight_decay=group["weight_decay"], maximize=group["maximize"])
        for st, p, buf in zip(states, owners, new):
            if buf is not None:
                st["momentum_buffer"] = torch.view_as_complex(buf) if p.is_complex() and not buf.is_sparse else buf


def svi_sgd(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *, lr, momentum: float,
            nesterov: bool, weight_decay: float, dampening: float = 0.0, maximize: bool = False,
            backend: Optional[str] = None,
            capturable: bool = False, grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None, state_seed: Optional[int] = None,
            momentum_buffer_scales: Optional[List[Tensor]] = None, block_size: int = 256) -> None:
    """Functional momentum SGD (torch.optim.SGD semantics given zero-initialised buffers: dampening
    applies to every step, so a caller starts new buffers with dampening 0), one launch per (device, dtype).
    The buffers may be bf16 beside fp32 params or fp32 beside fp16/bf16 params; ``state_seed``
    (0 <= seed < 2**31) stores bf16 buffers with stochastic rounding (None: to nearest). Int8 buffers come
    with their float32 block scales (``momentum_buffer_scales``) and ``block_size``.

    With ``capturable`` or AMP tensors it runs the tensor op: lr (number or device tensor), loss scale
    and skip flag are read by the kernel, never by the host.
    """
    if not params:
        return
    scales = state_storage.scale_lists(momentum_buffer_scales)
    if capturable or grad_scale is not None or found_inf is not None:
        scalars = tensor_ops.DeviceScalars(lr, grad_scale, found_inf)
        buckets = bucketing.group_by([params, grads, momentum_buffers] + scales)
        for k, ((device, _dtype), (lists, _idx)) in enumerate(buckets.items()):
            impl = bucketing.backend_for(backend, device, lists[:3])
            impl.sgd_momentum_step_tensor(*lists[:3], **state_storage.seed_kwarg(state_seed, k, lists[2]),
                                          **state_storage.op_kwargs(_BUFFERS, lists[3:], block_size),
                                          lr=scalars.lr(device), momentum=hyperparams.as_float(momentum, "momentum"),
                                          nesterov=bool(nesterov), weight_decay=hyperparams.as_float(weight_decay, "weight_decay"),
                                          maximize=maximize, grad_scale=scalars.grad_scale(device),
                                          **_dampening_kwarg(dampening),
                                          found_inf=scalars.found_inf(device))
        return
    lr = hyperparams.as_float(lr, "lr")
    buckets = bucketing.group_by([params, grads, momentum_buffers] + scales)
    for k, ((device, _dtype), (lists, _idx)) in enumerate(buckets.items()):
        impl = bucketing.backend_for(backend, device, lists[:3])
        impl.sgd_momentum_step(*lists[:3], **state_storage.seed_kwarg(state_seed, k, lists[2]),
                               **state_storage.op_kwargs(_BUFFERS, lists[3:], block_size), lr=lr,
                               momentum=hyperparams.as_float(momentum, "momentum"), nesterov=bool(nesterov),
                               weight_decay=hyperparams.as_float(weight_decay, "weight_decay"), maximize=maximize,
                               **_dampening_kwarg(dampening))


_BUFFERS = ("momentum_buffers",)  # the op's state list (its scales: momentum_buffer_scales)


def _scales(lists) -> Optional[List[Tensor]]:
    """The buffers' scales riding after (params, grads, buffers) in a step's lists (int8 state), else None."""
    return lists[3] if len(lists) > 3 else None


def _dampening_kwarg(dampening) -> dict:
    """``dampening`` for the backend op only when it is not 0 (the common case passes the op nothing new)."""
    d = hyperparams.as_float(dampening, "dampening")
    return {"dampening": d} if d != 0.0 else {}
