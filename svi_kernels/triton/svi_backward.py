"""SVI fused backward: dz = act'(z) * g in one elementwise pass.

The SVI layer needs the gradient w.r.t. the pre-activation z from the gradient g w.r.t. the
activation's output. ``act_backward`` runs one Triton kernel (fp32 math for fp16/bf16, fp64 for
fp64) when the tensors can go to Triton (CUDA, or CPU under TRITON_INTERPRET=1), and otherwise
PyTorch's own backward ops, so it always matches ``torch.autograd.grad(act(z), z, g)``.

Derivatives, written as PyTorch's backward kernels write them:
  relu       g * (z > 0)
  gelu       g * (Phi(z) + z * phi(z)),  Phi(z) = 0.5 * (1 + erf(z / sqrt 2)), phi(z) = exp(-z^2/2) / sqrt(2 pi)
  gelu_tanh  g * (0.5 * (1 + th) + 0.5 * z * (1 - th^2) * k * (1 + 3 * 0.044715 * z^2)),
             th = tanh(k * (z + 0.044715 * z^3)), k = sqrt(2 / pi)
  tanh       g * (1 - tanh(z)^2)
  sigmoid    g * (1 - s) * s,  s = sigmoid(z)
  silu       g * s * (1 + z * (1 - s))
"""
import torch
from torch import Tensor

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu")


def act_backward_torch(z: Tensor, g: Tensor, activation: str) -> Tensor:
    """The plain PyTorch path: the same backward ops autograd runs."""
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward(g, z, 0)
    if activation == "gelu":
        return aten.gelu_backward(g, z, approximate="none")
    if activation == "gelu_tanh":
        return aten.gelu_backward(g, z, approximate="tanh")
    if activation == "tanh":
        return aten.tanh_backward(g, torch.tanh(z))
    if activation == "sigmoid":
        return aten.sigmoid_backward(g, torch.sigmoid(z))
    if activation == "silu":
        return aten.silu_backward(g, z)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def triton_available() -> bool:
    """Whether the Triton kernel can run here (triton imports, and a GPU or TRITON_INTERPRET=1)."""
    from ..backends import triton as backend
    return backend.available()[0]


def _triton_usable(z: Tensor) -> bool:
    if not triton_available():
        return False
    from . import runtime
    return z.device.type == ("cpu" if runtime.interpreting() else "cuda") and z.dtype in runtime.TORCH_TO_TL


def act_backward(z: Tensor, g: Tensor, activation: str) -> Tensor:
    """dz = act'(z) * g for ``activation`` in ACTIVATIONS; Triton when usable, PyTorch otherwise."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if z.shape != g.shape:
        raise ValueError(f"z and g must have the same shape, got {tuple(z.shape)} and {tuple(g.shape)}")
    if z.dtype != g.dtype or z.device != g.device or not _triton_usable(z):
        return act_backward_torch(z, g, activation)
    from .svi_backward_kernel import act_backward_triton
    return act_backward_triton(z, g, activation)
