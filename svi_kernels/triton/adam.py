"""Fused multi-tensor Adam/AdamW step: one launch for a whole (device, dtype) group.

Per element this is ``adam_elem`` of csrc/include/svi_kernels/update_math.h, operation for
operation; the host computes the coefficients in double exactly as the C++ callers do.
"""
from typing import List

import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .ieee import as_compute, chunk_of_program, div_rn, sqrt_rn, tensor_ptr
from .table import Group


@triton.jit
def adam_step_kernel(ptrs, chunks,
                     one_minus_beta1: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
                     eps: tl.float64, weight_decay: tl.float64, decay: tl.float64,
                     step_size: tl.float64, bias_correction2_sqrt: tl.float64,
                     DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                     DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    t, start, end = chunk_of_program(chunks)
    p_ptr = tensor_ptr(ptrs, t, 0, 4, DTYPE)
    g_ptr = tensor_ptr(ptrs, t, 1, 4, DTYPE)
    m_ptr = tensor_ptr(ptrs, t, 2, 4, DTYPE)
    v_ptr = tensor_ptr(ptrs, t, 3, 4, DTYPE)
    c_one_minus_beta1 = as_compute(one_minus_beta1, COMPUTE)
    c_beta2 = as_compute(beta2, COMPUTE)
    c_one_minus_beta2 = as_compute(one_minus_beta2, COMPUTE)
    c_eps = as_compute(eps, COMPUTE)
    c_weight_decay = as_compute(weight_decay, COMPUTE)
    c_decay = as_compute(decay, COMPUTE)
    c_step_size = as_compute(step_size, COMPUTE)
    c_bc2_sqrt = as_compute(bias_correction2_sqrt, COMPUTE)
    for first in range(start, end, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < end
        p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
        g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
        m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
        v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
        # --- adam_elem (update_math.h)
        if MAXIMIZE:
            g = 0.0 - g
        if HAS_WEIGHT_DECAY:
            if DECOUPLED:
                p = p * c_decay
            else:
                g = g + c_weight_decay * p
        m = m + c_one_minus_beta1 * (g - m)
        v = c_beta2 * v + c_one_minus_beta2 * (g * g)
        denom = div_rn(sqrt_rn(v), c_bc2_sqrt) + c_eps
        p = p - c_step_size * div_rn(m, denom)
        # ---
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
              bias_correction1: float, bias_correction2_sqrt: float, maximize: bool = False) -> None:
    block, chunk = runtime.block_shape()
    group = Group([params, grads, exp_avgs, exp_avg_sqs], written=(0, 2, 3), chunk=chunk)
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    ptrs, chunks = group.tables()
    lr, weight_decay = float(lr), float(weight_decay)
    args = (ptrs, chunks, 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), weight_decay,
            1.0 - lr * weight_decay, lr / float(bias_correction1), float(bias_correction2_sqrt))
    constexprs = dict(DTYPE=dtype, COMPUTE=compute, BLOCK=block, DECOUPLED=bool(decoupled),
                      HAS_WEIGHT_DECAY=weight_decay != 0.0, MAXIMIZE=bool(maximize))
    runtime.launch(adam_step_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()
