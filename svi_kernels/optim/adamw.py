"""AdamW with a fused multi-tensor step; ``correct_bias=False`` is the original BERT Adam.

The state layout is torch.optim.AdamW's (per-parameter ``step``, ``exp_avg``, ``exp_avg_sq``, and
``max_exp_avg_sq`` with ``amsgrad=True``), so a torch AdamW checkpoint loads into this optimizer and back.

Two ways through ``step()``:

- the float path (default): lr and the bias corrections are host numbers, the steps host tensors;
- the tensor path, taken under ``torch.amp.GradScaler`` (which sets ``opt.grad_scale`` and
  ``opt.found_inf``; ``_step_supports_amp_scaling``) or with ``capturable=True``: lr may be a device
  tensor, the steps live on the parameters' device, and the kernels read lr, steps, loss scale and
  skip flag in place, so ``step()`` never waits for the device (no host sync; CUDA-graph capturable).
  The grads are unscaled in the fused kernel; a step with inf/nan grads changes nothing.

With ``master_weights=True`` each fp16/bf16 parameter is updated through a float32 copy in its state
(``master_param``, with float32 moments) by the same fused ops, then rounded into the parameter in
place (``master_weights.step_with_masters``). ``"kahan"``, ``"8bit"`` and ``"stochastic"`` keep less
(a compensation in p's dtype, an int8 code, nothing): the same fused ops on float32 working chunks
loaded from and stored back to (p, correction) (master_weights.py).

``state_dtype=torch.bfloat16`` keeps the moments in bf16 (4 B/param beside fp32 parameters instead of 8),
stored with stochastic rounding; ``torch.float32`` keeps fp32 moments beside fp16/bf16 parameters
(state_storage.py, docs/api.md).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import bucketing
from . import hyperparams
from . import input_checks
from . import master_weights
from . import master_weights as master_weights_mod
from . import step_counters
from . import tensor_ops
from . import plain_step
from . import state_storage
from . import step_plan
from . import torch_flags as F


class AdamW(Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (``lr`` may be a 0-d tensor).
        correct_bias: apply Adam's bias corrections (True, Mosbach et al.'s stable recipe) or not
            (False, the original BERT Adam).
        maximize: maximise the objective instead of minimising it.
        amsgrad: AMSGrad (Reddi et al.), as torch's ``amsgrad=True``: the denominator uses the running
            maximum of the second moment (state ``max_exp_avg_sq``), in the same fused launch.
        capturable: keep the steps on the parameters' device and read lr (a number or a 0-d tensor
            on that device), steps and AMP scale in the kernels: no host read in ``step()``.
        master_weights: False, or how fp16/bf16 parameters keep their precise value so that small
            updates accumulate instead of rounding away: True (a float32 copy, state ``master_param``,
            +4 B/param, rounded to nearest into p after each step), "kahan" (a compensation in p's dtype,
            state ``master_correction``, +2), "8bit" (an int8 code of the residual in ulp(p)/254, +1) or
            "stochastic" (p stored by stochastic rounding, +0; not with ``capturable=True``). Moments are
            float32 under every mode (or ``state_dtype``). Other dtypes ignore it. ``load_state_dict``
            keeps this optimizer's setting.
        state_dtype: the dtype of the moments: None (the working tensor's: the parameter's, or float32
            beside a master), ``torch.float32``, ``torch.bfloat16`` (fp32 arithmetic, stored with
            stochastic rounding; not with ``capturable=True``, float16 or float64 parameters), or ``"int8"``
            (blockwise 8-bit codes with one float32 scale per ``state_block_size`` elements; fp32/fp16/bf16
            parameters, not FSDP2 yet).
            ``load_state_dict`` keeps this optimizer's setting and converts the loaded moments to it.
        state_block_size: the block of int8 state (a power of two in [32, 4096]; 256 by measurement,
            docs/kernels.md).
        backend: "reference", "cpu", "cuda", "triton" or None (fastest available per device).

    Works with ``torch.amp.GradScaler``: ``scaler.step(opt)`` hands the loss scale and the inf flag
    to the fused kernel (no separate unscale pass, no host sync).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 correct_bias: bool = True, *, maximize: bool = False, amsgrad: bool = False,
                 capturable: bool = False, master_weights=False, backend: Optional[str] = None,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, differentiable: bool = False,
                 state_dtype: Optional[torch.dtype] = None, state_block_size: int = 256):
        hyperparams.check_lr(lr, foreach=foreach, capturable=capturable)
        hyperparams.check_nonneg(eps, "eps")
        hyperparams.check_betas(betas, foreach=foreach, capturable=capturable)
        hyperparams.check_nonneg(weight_decay, "weight_decay")
        F.check_impl_flags(foreach, fused, differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        maximize=maximize, amsgrad=bool(amsgrad), backend=bucketing._backends.validate(backend),
                        foreach=foreach, capturable=bool(capturable), differentiable=differentiable, fused=fused,
                        master_weights=master_weights_mod.check_mode(master_weights),
                        state_dtype=state_storage.check_value(state_dtype),
                        state_block_size=state_storage.check_block_size(state_block_size))
        super().__init__(params, defaults)
        bucketing._backends.check_param_groups(self.param_groups)  # a backend that cannot serve the devices: refused now

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        master_weights.check_new_group(self, "AdamW")
        state_storage.check_new_group(self, "AdamW")

    def __setstate__(self, state):
        # Groups loaded from a torch.optim.AdamW checkpoint lack our keys.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("correct_bias", True)
            group.setdefault("backend", None)
            group.setdefault("maximize", False)
            group.setdefault("amsgrad", False)
            group.setdefault("capturable", False)
            group.setdefault("master_weights", False)
            group.setdefault(state_storage.KEY, None)
            group.setdefault(state_storage.BLOCK_KEY, state_storage.DEFAULT_BLOCK_SIZE)
        F.set_defaults(self.param_groups)
        F.steps_as_tensors(self.state)

    def load_state_dict(self, state_dict):
        input_checks.check_state_dict("AdamW", state_dict, ("lr", "betas", "eps", "weight_decay"),
                           ("step", "exp_avg", "exp_avg_sq"))
        state_storage.check_groups("AdamW", self)  # (parameters whose dtype changed since construction)
        state_storage.check_checkpoint("AdamW", self, state_dict)
        flags, kept = [g["master_weights"] for g in self.param_groups], state_storage.settings(self)
        super().load_state_dict(state_dict)
        master_weights.keep_master_state(self, state_dict, flags)
        state_storage.keep_after_load(self, kept, state_dict)

    @F.grad_mode_of_differentiable
    def step(self, closure=None):
        loss = input_checks.closure_then_check("AdamW", closure, [])[0]
        step_plan.step(self, self._general_step, decoupled=True)  # built once, reused while nothing changes
        return loss

    def _general_step(self, groups, seeds: state_storage.StepSeeds) -> None:
        """Every check, the state of new parameters, and any path (AMP, capturable, masters, complex...)."""
        _, kinds = input_checks.closure_then_check("AdamW", None, groups, complex_ok=True)
        grad_scale, found_inf = tensor_ops.amp_attributes(self)
        for group, (has_complex, _) in zip(groups, kinds):
            adam_group_step(self.state, group, tensor_path=tensor_ops.use_tensor_path(group, grad_scale, found_inf),
                            grad_scale=grad_scale, found_inf=found_inf, correct_bias=group["correct_bias"],
                            decoupled=True, has_complex=has_complex, seeds=seeds)


def adam_group_step(state_of, group: dict, *, tensor_path: bool, grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor], correct_bias: bool, decoupled: bool,
                    has_complex: bool = False, seeds: state_storage.StepSeeds = state_storage.NO_SEEDS) -> None:
    """One param group's Adam step, for AdamW (decoupled) and SVI(base="adam") (L2): the state of each
    parameter with a gradient (moments created like its working tensor, see master_weights.working_tensor,
    in the group's state dtype; the step moved to its device on the tensor path), then the fused step through
    master_weights.step_with_masters, each launch with its seed from ``seeds``. Runs every step over every
    parameter: the flags are read once."""
    amsgrad, masters, fused, differentiable = group["amsgrad"], group["master_weights"], group["fused"], \
        group["differentiable"]
    state_dtype = group.get(state_storage.KEY)
    owners, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], [], []
    int8 = state_dtype == state_storage.INT8
    scales = ([], [], []) if int8 else ()  # int8 state: the block scales of m, v (and max v)
    block = state_storage.block_size(group)
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        state = state_of[p]
        w = master_weights.working_tensor(group, state, p) if masters or "master_param" in state \
            or master_weights.CORRECTION in state else p  # p or its fp32 master
        wd = state_storage.working_dtype(group, p)  # (float32 under every master mode)
        if "exp_avg" not in state:
            if fused:
                F.check_fused_param(p)
            state["step"] = step_counters.new_step(p, on_device=tensor_path)
            state_storage.create(state, "exp_avg", w, group, wd)
            state_storage.create(state, "exp_avg_sq", w, group, wd)
        else:
            if tensor_path:
                step_counters.step_to_param_device(state, p)
            if not state_storage.matches(state, "exp_avg", wd, group):  # (the setting changed)
                state_storage.conform(state, wd, state_dtype, state_storage.block_size(group))
        if amsgrad:
            if "max_exp_avg_sq" not in state:  # amsgrad switched on after some steps
                state_storage.create(state, "max_exp_avg_sq", w, group, wd)
            max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        owners.append(p)
        params.append(w)
        grads.append(g)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
        if int8:
            for key, sl in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), scales):
                if key != "max_exp_avg_sq" or amsgrad:
                    sl.append(state_storage.scales(state, key, block))
    if has_complex:  # optimised as real views, as torch does (no copy)
        owners, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = F.real_views_with_owners(
            owners, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    beta1, beta2 = group["betas"]
    if differentiable:
        F.check_steps_not_differentiable(steps)  # then the plain PyTorch update with autograd on
        plain_step.adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, steps,
                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], decoupled=decoupled, correct_bias=correct_bias,
                        maximize=group["maximize"])
        return
    hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                 correct_bias=correct_bias, maximize=group["maximize"], decoupled=decoupled,
                 backend=group["backend"], capturable=tensor_path, grad_scale=grad_scale, found_inf=found_inf)
    if int8:
        hyper["block_size"] = state_storage.block_size(group)
    n = 6 if amsgrad else 5
    lists = [params, grads, exp_avgs, exp_avg_sqs, steps] + ([max_exp_avg_sqs] if amsgrad else []) + \
        list(scales[:3 if amsgrad else 2])
    master_weights.step_with_masters(lambda *ls: adamw(*ls[:5], max_exp_avg_sqs=ls[5] if amsgrad else None,
                                                       state_seed=seeds.next(group), **_scales_kwargs(ls[n:]),
                                                       **hyper),
                                     lists, owners, grad_scale, group, state_of)


def _scales_kwargs(scale_lists) -> dict:
    """The functional keywords of the scale lists (m, v, max v) of int8 state; {} without them."""
    return dict(zip(("exp_avg_scales", "exp_avg_sq_scales", "max_exp_avg_sq_scales"), scale_lists))


def adam_scalars(step: float, beta1: float, beta2: float, correct_bias: bool) -> tuple[float, float]:
    """(bias_correction1, sqrt(bias_correction2)) in double, as torch computes them."""
    if not correct_bias:
        return 1.0, 1.0
    return 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)


def adamw(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
          state_steps: List[Tensor], *, lr, beta1: float, beta2: float, eps: float, weight_decay: float,
          correct_bias: bool = True, maximize: bool = False, decoupled: bool = True,
          backend: Optional[str] = None, capturable: bool = False, grad_scale: Optional[Tensor] = None,
          found_inf: Optional[Tensor] = None, max_exp_avg_sqs: Optional[List[Tensor]] = None,
          state_seed: Optional[int] = None, exp_avg_scales: Optional[List[Tensor]] = None,
          exp_avg_sq_scales: Optional[List[Tensor]] = None, max_exp_avg_sq_scales: Optional[List[Tensor]] = None,
          block_size: int = 256) -> None:
    """Functional AdamW: increments ``state_steps`` and runs one fused launch per (device, dtype, step).

    ``max_exp_avg_sqs`` given: AMSGrad (torch's ``amsgrad=True``), updated in the same launch.
    The moments may be bf16 beside fp32 params, or fp32 beside fp16/bf16 params; ``state_seed``
    (0 <= seed < 2**31) stores bf16 moments with stochastic rounding (None: to nearest). Int8 moments
    (int8 codes of m, uint8 of v) come with their float32 block scales (``exp_avg_scales``, ...) and
    ``block_size`` (svi_kernels/backends/state_storage.py's format).

    With ``capturable`` or AMP tensors (``grad_scale``: grads are scaled by it; ``found_inf``: skip
    the step when non-zero) it runs the tensor ops instead: one launch per (device, dtype), lr and
    steps read on the device (the steps must then be on their parameters' device).
    """
    if not params:
        return
    if capturable or grad_scale is not None or found_inf is not None:
        _adamw_tensor(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
                      eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, maximize=maximize,
                      decoupled=decoupled, backend=backend, grad_scale=grad_scale, found_inf=found_inf,
                      max_exp_avg_sqs=max_exp_avg_sqs, state_seed=state_seed, block_size=block_size,
                      scales=state_storage.scale_lists(exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales))
        return
    lr = hyperparams.as_float(lr, "lr")
    beta1, beta2 = hyperparams.as_float(beta1, "beta1"), hyperparams.as_float(beta2, "beta2")
    step_values = step_counters.next_step_values(state_steps)
    amsgrad = max_exp_avg_sqs is not None
    names = _STATE_NAMES[:3 if amsgrad else 2]
    scales = state_storage.scale_lists(exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales)
    tensor_lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else []) + scales
    buckets = bucketing.group_by(tensor_lists, extra_keys=step_values)
    n = 2 + len(names)
    for k, ((device, _dtype, step), (lists, _idx)) in enumerate(buckets.items()):
        bc1, bc2_sqrt = adam_scalars(step, beta1, beta2, correct_bias)
        impl = bucketing.backend_for(backend, device, lists[:4])
        impl.adam_step(*lists[:4], **_amsgrad_kwarg(lists[:n]), **state_storage.seed_kwarg(state_seed, k, lists[2]),
                       **state_storage.op_kwargs(names, lists[n:], block_size),
                       lr=lr, beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay),
                       decoupled=decoupled, bias_correction1=bc1, bias_correction2_sqrt=bc2_sqrt, maximize=maximize)


_STATE_NAMES = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")  # the op's state lists (scales in this order)


def _adamw_tensor(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
                  correct_bias, maximize, decoupled, backend, grad_scale, found_inf, max_exp_avg_sqs,
                  state_seed, block_size, scales) -> None:
    """The tensor path: no value is read back to the host (see the module docstring)."""
    beta1, beta2 = hyperparams.as_float(beta1, "beta1"), hyperparams.as_float(beta2, "beta2")
    scalars = tensor_ops.DeviceScalars(lr, grad_scale, found_inf)
    tensor_lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    if max_exp_avg_sqs is not None:
        tensor_lists.append(max_exp_avg_sqs)
    n = len(tensor_lists)
    names = _STATE_NAMES[:n - 3]
    for k, ((device, _dtype), (lists, _idx)) in enumerate(bucketing.group_by(tensor_lists + scales).items()):
        steps = lists[4]
        step_counters.check_steps_on(device, steps)
        scale, skip = scalars.grad_scale(device), scalars.found_inf(device)
        step_counters.increment_steps(steps, skip)
        impl = bucketing.backend_for(backend, device, lists[:4])
        impl.adam_step_tensor(*lists[:5], **_amsgrad_kwarg(lists[:4] + lists[5:n]),
                              **state_storage.seed_kwarg(state_seed, k, lists[2]),
                              **state_storage.op_kwargs(names, lists[n:], block_size), lr=scalars.lr(device),
                              beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay),
                              decoupled=decoupled, correct_bias=correct_bias, maximize=maximize, grad_scale=scale,
                              found_inf=skip)


def _amsgrad_kwarg(lists) -> dict:
    """``max_exp_avg_sqs`` for the backend op when the group carries it (a fifth list), else nothing,
    so a backend without AMSGrad is only asked for it when it is used."""
    return {"max_exp_avg_sqs": lists[4]} if len(lists) > 4 else {}
