"""The plain PyTorch update, one parameter at a time, for what the fused kernels do not serve:
``differentiable=True`` (run with autograd on: every op here is differentiable, tensor
hyperparameters stay tensors, nothing is read back as a number) and sparse gradients (SVI's SGD base,
as torch.optim.SGD takes them). Same formulas as update_math.h, in torch's order.

Complex parameters arrive here as real views (torch_flags.as_real), as in the fused path.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


def _scaled_sub_(p: Tensor, d: Tensor, lr: Scalar) -> None:
    """p -= lr * d; a tensor lr stays in the graph."""
    if isinstance(lr, Tensor):
        p.sub_(d * lr)
    else:
        p.add_(d, alpha=-lr)


def adam(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
         max_exp_avg_sqs: Optional[List[Tensor]], steps: List[Tensor], *, lr: Scalar, beta1: Scalar, beta2: Scalar,
         eps: float, weight_decay: float, decoupled: bool, correct_bias: bool, maximize: bool) -> None:
    """Adam (L2 weight decay) or AdamW (decoupled); increments ``steps`` in place."""
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        m, v, step = exp_avgs[i], exp_avg_sqs[i], steps[i]
        step.add_(1)
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g * (1 - beta2))  # (1 - beta2) may be a tensor in the graph
        second = v
        if max_exp_avg_sqs is not None:
            # maximum() keeps its inputs for backward: read a copy of the buffer it then overwrites
            max_exp_avg_sqs[i].copy_(torch.maximum(max_exp_avg_sqs[i].clone(), v))
            second = max_exp_avg_sqs[i]
        if correct_bias:
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        else:
            bias_correction1, bias_correction2_sqrt = 1.0, 1.0
        denom = second.sqrt() / bias_correction2_sqrt + eps
        _scaled_sub_(p, m / denom, lr / bias_correction1)


def sgd(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Optional[Tensor]], *, lr: Scalar,
        momentum: float, dampening: float, nesterov: bool, weight_decay: float, maximize: bool) -> List[Optional[Tensor]]:
    """torch.optim.SGD's update; dense or sparse grads. A missing buffer (None) starts as a copy of the
    gradient, as in torch (dampening applies from the second step). Returns the buffers, new ones included."""
    out = []
    for p, g, buf in zip(params, grads, momentum_buffers):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            if buf is None:
                buf = torch.clone(g).detach()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        out.append(buf)
        _scaled_sub_(p, g, lr)
    return out
