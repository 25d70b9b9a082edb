"""Plain PyTorch implementation of every fused op: the oracle the kernels are checked against.

Each function takes lists of tensors of one device and one dtype (a fused group) and updates
them in place, exactly as the C++/CUDA/Triton kernels do. The per-element formulas are the
ones in ``csrc/include/svi_kernels/update_math.h`` (see docs/kernels.md), in the same order.

Low-precision tensors (fp16/bf16) are computed in float32 and rounded once on store, like the
kernels. Called on float64 copies this is the float64 reference of the tests.

Optimizer state may have another dtype than the params (state_storage.STATE_DTYPES: bf16 state
for fp32 params, fp32 state for fp16/bf16 params); the ops that write state take ``state_seed``:
None rounds every store to nearest, an int stochastically rounds the stores into bf16 state
(state_storage.stochastic_round_bf16, the bits every backend uses).

Int8 state: the state lists hold int8 / uint8 codes and the ops take their float32 block scales
(``exp_avg_scales``, ``exp_avg_sq_scales``, ``max_exp_avg_sq_scales``, ``momentum_buffer_scales``) and
``block_size``; each state tensor is decoded to float32, updated by the same formulas, and encoded
(state_storage.encode_int8 / decode_int8, the codec every backend follows bit for bit).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .state_storage import DEFAULT_BLOCK_SIZE, check_state_dtypes, check_state_seed, decode_int8, store_state

NAME = "reference"


def _opmath(t: Tensor) -> Tensor:
    """The tensor in its compute dtype: float32 for fp16/bf16, itself otherwise."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _state(x: Tensor, scale: Optional[Tensor], block_size: int) -> Tensor:
    """A state tensor in its compute dtype: int8 codes (``scale`` given) decoded, others as ``_opmath``."""
    return _opmath(x) if scale is None else decode_int8(x, scale, block_size)


def _each(tensors: Optional[Sequence[Tensor]], n: int) -> Sequence[Optional[Tensor]]:
    """The list, or n Nones for a list not given (the scales of non-int8 state)."""
    return [None] * n if tensors is None else tensors


def _store(dst: Tensor, value: Tensor) -> None:
    if value is not dst:
        dst.copy_(value)


def _adam_math(pf, gf, mf, vf, vmax, *, beta1, beta2, eps, weight_decay, decoupled, decay, step_size,
               bias_correction2_sqrt, maximize):
    """adam_elem of update_math.h on opmath tensors; returns (p, m, v, the v used in the denominator)."""
    if maximize:
        gf = -gf
    if weight_decay != 0.0:
        if decoupled:
            pf = pf * decay
        else:
            gf = gf + weight_decay * pf
    mf = mf + (1.0 - beta1) * (gf - mf)
    vf = beta2 * vf + (1.0 - beta2) * (gf * gf)
    second = vf if vmax is None else torch.maximum(vmax, vf)  # AMSGrad (vmax: in the compute dtype)
    denom = second.sqrt() / bias_correction2_sqrt + eps
    return pf - step_size * (mf / denom), mf, vf, second


def _sgd_math(pf, gf, bf, *, lr, momentum, nesterov, weight_decay, maximize, dampening=0.0):
    """sgd_momentum_elem of update_math.h on opmath tensors; returns (p, momentum buffer)."""
    if maximize:
        gf = -gf
    if weight_decay != 0.0:
        gf = gf + weight_decay * pf
    bf = momentum * bf + (1.0 - dampening) * gf
    d = gf + momentum * bf if nesterov else bf
    return pf - lr * d, bf


def adam_step(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
    bias_correction1: float, bias_correction2_sqrt: float, maximize: bool = False,
    max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
    exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
    max_exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """max_exp_avg_sqs given: AMSGrad, max_v <- max(max_v, v) and the denominator uses max_v."""
    moments = _Moments("adam_step", params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_seed, exp_avg_scales,
                       exp_avg_sq_scales, max_exp_avg_sq_scales, block_size)
    step_size = lr / bias_correction1
    decay = 1.0 - lr * weight_decay
    for t, (p, g) in enumerate(zip(params, grads)):
        mf, vf, vmax = moments.load(t)
        pf, mf, vf, second = _adam_math(
            _opmath(p), _opmath(g), mf, vf, vmax, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled, decay=decay, step_size=step_size,
            bias_correction2_sqrt=bias_correction2_sqrt, maximize=maximize)
        _store(p, pf)
        moments.store(t, mf, vf, second)


class _Moments:
    """The Adam state lists of one call (checked on construction): each tensor's moments in the compute
    dtype, and their stores (rounded, stochastically rounded or encoded: state_storage.store_state)."""

    def __init__(self, op, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_seed, exp_avg_scales=None,
                 exp_avg_sq_scales=None, max_exp_avg_sq_scales=None, block_size=DEFAULT_BLOCK_SIZE):
        check_state_seed(op, state_seed)
        check_state_dtypes(op, params, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                                        "max_exp_avg_sqs": max_exp_avg_sqs},
                           {"exp_avgs": exp_avg_scales, "exp_avg_sqs": exp_avg_sq_scales,
                            "max_exp_avg_sqs": max_exp_avg_sq_scales}, block_size)
        n = len(params)
        self.m, self.v, self.vmax = exp_avgs, exp_avg_sqs, max_exp_avg_sqs
        self.m_scales, self.v_scales = _each(exp_avg_scales, n), _each(exp_avg_sq_scales, n)
        self.vmax_scales = _each(max_exp_avg_sq_scales, n)
        self.seed, self.block_size = state_seed, block_size

    def load(self, t):
        """(m, v, max v or None) of tensor t in the compute dtype."""
        vmax = None if self.vmax is None else _state(self.vmax[t], self.vmax_scales[t], self.block_size)
        return (_state(self.m[t], self.m_scales[t], self.block_size),
                _state(self.v[t], self.v_scales[t], self.block_size), vmax)

    def store(self, t, mf, vf, second=None, keep=None):
        store_state(self.m[t], mf, self.seed, t, "exp_avgs", keep, self.m_scales[t], self.block_size)
        store_state(self.v[t], vf, self.seed, t, "exp_avg_sqs", keep, self.v_scales[t], self.block_size)
        if self.vmax is not None:
            store_state(self.vmax[t], second, self.seed, t, "max_exp_avg_sqs", keep, self.vmax_scales[t],
                        self.block_size)


def sgd_momentum_step(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
    lr: float, momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False,
    dampening: float = 0.0, state_seed: Optional[int] = None,
    momentum_buffer_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """buf = momentum * buf + (1 - dampening) * g on every call (torch's first undamped step is the caller's)."""
    scales = _check_sgd_state("sgd_momentum_step", params, momentum_buffers, state_seed, momentum_buffer_scales,
                              block_size)
    for t, (p, g, b) in enumerate(zip(params, grads, momentum_buffers)):
        pf, bf = _sgd_math(_opmath(p), _opmath(g), _state(b, scales[t], block_size), lr=lr, momentum=momentum,
                           nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, dampening=dampening)
        _store(p, pf)
        store_state(b, bf, state_seed, t, "momentum_buffers", None, scales[t], block_size)


def _check_sgd_state(op, params, momentum_buffers, state_seed, momentum_buffer_scales, block_size):
    """Checks the state; returns each buffer's scales (Nones unless int8)."""
    check_state_seed(op, state_seed)
    check_state_dtypes(op, params, {"momentum_buffers": momentum_buffers},
                       {"momentum_buffers": momentum_buffer_scales}, block_size)
    return _each(momentum_buffer_scales, len(params))


# ------------------------------------------------------------ AMP / capturable (tensor scalars)
def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_f64(x: Union[float, Tensor], like: Tensor) -> Union[float, Tensor]:
    """A one-element tensor as a 0-d float64 tensor on ``like``'s device, a number as itself
    (no host read, and no host-to-device copy that a CUDA graph could not capture)."""
    if isinstance(x, Tensor):
        return x.detach().reshape(()).to(device=like.device, dtype=torch.float64)
    return float(x)


def _as_compute(x: Union[float, Tensor], compute: torch.dtype) -> Union[float, Tensor]:
    """Rounded once to the compute dtype (numbers are, by the tensor op they enter)."""
    return x.to(compute) if isinstance(x, Tensor) else x


def _keep(found_inf: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """0-d bool 'apply the update' (found_inf == 0), or None when nothing can skip the step."""
    if found_inf is None:
        return None
    return found_inf.detach().reshape(()).to(like.device) == 0


def _store_unless_skipped(dst: Tensor, value: Tensor, keep: Optional[Tensor]) -> None:
    if keep is None:
        _store(dst, value)
    else:  # a select, not a branch: the host never reads found_inf
        dst.copy_(torch.where(keep, value.to(dst.dtype), dst))


def _unscaled(g: Tensor, grad_scale: Optional[Tensor], compute: torch.dtype) -> Tensor:
    gf = _opmath(g)
    if grad_scale is not None:
        gf = gf / grad_scale.detach().reshape(()).to(device=g.device, dtype=compute)  # unscale_grad
    return gf


def adam_step_tensor(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    state_steps: List[Tensor], *, lr: Union[float, Tensor], beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool, correct_bias: bool, maximize: bool = False,
    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
    max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
    exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
    max_exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """adam_step with lr, the step counts (already incremented), the loss scale and the skip flag as
    tensors, never read by the host. found_inf != 0: nothing changes. grad_scale: g <- g / grad_scale,
    written back to the gradient, before the update. Bias corrections in float64 from each step.
    max_exp_avg_sqs: AMSGrad, as in adam_step."""
    moments = _Moments("adam_step_tensor", params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_seed,
                       exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales, block_size)
    if not params:
        return
    compute = _compute_dtype(params[0])
    lr64 = _as_f64(lr, params[0])
    keep = _keep(found_inf, params[0])
    for t, (p, g, step) in enumerate(zip(params, grads, state_steps)):
        step_size, bc2_sqrt = lr64, 1.0
        if correct_bias:  # adam_bias_corrections (update_math.h), in float64
            n = step.detach().reshape(()).to(device=p.device, dtype=torch.float64)
            step_size = lr64 / (1.0 - torch.pow(float(beta1), n))
            bc2_sqrt = torch.sqrt(1.0 - torch.pow(float(beta2), n))
        step_size, bc2_sqrt = _as_compute(step_size, compute), _as_compute(bc2_sqrt, compute)
        decay = _as_compute(1.0 - lr64 * weight_decay, compute)
        gu = _unscaled(g, grad_scale, compute)
        mf, vf, vmax = moments.load(t)
        pf, mf, vf, second = _adam_math(
            _opmath(p), gu, mf, vf, vmax, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled, decay=decay, step_size=step_size,
            bias_correction2_sqrt=bc2_sqrt, maximize=maximize)
        if grad_scale is not None:
            _store_unless_skipped(g, gu, keep)
        _store_unless_skipped(p, pf, keep)
        moments.store(t, mf, vf, second, keep)


def sgd_momentum_step_tensor(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
    lr: Union[float, Tensor], momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False,
    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None, dampening: float = 0.0,
    state_seed: Optional[int] = None, momentum_buffer_scales: Optional[List[Tensor]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """sgd_momentum_step with lr, the loss scale and the skip flag as tensors (see adam_step_tensor)."""
    scales = _check_sgd_state("sgd_momentum_step_tensor", params, momentum_buffers, state_seed,
                              momentum_buffer_scales, block_size)
    if not params:
        return
    compute = _compute_dtype(params[0])
    lr_c = _as_compute(_as_f64(lr, params[0]), compute)
    keep = _keep(found_inf, params[0])
    for t, (p, g, b) in enumerate(zip(params, grads, momentum_buffers)):
        gu = _unscaled(g, grad_scale, compute)
        pf, bf = _sgd_math(_opmath(p), gu, _state(b, scales[t], block_size), lr=lr_c, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay, maximize=maximize, dampening=dampening)
        if grad_scale is not None:
            _store_unless_skipped(g, gu, keep)
        _store_unless_skipped(p, pf, keep)
        store_state(b, bf, state_seed, t, "momentum_buffers", keep, scales[t], block_size)


def _sums(values: Sequence[Tensor], like: Sequence[Tensor]) -> Tensor:
    device = like[0].device if len(like) else torch.device("cpu")
    if not values:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.stack([x.sum(dtype=torch.float64) for x in values]).to(torch.float32)


def ls_save_sgd(params: List[Tensor], grads: List[Tensor], w0: List[Tensor]) -> Tensor:
    """w0 <- p (unless ``w0`` is empty: then nothing is written); returns float32 [n] with sum(g^2)
    per tensor."""
    if len(grads) != len(params):
        raise ValueError(f"ls_save_sgd: grads has {len(grads)} tensors but params has {len(params)}")
    check_optional_list("ls_save_sgd", "w0", w0, params)
    terms = []
    for i, g in enumerate(grads):
        if w0:
            w0[i].copy_(params[i])
        gf = _opmath(g)
        terms.append(gf * gf)
    return _sums(terms, params)


def ls_save_adam(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    w0: List[Tensor], dirs: List[Tensor], *, beta1: float, beta2: float, eps: float, bias_correction2_sqrt: float,
    state_seed: Optional[int] = None, exp_avg_scales: Optional[List[Tensor]] = None,
    exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Moments updated before the search, w0 <- p (unless ``w0`` is empty: the in-place trials'
    save, which does not read p), and (when ``dirs`` is not empty, only with w0) the search
    direction dirs <- g / (sqrt(v_hat)+eps); returns sum(g^2 / (sqrt(v_hat)+eps)) per tensor.
    w0 and dirs have the params' dtype (whatever the state's)."""
    if len(grads) != len(params):
        raise ValueError(f"ls_save_adam: grads has {len(grads)} tensors but params has {len(params)}")
    check_optional_list("ls_save_adam", "w0", w0, params)
    check_optional_list("ls_save_adam", "dirs", dirs, params)
    if dirs and not w0:
        raise ValueError("ls_save_adam: dirs needs w0 (give both, or an empty dirs)")
    moments = _Moments("ls_save_adam", params, exp_avgs, exp_avg_sqs, None, state_seed, exp_avg_scales,
                       exp_avg_sq_scales, None, block_size)
    terms = []
    for i, g in enumerate(grads):
        if w0:
            w0[i].copy_(params[i])
        gf = _opmath(g)
        mf, vf, _ = moments.load(i)
        mf = mf + (1.0 - beta1) * (gf - mf)
        vf = beta2 * vf + (1.0 - beta2) * (gf * gf)
        denom = vf.sqrt() / bias_correction2_sqrt + eps
        terms.append((gf * gf) / denom)
        if dirs:
            _store(dirs[i], gf / denom)
        moments.store(i, mf, vf)
    return _sums(terms, params)


def check_optional_list(op: str, name: str, tensors: List[Tensor], params: List[Tensor]) -> None:
    """An output list the op may go without (ls_save_sgd's and ls_save_adam's w0, ls_save_adam's dirs):
    empty, or one per param.
    The Triton ops call it too, so both name the list alike."""
    if tensors and len(tensors) != len(params):
        raise ValueError(f"{op}: {name} has {len(tensors)} tensors but params has {len(params)} (give one per "
                         f"parameter, or an empty list to write no {name})")


def ls_trial_sgd(params: List[Tensor], w0: List[Tensor], grads: List[Tensor], etas: Sequence[float]) -> None:
    """p <- w0 - eta_t * g, one eta per tensor."""
    for p, w, g, eta in zip(params, w0, grads, etas):
        _store(p, _opmath(w) - float(eta) * _opmath(g))


def ls_trial_adam(
    params: List[Tensor], w0: List[Tensor], grads: List[Tensor], exp_avg_sqs: List[Tensor],
    etas: Sequence[float], *, eps: float, bias_correction2_sqrt: float,
    exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """p <- w0 - eta_t * g / (sqrt(v_hat) + eps): the search direction has no momentum."""
    check_state_dtypes("ls_trial_adam", params, {"exp_avg_sqs": exp_avg_sqs}, {"exp_avg_sqs": exp_avg_sq_scales},
                       block_size)
    v_scales = _each(exp_avg_sq_scales, len(params))
    for p, w, g, v, vs, eta in zip(params, w0, grads, exp_avg_sqs, v_scales, etas):
        denom = _state(v, vs, block_size).sqrt() / bias_correction2_sqrt + eps
        _store(p, _opmath(w) - float(eta) * (_opmath(g) / denom))


def ls_final_adam(
    params: List[Tensor], w0: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    etas: Sequence[float], *, eps: float, bias_correction1: float, bias_correction2_sqrt: float,
    exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """p <- w0 - (eta_t / bc1) * m / (sqrt(v_hat) + eps): the final step uses the momentum."""
    moments = _Moments("ls_final_adam", params, exp_avgs, exp_avg_sqs, None, None, exp_avg_scales,
                       exp_avg_sq_scales, None, block_size)
    for t, (p, w, eta) in enumerate(zip(params, w0, etas)):
        mf, vf, _ = moments.load(t)
        denom = vf.sqrt() / bias_correction2_sqrt + eps
        _store(p, _opmath(w) - (float(eta) / bias_correction1) * (mf / denom))


def ls_final_adam_from_trial(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    etas: Sequence[float], *, trial_eta: float, eps: float, bias_correction1: float, bias_correction2_sqrt: float,
    exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """From the trial point p = w0 - trial_eta * g / (sqrt(v_hat) + eps) (in-place trials, no w0 stored):
    p <- (p + trial_eta * g / denom) - (eta_t / bc1) * m / denom, the start point recovered in the
    compute dtype and not stored."""
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("etas", etas)):
        if len(lst) != len(params):
            raise ValueError(f"ls_final_adam_from_trial: {name} has {len(lst)} entries but params has {len(params)}")
    moments = _Moments("ls_final_adam_from_trial", params, exp_avgs, exp_avg_sqs, None, None, exp_avg_scales,
                       exp_avg_sq_scales, None, block_size)
    for t, (p, g, eta) in enumerate(zip(params, grads, etas)):
        mf, vf, _ = moments.load(t)
        denom = vf.sqrt() / bias_correction2_sqrt + eps
        w0 = _opmath(p) + float(trial_eta) * (_opmath(g) / denom)
        _store(p, w0 - (float(eta) / bias_correction1) * (mf / denom))


def available() -> tuple[bool, str]:
    return True, "plain PyTorch, always available"
