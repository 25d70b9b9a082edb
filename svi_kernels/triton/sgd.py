"""Fused multi-tensor momentum SGD step (the SVI-SGD base): one launch per (device, dtype) group.

Per element this is ``sgd_momentum_elem`` of csrc/include/svi_kernels/update_math.h.
``sgd_momentum_step_tensor`` is the AMP / capturable variant: lr (a tensor or a number), the loss
scale and the skip flag are read by the kernel (see adam.py). The momentum buffers may be stored in
STATE_DTYPE, stochastically rounded (SR) to bf16 from ``state_seed`` (state_storage.py), or as int8 codes with
float32 block scales (``momentum_buffer_scales``; see adam.py).
"""
from typing import List, Optional, Union

import triton
import triton.language as tl
from torch import Tensor

from ..backends.state_storage import DEFAULT_BLOCK_SIZE, check_state_seed
from . import runtime
from .runtime import device_function
from .ieee import chunk_of_program, div_rn, tensor_ptr, to_storage
from .state_storage import load_state, scales_ptr, sr_key, store_state
from .table import Group

_STATE = {2: "momentum_buffers"}


@device_function
def _sgd_block(p_ptr, g_ptr, b_ptr, bs_ptr, offs, mask, lr, momentum, weight_decay, one_minus_dampening, grad_scale,
               key, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr, QBLOCK: tl.constexpr,
               COMPUTE: tl.constexpr,
               NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
               UNSCALE: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    buf = load_state(b_ptr, bs_ptr, offs, mask, True, STATE_DTYPE, COMPUTE, QBLOCK)
    if UNSCALE:  # unscale_grad (update_math.h); the unscaled gradient is written back
        g = div_rn(g, grad_scale)
        tl.store(g_ptr + offs, to_storage(g, DTYPE), mask=mask)
    # --- sgd_momentum_elem (update_math.h)
    if MAXIMIZE:
        g = 0.0 - g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * p
    buf = momentum * buf + one_minus_dampening * g
    if NESTEROV:
        d = g + momentum * buf
    else:
        d = buf
    p = p - lr * d
    # ---
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)
    store_state(b_ptr, offs, mask, buf, key, 0, STATE_DTYPE, SR, bs_ptr, QBLOCK)


@device_function
def _sgd_span(p_ptr, g_ptr, b_ptr, bs_ptr, start, full_end, end, lr, momentum, weight_decay, one_minus_dampening,
              grad_scale, key, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr, QBLOCK: tl.constexpr,
              COMPUTE: tl.constexpr, BLOCK: tl.constexpr, NESTEROV: tl.constexpr,
              HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr):
    """_sgd_block over a program's chunk: the whole blocks unmasked (they vectorise), then the tail."""
    for first in range(start, full_end, BLOCK):
        _sgd_block(p_ptr, g_ptr, b_ptr, bs_ptr, first + tl.arange(0, BLOCK), None, lr, momentum, weight_decay,
                   one_minus_dampening, grad_scale, key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, NESTEROV, HAS_WEIGHT_DECAY,
                   MAXIMIZE, UNSCALE)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _sgd_block(p_ptr, g_ptr, b_ptr, bs_ptr, offs, offs < end, lr, momentum, weight_decay,
                   one_minus_dampening, grad_scale, key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, NESTEROV, HAS_WEIGHT_DECAY,
                   MAXIMIZE, UNSCALE)


@triton.jit(do_not_specialize=["state_seed"])
def sgd_momentum_step_kernel(ptrs, chunks, sptrs, lr: tl.float64, momentum: tl.float64, weight_decay: tl.float64,
                             one_minus_dampening: tl.float64, state_seed,
                             DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr,
                             QBLOCK: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                             NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, 3, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, 3, DTYPE, ALIGNED)
    b_ptr = tensor_ptr(ptrs, t, 2, 3, STATE_DTYPE, ALIGNED)
    bs_ptr = scales_ptr(sptrs, t, 2, 3, STATE_DTYPE)
    key = sr_key(state_seed, t)
    c_lr = tl.full([], lr, COMPUTE)
    c_momentum = tl.full([], momentum, COMPUTE)
    c_weight_decay = tl.full([], weight_decay, COMPUTE)
    c_keep = tl.full([], one_minus_dampening, COMPUTE)
    _sgd_span(p_ptr, g_ptr, b_ptr, bs_ptr, start, full_end, end, c_lr, c_momentum, c_weight_decay, c_keep, c_lr,
              key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, BLOCK, NESTEROV, HAS_WEIGHT_DECAY, MAXIMIZE, False)


def sgd_momentum_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                      lr: float, momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False,
                      dampening: float = 0.0, state_seed: Optional[int] = None,
                      momentum_buffer_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    check_state_seed("sgd_momentum_step", state_seed)
    group = Group([params, grads, momentum_buffers], written=(0, 2), op="sgd_momentum_step", state=_STATE,
                  scales={2: momentum_buffer_scales}, block_size=block_size)
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    block, chunk = group.block_shape()
    ptrs, chunks, aligned = group.tables(chunk)
    args = (ptrs, chunks, group.scale_table(chunks), float(lr), float(momentum), float(weight_decay), 1.0 - float(dampening), state_seed or 0)
    constexprs = dict(DTYPE=dtype, **runtime.state_types(group, state_seed), COMPUTE=compute, BLOCK=block,
                      ALIGNED=aligned, NESTEROV=bool(nesterov), HAS_WEIGHT_DECAY=float(weight_decay) != 0.0,
                      MAXIMIZE=bool(maximize))
    runtime.launch(sgd_momentum_step_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()


@triton.jit(do_not_specialize=["state_seed"])
def sgd_momentum_step_tensor_kernel(ptrs, chunks, sptrs, lr_ptr, grad_scale_ptr, found_inf_ptr, lr_value: tl.float64,
                                    momentum: tl.float64, weight_decay: tl.float64, one_minus_dampening: tl.float64,
                                    state_seed, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr,
                                    QBLOCK: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                                    ALIGNED: tl.constexpr, NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                                    MAXIMIZE: tl.constexpr, LR_FROM_PTR: tl.constexpr, UNSCALE: tl.constexpr,
                                    HAS_FOUND_INF: tl.constexpr):
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    if HAS_FOUND_INF:  # a skipped step (inf/nan in the scaled grads) touches nothing
        run = tl.load(found_inf_ptr).to(tl.float64) == 0.0
        full_end = tl.where(run, full_end, start)
        end = tl.where(run, end, start)
    p_ptr = tensor_ptr(ptrs, t, 0, 3, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, 3, DTYPE, ALIGNED)
    b_ptr = tensor_ptr(ptrs, t, 2, 3, STATE_DTYPE, ALIGNED)
    bs_ptr = scales_ptr(sptrs, t, 2, 3, STATE_DTYPE)
    key = sr_key(state_seed, t)
    c_lr = tl.full([], lr_value, COMPUTE)
    if LR_FROM_PTR:
        c_lr = tl.load(lr_ptr).to(tl.float64).to(COMPUTE)
    c_momentum = tl.full([], momentum, COMPUTE)
    c_weight_decay = tl.full([], weight_decay, COMPUTE)
    c_keep = tl.full([], one_minus_dampening, COMPUTE)
    c_grad_scale = c_lr
    if UNSCALE:
        c_grad_scale = tl.load(grad_scale_ptr).to(COMPUTE)
    _sgd_span(p_ptr, g_ptr, b_ptr, bs_ptr, start, full_end, end, c_lr, c_momentum, c_weight_decay, c_keep,
              c_grad_scale, key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, BLOCK, NESTEROV, HAS_WEIGHT_DECAY, MAXIMIZE, UNSCALE)


def sgd_momentum_step_tensor(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                             lr: Union[float, Tensor], momentum: float, nesterov: bool, weight_decay: float,
                             maximize: bool = False, grad_scale: Optional[Tensor] = None,
                             found_inf: Optional[Tensor] = None, dampening: float = 0.0,
                             state_seed: Optional[int] = None, momentum_buffer_scales: Optional[List[Tensor]] = None,
                             block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    check_state_seed("sgd_momentum_step_tensor", state_seed)
    group = Group([params, grads, momentum_buffers], written=(0, 2) if grad_scale is None else (0, 1, 2),
                  op="sgd_momentum_step_tensor", state=_STATE, scales={2: momentum_buffer_scales},
                  block_size=block_size)
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    block, chunk = group.block_shape()
    ptrs, chunks, aligned = group.tables(chunk)
    lr_ptr, lr_value = runtime.scalar_arg(lr, group.device, "lr", chunks)
    args = (ptrs, chunks, group.scale_table(chunks), lr_ptr, runtime.tensor_arg(grad_scale, group.device, "grad_scale", chunks),
            runtime.tensor_arg(found_inf, group.device, "found_inf", chunks),
            lr_value, float(momentum), float(weight_decay), 1.0 - float(dampening), state_seed or 0)
    constexprs = dict(DTYPE=dtype, **runtime.state_types(group, state_seed), COMPUTE=compute, BLOCK=block,
                      ALIGNED=aligned, NESTEROV=bool(nesterov), HAS_WEIGHT_DECAY=float(weight_decay) != 0.0,
                      MAXIMIZE=bool(maximize), LR_FROM_PTR=isinstance(lr, Tensor), UNSCALE=grad_scale is not None,
                      HAS_FOUND_INF=found_inf is not None)
    runtime.launch(sgd_momentum_step_tensor_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()
