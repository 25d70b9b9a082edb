"""The Triton kernel behind ``svi_backward.act_backward`` (imported only when Triton can run)."""
import torch
import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .ieee import to_storage
from .runtime import device_function


@device_function
def _tanh(x):
    # exp-based and overflow-free: tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1].
    e = tl.exp(-2.0 * tl.abs(x))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -th, th)


@device_function
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(0.0 - x))


@triton.jit
def act_backward_kernel(z_ptr, g_ptr, out_ptr, n, ACTIVATION: tl.constexpr, DTYPE: tl.constexpr,
                        COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    # Constants: 1/sqrt(2), 1/sqrt(2 pi), sqrt(2/pi) and the tanh-GELU cubic coefficient 0.044715.
    if ACTIVATION == "relu":
        dz = tl.where(z > 0, g, 0.0)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(z * z * -0.5) * 0.3989422804014327
        dz = g * (cdf + z * pdf)
    elif ACTIVATION == "gelu_tanh":
        z_sq = z * z
        inner = 0.7978845608028654 * (z + 0.044715 * (z_sq * z))
        th = _tanh(inner)
        left_derivative = 0.5 * (1.0 + th)
        right_derivative = (0.5 * z) * (1.0 - th * th) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z_sq))
        dz = g * (left_derivative + right_derivative)
    elif ACTIVATION == "tanh":
        # autograd differentiates through the stored output, rounded to the tensor dtype
        y = to_storage(_tanh(z), DTYPE).to(COMPUTE)
        dz = g * (1.0 - y * y)
    elif ACTIVATION == "sigmoid":
        s = to_storage(_sigmoid(z), DTYPE).to(COMPUTE)
        dz = g * (1.0 - s) * s
    else:  # silu
        s = _sigmoid(z)
        dz = g * s * (1.0 + z * (1.0 - s))
    tl.store(out_ptr + offs, to_storage(dz, DTYPE), mask=mask)


def act_backward_triton(z: Tensor, g: Tensor, activation: str) -> Tensor:
    runtime.check_device(z.device)
    dtype, compute = runtime.element_types(z.dtype)
    z_c, g_c = z.contiguous(), g.contiguous()
    out = torch.empty_like(z_c)
    n = z_c.numel()
    if n == 0:
        return out.view_as(z)
    block = runtime.block_shape(n)[0]
    runtime.launch(act_backward_kernel, triton.cdiv(n, block), (z_c, g_c, out, n),
                   dict(ACTIVATION=activation, DTYPE=dtype, COMPUTE=compute, BLOCK=block), z.device)
    return out.view_as(z)
