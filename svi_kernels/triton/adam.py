"""Fused multi-tensor Adam/AdamW step: one launch for a whole (device, dtype) group.

Per element this is ``adam_elem`` of csrc/include/svi_kernels/update_math.h, operation for
operation; the host computes the coefficients in double exactly as the C++ callers do.

``adam_step_tensor`` is the AMP / capturable variant: lr (a tensor or a number), each tensor's
step count (a small table of pointers to the 0-d step tensors), the loss scale and the skip flag
are read by the kernel, so the host never waits for the device; the bias corrections are then
computed in float64 in the kernel (``adam_bias_corrections``), and the gradients are unscaled
in place (``unscale_grad``) before the update.

``max_exp_avg_sqs`` given (both ops): AMSGrad, a fifth list in the pointer table (AMSGRAD
constexpr): max_v = max(max_v, v), and the denominator uses max_v (``adam_amsgrad_elem``).

The moments may be stored in STATE_DTYPE (another dtype than the params, issue 24); SR: bf16
moments stochastically rounded from ``state_seed`` (state_storage.py), or int8 codes (STATE_DTYPE uint8) with
float32 block scales (``exp_avg_scales``..., a second pointer table ``sptrs``; QBLOCK the block size).
"""
from typing import List, Optional, Union

import triton
import triton.language as tl
from torch import Tensor

from ..backends.state_storage import DEFAULT_BLOCK_SIZE, check_state_seed
from . import runtime
from .runtime import device_function
from .ieee import chunk_of_program, div_rn, pow_f64, sqrt_rn, tensor_ptr, to_storage
from .state_storage import load_state, scales_ptr, sr_key, store_state
from .table import Group, pointer_table

_STATE = {2: "exp_avgs", 3: "exp_avg_sqs", 4: "max_exp_avg_sqs"}  # list index -> name


@device_function
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, offs, mask,
                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_sqrt,
                grad_scale, key, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr,
                QBLOCK: tl.constexpr, COMPUTE: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, AMSGRAD: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    m = load_state(m_ptr, ms_ptr, offs, mask, True, STATE_DTYPE, COMPUTE, QBLOCK)
    v = load_state(v_ptr, vs_ptr, offs, mask, False, STATE_DTYPE, COMPUTE, QBLOCK)
    if UNSCALE:  # unscale_grad (update_math.h); the unscaled gradient is written back
        g = div_rn(g, grad_scale)
        tl.store(g_ptr + offs, to_storage(g, DTYPE), mask=mask)
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
    second = v
    if AMSGRAD:  # adam_amsgrad_elem: max_v = max(max_v, v) feeds the denominator
        vmax = load_state(vmax_ptr, vmaxs_ptr, offs, mask, False, STATE_DTYPE, COMPUTE, QBLOCK)
        second = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
    denom = div_rn(sqrt_rn(second), bc2_sqrt) + eps
    p = p - step_size * div_rn(m, denom)
    # ---
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)
    store_state(m_ptr, offs, mask, m, key, 0, STATE_DTYPE, SR, ms_ptr, QBLOCK)
    store_state(v_ptr, offs, mask, v, key, 1, STATE_DTYPE, SR, vs_ptr, QBLOCK)
    if AMSGRAD:
        store_state(vmax_ptr, offs, mask, second, key, 2, STATE_DTYPE, SR, vmaxs_ptr, QBLOCK)


@device_function
def _adam_span(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, start, full_end, end,
               one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_sqrt, grad_scale,
               key, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr, QBLOCK: tl.constexpr,
               COMPUTE: tl.constexpr,
               BLOCK: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
               MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr, AMSGRAD: tl.constexpr):
    """_adam_block over a program's chunk: the whole blocks unmasked (they vectorise), then the tail."""
    for first in range(start, full_end, BLOCK):
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, first + tl.arange(0, BLOCK), None,
                    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_sqrt,
                    grad_scale, key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, DECOUPLED, HAS_WEIGHT_DECAY, MAXIMIZE,
                    UNSCALE, AMSGRAD)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, offs, offs < end,
                    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bc2_sqrt,
                    grad_scale, key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, DECOUPLED, HAS_WEIGHT_DECAY, MAXIMIZE,
                    UNSCALE, AMSGRAD)


@triton.jit(do_not_specialize=["state_seed"])
def adam_step_kernel(ptrs, chunks, sptrs,
                     one_minus_beta1: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
                     eps: tl.float64, weight_decay: tl.float64, decay: tl.float64,
                     step_size: tl.float64, bias_correction2_sqrt: tl.float64, state_seed,
                     DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr, QBLOCK: tl.constexpr,
                     COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                     DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
                     AMSGRAD: tl.constexpr, N_LISTS: tl.constexpr):
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, N_LISTS, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, N_LISTS, DTYPE, ALIGNED)
    m_ptr = tensor_ptr(ptrs, t, 2, N_LISTS, STATE_DTYPE, ALIGNED)
    v_ptr = tensor_ptr(ptrs, t, 3, N_LISTS, STATE_DTYPE, ALIGNED)
    vmax_ptr = v_ptr
    if AMSGRAD:
        vmax_ptr = tensor_ptr(ptrs, t, 4, N_LISTS, STATE_DTYPE, ALIGNED)
    ms_ptr = scales_ptr(sptrs, t, 2, N_LISTS, STATE_DTYPE)
    vs_ptr = scales_ptr(sptrs, t, 3, N_LISTS, STATE_DTYPE)
    vmaxs_ptr = vs_ptr
    if AMSGRAD:
        vmaxs_ptr = scales_ptr(sptrs, t, 4, N_LISTS, STATE_DTYPE)
    key = sr_key(state_seed, t)
    c_one_minus_beta1 = tl.full([], one_minus_beta1, COMPUTE)
    c_beta2 = tl.full([], beta2, COMPUTE)
    c_one_minus_beta2 = tl.full([], one_minus_beta2, COMPUTE)
    c_eps = tl.full([], eps, COMPUTE)
    c_weight_decay = tl.full([], weight_decay, COMPUTE)
    c_decay = tl.full([], decay, COMPUTE)
    c_step_size = tl.full([], step_size, COMPUTE)
    c_bc2_sqrt = tl.full([], bias_correction2_sqrt, COMPUTE)
    _adam_span(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, start, full_end, end,
               c_one_minus_beta1, c_beta2, c_one_minus_beta2, c_eps, c_weight_decay, c_decay, c_step_size,
               c_bc2_sqrt, c_bc2_sqrt, key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, BLOCK, DECOUPLED, HAS_WEIGHT_DECAY,
               MAXIMIZE, False, AMSGRAD)


def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
              bias_correction1: float, bias_correction2_sqrt: float, maximize: bool = False,
              max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
              exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
              max_exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    check_state_seed("adam_step", state_seed)
    amsgrad = max_exp_avg_sqs is not None
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    group = Group(lists, written=(0, 2, 3, 4) if amsgrad else (0, 2, 3), op="adam_step", state=_STATE,
                  scales={2: exp_avg_scales, 3: exp_avg_sq_scales, 4: max_exp_avg_sq_scales}, block_size=block_size)
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    block, chunk = group.block_shape()
    ptrs, chunks, aligned = group.tables(chunk)
    lr, weight_decay = float(lr), float(weight_decay)
    # Coefficients in double, as the C++ callers of update_math.h compute them.
    args = (ptrs, chunks, group.scale_table(chunks), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), weight_decay,
            1.0 - lr * weight_decay, lr / float(bias_correction1), float(bias_correction2_sqrt), state_seed or 0)
    constexprs = dict(DTYPE=dtype, **runtime.state_types(group, state_seed), COMPUTE=compute, BLOCK=block,
                      ALIGNED=aligned, DECOUPLED=bool(decoupled), HAS_WEIGHT_DECAY=weight_decay != 0.0,
                      MAXIMIZE=bool(maximize), AMSGRAD=amsgrad, N_LISTS=len(lists))
    runtime.launch(adam_step_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()


@triton.jit(do_not_specialize=["state_seed"])
def adam_step_tensor_kernel(ptrs, chunks, sptrs, step_ptrs, lr_ptr, grad_scale_ptr, found_inf_ptr,
                            lr_value: tl.float64, beta1: tl.float64, beta2: tl.float64, eps: tl.float64,
                            weight_decay: tl.float64, state_seed,
                            DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr,
                            QBLOCK: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                            DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
                            CORRECT_BIAS: tl.constexpr, STEP_DTYPE: tl.constexpr, LR_FROM_PTR: tl.constexpr,
                            UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, AMSGRAD: tl.constexpr,
                            N_LISTS: tl.constexpr):
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    if HAS_FOUND_INF:  # a skipped step (inf/nan in the scaled grads) touches nothing
        run = tl.load(found_inf_ptr).to(tl.float64) == 0.0
        full_end = tl.where(run, full_end, start)
        end = tl.where(run, end, start)
    p_ptr = tensor_ptr(ptrs, t, 0, N_LISTS, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, N_LISTS, DTYPE, ALIGNED)
    m_ptr = tensor_ptr(ptrs, t, 2, N_LISTS, STATE_DTYPE, ALIGNED)
    v_ptr = tensor_ptr(ptrs, t, 3, N_LISTS, STATE_DTYPE, ALIGNED)
    vmax_ptr = v_ptr
    if AMSGRAD:
        vmax_ptr = tensor_ptr(ptrs, t, 4, N_LISTS, STATE_DTYPE, ALIGNED)
    ms_ptr = scales_ptr(sptrs, t, 2, N_LISTS, STATE_DTYPE)
    vs_ptr = scales_ptr(sptrs, t, 3, N_LISTS, STATE_DTYPE)
    vmaxs_ptr = vs_ptr
    if AMSGRAD:
        vmaxs_ptr = scales_ptr(sptrs, t, 4, N_LISTS, STATE_DTYPE)
    key = sr_key(state_seed, t)
    # Coefficients in float64 as the host computes them, then rounded once to the compute dtype.
    one = tl.full([], 1.0, tl.float64)
    b1 = tl.full([], beta1, tl.float64)
    b2 = tl.full([], beta2, tl.float64)
    wd = tl.full([], weight_decay, tl.float64)
    lr = tl.full([], lr_value, tl.float64)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    step_size = lr
    bc2_sqrt = one
    if CORRECT_BIAS:  # adam_bias_corrections (update_math.h)
        step = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(STEP_DTYPE))).to(tl.float64)
        step_size = lr / (one - pow_f64(b1, step))
        bc2_sqrt = tl.sqrt(one - pow_f64(b2, step))
    c_one_minus_beta1 = (one - b1).to(COMPUTE)
    c_beta2 = b2.to(COMPUTE)
    c_one_minus_beta2 = (one - b2).to(COMPUTE)
    c_eps = tl.full([], eps, COMPUTE)
    c_weight_decay = wd.to(COMPUTE)
    c_decay = (one - lr * wd).to(COMPUTE)
    c_step_size = step_size.to(COMPUTE)
    c_bc2_sqrt = bc2_sqrt.to(COMPUTE)
    c_grad_scale = c_bc2_sqrt
    if UNSCALE:
        c_grad_scale = tl.load(grad_scale_ptr).to(COMPUTE)
    _adam_span(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, start, full_end, end,
               c_one_minus_beta1, c_beta2, c_one_minus_beta2, c_eps, c_weight_decay, c_decay, c_step_size,
               c_bc2_sqrt, c_grad_scale, key, DTYPE, STATE_DTYPE, SR, QBLOCK, COMPUTE, BLOCK, DECOUPLED, HAS_WEIGHT_DECAY,
               MAXIMIZE, UNSCALE, AMSGRAD)


def adam_step_tensor(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                     state_steps: List[Tensor], *, lr: Union[float, Tensor], beta1: float, beta2: float, eps: float,
                     weight_decay: float, decoupled: bool, correct_bias: bool, maximize: bool = False,
                     grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
                     max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
                     exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
                     max_exp_avg_sq_scales: Optional[List[Tensor]] = None,
                     block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    check_state_seed("adam_step_tensor", state_seed)
    amsgrad = max_exp_avg_sqs is not None
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    written = (0, 2, 3) if grad_scale is None else (0, 1, 2, 3)
    group = Group(lists, written=written + ((4,) if amsgrad else ()), op="adam_step_tensor", state=_STATE,
                  scales={2: exp_avg_scales, 3: exp_avg_sq_scales, 4: max_exp_avg_sq_scales}, block_size=block_size)
    if len(state_steps) != group.n_tensors:
        raise ValueError(f"state_steps has {len(state_steps)} tensors, expected {group.n_tensors}")
    if group.n_elements == 0:
        return
    runtime.check_device(group.device)
    dtype, compute = runtime.element_types(group.dtype)
    block, chunk = group.block_shape()
    ptrs, chunks, aligned = group.tables(chunk)
    lr_ptr, lr_value = runtime.scalar_arg(lr, group.device, "lr", chunks)
    step_ptrs, step_dtype = chunks, tl.float32
    if correct_bias:
        step_dtype = runtime.step_dtype(state_steps, group.device)
        step_ptrs = pointer_table([state_steps], group.device)[0]
    weight_decay = float(weight_decay)
    args = (ptrs, chunks, group.scale_table(chunks), step_ptrs, lr_ptr, runtime.tensor_arg(grad_scale, group.device, "grad_scale", chunks),
            runtime.tensor_arg(found_inf, group.device, "found_inf", chunks),
            lr_value, float(beta1), float(beta2), float(eps), weight_decay, state_seed or 0)
    constexprs = dict(DTYPE=dtype, **runtime.state_types(group, state_seed), COMPUTE=compute, BLOCK=block,
                      ALIGNED=aligned, DECOUPLED=bool(decoupled), HAS_WEIGHT_DECAY=weight_decay != 0.0,
                      MAXIMIZE=bool(maximize), CORRECT_BIAS=bool(correct_bias), STEP_DTYPE=step_dtype,
                      LR_FROM_PTR=isinstance(lr, Tensor), UNSCALE=grad_scale is not None,
                      HAS_FOUND_INF=found_inf is not None, AMSGRAD=amsgrad, N_LISTS=len(lists))
    runtime.launch(adam_step_tensor_kernel, chunks.shape[0], args, constexprs, group.device)
    group.finish()
