"""Fused multi-tensor Adam/AdamW step: one launch for a whole (device, dtype) group.

Per element this is ``adam_elem`` of csrc/include/svi_kernels/update_math.h, operation for
operation; the host computes the coefficients in double exactly as the C++ callers do.
"""
from typing import List

import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .runtime import device_function
from .ieee import chunk_of_program, div_rn, sqrt_rn, tensor_ptr, to_storage
from .table import Group


@device_function
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask,
                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_sqrt,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
    # --- adam_elem (update_math.h)
    if MAXIMIZE:
        g = 0.0 - g
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = div_rn(sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * div_rn(m, denom)
    # ---
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)
    tl.store(m_ptr + offs, to_storage(m, DTYPE), mask=mask)
    tl.store(v_ptr + offs, to_storage(v, DTYPE), mask=mask)


@triton.jit
def adam_step_kernel(ptrs, chunks,
                     one_minus_beta1: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
                     eps: tl.float64, weight_decay: tl.float64, decay: tl.float64,
                     step_size: tl.float64, bias_correction2_sqrt: tl.float64,
                     DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                     DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, 4, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, 4, DTYPE, ALIGNED)
    m_ptr = tensor_ptr(ptrs, t, 2, 4, DTYPE, ALIGNED)
    v_ptr = tensor_ptr(ptrs, t, 3, 4, DTYPE, ALIGNED)
    c_one_minus_beta1 = tl.full([], one_minus_beta1, COMPUTE)
    c_beta2 = tl.full([], beta2, COMPUTE)
    c_one_minus_beta2 = tl.full([], one_minus_beta2, COMPUTE)
    c_eps = tl.full([], eps, COMPUTE)
    c_weight_decay = tl.full([], weight_decay, COMPUTE)
    c_decay = tl.full([], decay, COMPUTE)
    c_step_size = tl.full([], step_size, COMPUTE)
    c_bc2_sqrt = tl.full([], bias_correction2_sqrt, COMPUTE)
    for first in range(start, full_end, BLOCK):
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, first + tl.arange(0, BLOCK), None,
                    c_one_minus_beta1, c_beta2, c_one_minus_beta2, c_eps, c_weight_decay, c_decay, c_step_size,
                    c_bc2_sqrt, DTYPE, COMPUTE, DECOUPLED, HAS_WEIGHT_DECAY, MAXIMIZE)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < end,
                    c_one_minus_beta1, c_beta2, c_one_minus_beta2, c_eps, c_weight_decay, c_decay, c_step_size,
                    c_bc2_sqrt, DTYPE, COMPUTE, DECOUPLED, HAS_WEIGHT_DECAY, MAXIMIZE)


def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
              bias_correction1: float, bias_correction2_sqrt: float, maximize: bool = False) -> None:
    group = Group([params, grads, exp_avgs, exp_avg_sqs], written=(0, 2, 3))
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    block, chunk = group.block_shape()
    ptrs, chunks, aligned = group.tables(chunk)
    lr, weight_decay = float(lr), float(weight_decay)
    # Coefficients in double, as the C++ callers of update_math.h compute them.
    args = (ptrs, chunks, 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), weight_decay,
            1.0 - lr * weight_decay, lr / float(bias_correction1), float(bias_correction2_sqrt))
    constexprs = dict(DTYPE=dtype, COMPUTE=compute, BLOCK=block, ALIGNED=aligned, DECOUPLED=bool(decoupled),
                      HAS_WEIGHT_DECAY=weight_decay != 0.0, MAXIMIZE=bool(maximize))
    runtime.launch(adam_step_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()
