"""Fused multi-tensor momentum SGD step (the SVI-SGD base): one launch per (device, dtype) group.

Per element this is ``sgd_momentum_elem`` of csrc/include/svi_kernels/update_math.h.
"""
from typing import List

import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .ieee import as_compute, chunk_of_program, tensor_ptr
from .table import Group


@triton.jit
def sgd_momentum_step_kernel(ptrs, chunks, lr: tl.float64, momentum: tl.float64, weight_decay: tl.float64,
                             DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                             NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    t, start, end = chunk_of_program(chunks)
    p_ptr = tensor_ptr(ptrs, t, 0, 3, DTYPE)
    g_ptr = tensor_ptr(ptrs, t, 1, 3, DTYPE)
    b_ptr = tensor_ptr(ptrs, t, 2, 3, DTYPE)
    c_lr = as_compute(lr, COMPUTE)
    c_momentum = as_compute(momentum, COMPUTE)
    c_weight_decay = as_compute(weight_decay, COMPUTE)
    for first in range(start, end, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < end
        p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
        g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
        buf = tl.load(b_ptr + offs, mask=mask).to(COMPUTE)
        # --- sgd_momentum_elem (update_math.h)
        if MAXIMIZE:
            g = 0.0 - g
        if HAS_WEIGHT_DECAY:
            g = g + c_weight_decay * p
        buf = c_momentum * buf + g
        if NESTEROV:
            d = g + c_momentum * buf
        else:
            d = buf
        p = p - c_lr * d
        # ---
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
        tl.store(b_ptr + offs, buf.to(DTYPE), mask=mask)


def sgd_momentum_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                      lr: float, momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False) -> None:
    block, chunk = runtime.block_shape()
    group = Group([params, grads, momentum_buffers], written=(0, 2), chunk=chunk)
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    ptrs, chunks = group.tables()
    args = (ptrs, chunks, float(lr), float(momentum), float(weight_decay))
    constexprs = dict(DTYPE=dtype, COMPUTE=compute, BLOCK=block, NESTEROV=bool(nesterov),
                      HAS_WEIGHT_DECAY=float(weight_decay) != 0.0, MAXIMIZE=bool(maximize))
    runtime.launch(sgd_momentum_step_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()
