"""Fused multi-tensor momentum SGD step (the SVI-SGD base): one launch per (device, dtype) group.

Per element this is ``sgd_momentum_elem`` of csrc/include/svi_kernels/update_math.h.
"""
from typing import List

import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .runtime import device_function
from .ieee import chunk_of_program, tensor_ptr, to_storage
from .table import Group


@device_function
def _sgd_block(p_ptr, g_ptr, b_ptr, offs, mask, lr, momentum, weight_decay,
               DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
               NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    buf = tl.load(b_ptr + offs, mask=mask).to(COMPUTE)
    # --- sgd_momentum_elem (update_math.h)
    if MAXIMIZE:
        g = 0.0 - g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * p
    buf = momentum * buf + g
    if NESTEROV:
        d = g + momentum * buf
    else:
        d = buf
    p = p - lr * d
    # ---
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)
    tl.store(b_ptr + offs, to_storage(buf, DTYPE), mask=mask)


@triton.jit
def sgd_momentum_step_kernel(ptrs, chunks, lr: tl.float64, momentum: tl.float64, weight_decay: tl.float64,
                             DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                             NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, 3, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, 3, DTYPE, ALIGNED)
    b_ptr = tensor_ptr(ptrs, t, 2, 3, DTYPE, ALIGNED)
    c_lr = tl.full([], lr, COMPUTE)
    c_momentum = tl.full([], momentum, COMPUTE)
    c_weight_decay = tl.full([], weight_decay, COMPUTE)
    for first in range(start, full_end, BLOCK):
        _sgd_block(p_ptr, g_ptr, b_ptr, first + tl.arange(0, BLOCK), None, c_lr, c_momentum, c_weight_decay,
                   DTYPE, COMPUTE, NESTEROV, HAS_WEIGHT_DECAY, MAXIMIZE)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < end, c_lr, c_momentum, c_weight_decay,
                   DTYPE, COMPUTE, NESTEROV, HAS_WEIGHT_DECAY, MAXIMIZE)


def sgd_momentum_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                      lr: float, momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False) -> None:
    group = Group([params, grads, momentum_buffers], written=(0, 2))
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    block, chunk = group.block_shape()
    ptrs, chunks, aligned = group.tables(chunk)
    args = (ptrs, chunks, float(lr), float(momentum), float(weight_decay))
    constexprs = dict(DTYPE=dtype, COMPUTE=compute, BLOCK=block, ALIGNED=aligned, NESTEROV=bool(nesterov),
                      HAS_WEIGHT_DECAY=float(weight_decay) != 0.0, MAXIMIZE=bool(maximize))
    runtime.launch(sgd_momentum_step_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()
