"""Plain PyTorch implementation of every fused op: the oracle the kernels are checked against.

Each function takes lists of tensors of one device and one dtype (a fused group) and updates
them in place, exactly as the C++/CUDA/Triton kernels do. The per-element formulas are the
ones in ``csrc/include/svi_kernels/update_math.h`` (see docs/kernels.md), in the same order.

Low-precision tensors (fp16/bf16) are computed in float32 and rounded once on store, like the
kernels. Called on float64 copies this is the float64 reference of the tests.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

NAME = "reference"


def _opmath(t: Tensor) -> Tensor:
    """The tensor in its compute dtype: float32 for fp16/bf16, itself otherwise."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _store(dst: Tensor, value: Tensor) -> None:
    if value is not dst:
        dst.copy_(value)


def adam_step(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
    bias_correction1: float, bias_correction2_sqrt: float, maximize: bool = False,
) -> None:
    step_size = lr / bias_correction1
    decay = 1.0 - lr * weight_decay
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        pf, gf, mf, vf = _opmath(p), _opmath(g), _opmath(m), _opmath(v)
        if maximize:
            gf = -gf
        if weight_decay != 0.0:
            if decoupled:
                pf = pf * decay
            else:
                gf = gf + weight_decay * pf
        mf = mf + (1.0 - beta1) * (gf - mf)
        vf = beta2 * vf + (1.0 - beta2) * (gf * gf)
        denom = vf.sqrt() / bias_correction2_sqrt + eps
        pf = pf - step_size * (mf / denom)
        _store(p, pf)
        _store(m, mf)
        _store(v, vf)


def sgd_momentum_step(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
    lr: float, momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False,
) -> None:
    for p, g, b in zip(params, grads, momentum_buffers):
        pf, gf, bf = _opmath(p), _opmath(g), _opmath(b)
        if maximize:
            gf = -gf
        if weight_decay != 0.0:
            gf = gf + weight_decay * pf
        bf = momentum * bf + gf
        d = gf + momentum * bf if nesterov else bf
        pf = pf - lr * d
        _store(p, pf)
        _store(b, bf)


def _sums(values: Sequence[Tensor], like: Sequence[Tensor]) -> Tensor:
    device = like[0].device if len(like) else torch.device("cpu")
    if not values:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.stack([x.sum(dtype=torch.float64) for x in values]).to(torch.float32)


def ls_save_sgd(params: List[Tensor], grads: List[Tensor], w0: List[Tensor]) -> Tensor:
    """w0 <- p; returns float32 [n] with sum(g^2) per tensor."""
    terms = []
    for p, g, w in zip(params, grads, w0):
        w.copy_(p)
        gf = _opmath(g)
        terms.append(gf * gf)
    return _sums(terms, params)


def ls_save_adam(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    w0: List[Tensor], *, beta1: float, beta2: float, eps: float, bias_correction2_sqrt: float,
) -> Tensor:
    """Moments updated before the search, w0 <- p; returns sum(g^2 / (sqrt(v_hat)+eps)) per tensor."""
    terms = []
    for p, g, m, v, w in zip(params, grads, exp_avgs, exp_avg_sqs, w0):
        w.copy_(p)
        gf, mf, vf = _opmath(g), _opmath(m), _opmath(v)
        mf = mf + (1.0 - beta1) * (gf - mf)
        vf = beta2 * vf + (1.0 - beta2) * (gf * gf)
        denom = vf.sqrt() / bias_correction2_sqrt + eps
        terms.append((gf * gf) / denom)
        _store(m, mf)
        _store(v, vf)
    return _sums(terms, params)


def ls_trial_sgd(params: List[Tensor], w0: List[Tensor], grads: List[Tensor], etas: Sequence[float]) -> None:
    """p <- w0 - eta_t * g, one eta per tensor."""
    for p, w, g, eta in zip(params, w0, grads, etas):
        _store(p, _opmath(w) - float(eta) * _opmath(g))


def ls_trial_adam(
    params: List[Tensor], w0: List[Tensor], grads: List[Tensor], exp_avg_sqs: List[Tensor],
    etas: Sequence[float], *, eps: float, bias_correction2_sqrt: float,
) -> None:
    """p <- w0 - eta_t * g / (sqrt(v_hat) + eps): the search direction has no momentum."""
    for p, w, g, v, eta in zip(params, w0, grads, exp_avg_sqs, etas):
        denom = _opmath(v).sqrt() / bias_correction2_sqrt + eps
        _store(p, _opmath(w) - float(eta) * (_opmath(g) / denom))


def ls_final_adam(
    params: List[Tensor], w0: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    etas: Sequence[float], *, eps: float, bias_correction1: float, bias_correction2_sqrt: float,
) -> None:
    """p <- w0 - (eta_t / bc1) * m / (sqrt(v_hat) + eps): the final step uses the momentum."""
    for p, w, m, v, eta in zip(params, w0, exp_avgs, exp_avg_sqs, etas):
        denom = _opmath(v).sqrt() / bias_correction2_sqrt + eps
        _store(p, _opmath(w) - (float(eta) / bias_correction1) * (_opmath(m) / denom))


def available() -> tuple[bool, str]:
    return True, "plain PyTorch, always available"
