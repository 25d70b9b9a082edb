"""The autograd functions behind ``svi.attach``: a Linear whose weight gradient is the SVI field.

A paired layer computes ``Z = X Wᵀ + b`` (HF ``Conv1D``: ``Z = X W + b``) and ``Y = act(Z)``. Its backward
keeps ``dX = (act'(Z) ⊙ G) W`` exact and writes ``dW = Gᵀ X``, ``db = Σ G`` with ``G = dL/dY``.

Two ways to get ``G`` to the Linear's backward, both pure autograd (no state kept between nodes):
- ``LinearActSVI``: one node computing ``act(X Wᵀ + b)``, for the activations with a known derivative
  kernel (``act_backward``: Triton on CUDA, PyTorch's own backward ops otherwise);
- ``SVILinear`` + ``Tap``: the Linear returns ``Z`` and a *carrier* (an expanded 0-d tensor of Z's shape);
  the activation runs as written in the model, and ``Tap(Y, carrier)`` is an identity on ``Y`` whose
  backward hands ``G`` to the carrier, so the Linear's backward receives ``(dZ, G)``. When nothing taps
  the carrier (``G is None``) the Linear's backward is ordinary backprop.
Both do the same two matmuls as plain backprop (``dX`` and the weight product).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# kind -> forward, for the activations LinearActSVI fuses (the derivative is svi_backward.act_backward's)
FUSED_FORWARD = {
    "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": torch.relu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
}


def linear_input(args: tuple, kwargs: dict) -> Tensor:
    """The one input of a Linear's forward, passed by position or by name (``input=``, ``x=``)."""
    return args[0] if args else next(iter(kwargs.values()))


def autocast_args(x: Tensor, w: Tensor, b: Optional[Tensor]):
    """Cast as autocast casts ``F.linear``'s arguments (as autograd ops, so the casts' backward converts
    the weight gradient back to the parameter's dtype exactly as plain backprop does)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, w, b
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        return t.to(dt) if t is not None and t.is_floating_point() and t.dtype not in (dt, torch.float64) else t
    return cast(x), cast(w), cast(b)


def affine(x: Tensor, w: Tensor, b: Optional[Tensor], transposed: bool) -> Tensor:
    """``F.linear``, or HF Conv1D's ``addmm`` (weight stored as (in, out))."""
    if not transposed:
        return F.linear(x, w, b)
    x2 = x.reshape(-1, x.size(-1))
    z = torch.addmm(b, x2, w) if b is not None else x2 @ w
    return z.view(x.shape[:-1] + (w.size(-1),))


def affine_backward(needs, x, w, has_bias, transposed, dz, src):
    """dX from ``dz`` (exact); weight and bias gradients from ``src`` (the field G, or dz)."""
    out_f = w.size(-1) if transposed else w.size(0)
    x2 = x.reshape(-1, x.size(-1))
    dx = dw = db = None
    if needs[0] and dz is not None:
        dz2 = dz.reshape(-1, out_f)
        dx = (dz2 @ (w.t() if transposed else w)).view(x.shape)
    if src is not None:
        src2 = src.reshape(-1, out_f)
        if needs[1]:
            dw = x2.t() @ src2 if transposed else src2.t() @ x2
        if has_bias and needs[2]:
            db = src2.sum(0)
    return dx, dw, db


class SVILinear(torch.autograd.Function):
    """(Z, carrier) = (affine(X, W, b), an expanded 0-d tensor); backward gets (dZ, G or None).

    ``decided`` (detection only): an object whose ``pair`` attribute says, once the observed forward has
    ended, whether this call is a pair; if not, the backward is ordinary backprop."""

    @staticmethod
    def forward(ctx, x, w, b, transposed, decided):
        ctx.set_materialize_grads(False)
        z = affine(x, w, b, transposed)
        ctx.save_for_backward(x, w)
        ctx.transposed, ctx.has_bias, ctx.decided = transposed, b is not None, decided
        return z, z.new_empty(()).expand(z.shape)

    @staticmethod
    def backward(ctx, dz, g):
        x, w = ctx.saved_tensors
        field = g is not None and (ctx.decided is None or ctx.decided.pair)
        src = g if field else dz
        return (*affine_backward(ctx.needs_input_grad, x, w, ctx.has_bias, ctx.transposed, dz, src), None, None)


class Tap(torch.autograd.Function):
    """Identity on Y; its backward also hands G = dL/dY to the Linear's carrier."""

    @staticmethod
    def forward(ctx, y, carrier):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g, g


def tap(y: Tensor, carrier: Tensor) -> Tensor:
    if y.shape != carrier.shape:  # not elementwise after all: leave the carrier untapped (ordinary gradient)
        return y
    return Tap.apply(y, carrier)


class LinearActSVI(torch.autograd.Function):
    """Y = act(affine(X, W, b)) in one node for a known ``kind``; backward: dX exact, dW = Gᵀ X, db = Σ G."""

    @staticmethod
    def forward(ctx, x, w, b, transposed, kind):
        z = affine(x, w, b, transposed)
        ctx.save_for_backward(x, w, z)
        ctx.transposed, ctx.has_bias, ctx.kind = transposed, b is not None, kind
        return FUSED_FORWARD[kind](z)

    @staticmethod
    def backward(ctx, g):
        x, w, z = ctx.saved_tensors
        dz = act_backward(z, g, ctx.kind) if ctx.needs_input_grad[0] else None
        return (*affine_backward(ctx.needs_input_grad, x, w, ctx.has_bias, ctx.transposed, dz, g), None, None)


def act_backward(z: Tensor, g: Tensor, kind: str) -> Tensor:
    """dZ = act'(Z) ⊙ G in one elementwise pass: the Triton kernel on CUDA (outside torch.compile, which
    traces PyTorch ops only), PyTorch's own backward ops otherwise."""
    from .triton import svi_backward as tsb
    if z.is_cuda and not torch.compiler.is_compiling():
        return tsb.act_backward(z, g, kind)
    return tsb.act_backward_torch(z, g, kind)
