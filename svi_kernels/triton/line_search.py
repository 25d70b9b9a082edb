"""Fused multi-tensor phases of the Armijo line search, one launch each per (device, dtype) group.

(a) ``ls_save_sgd`` / ``ls_save_adam``: save w0 = p (ls_save_sgd given an empty w0 saves nothing:
    the Adam searches' read-only gradient check; Adam also updates the moments and, given a
    ``dirs`` list, writes the search direction g / (sqrt(v_hat) + eps) for ``ls_trial_sgd``) and return
    per-tensor sums (g^2, or g^2 / (sqrt(v_hat) + eps)) as float32 [n_tensors]; each program
    reduces its chunk with ``tl.sum`` and adds it to its tensor's fp64 slot with one atomic.
(b) ``ls_trial_sgd`` / ``ls_trial_adam``: p = w0 - eta_t * d, with one eta per tensor read from a
    small device tensor (per-layer line search gives every tensor its own step size).
(c) ``ls_final_adam``: p = w0 - (eta_t / bc1) * m / (sqrt(v_hat) + eps); ``ls_final_adam_from_trial``
    the same from the in-place trial point p = w0 - trial_eta * g / (sqrt(v_hat) + eps).

Per element these are ``ls_sq``, ``ls_adam_prepare_elem``, ``ls_trial_*_elem``, ``ls_final_adam_elem``
and ``ls_final_adam_from_trial_elem`` of csrc/include/svi_kernels/update_math.h.

The moments may have another dtype (STATE_DTYPE) than the params; ``ls_save_adam`` stores them to
nearest or, given ``state_seed``, bf16 moments stochastically rounded (state_storage.py); int8 moments (codes
with float32 block scales, ``sptrs``) are decoded on load and encoded on store (see adam.py).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import runtime
from .runtime import device_function
from .ieee import chunk_of_program, div_rn, sqrt_rn, tensor_ptr, to_storage
from .state_storage import load_state, scales_ptr, sr_key, store_state
from .table import Group
from ..backends.reference import check_optional_list
from ..backends.state_storage import DEFAULT_BLOCK_SIZE, check_state_seed

Etas = Union[Sequence[float], Tensor]


# ------------------------------------------------------------------------------------ kernels
@device_function
def _save_sgd_block(p_ptr, g_ptr, w_ptr, offs, mask, COMPUTE: tl.constexpr, N_LISTS: tl.constexpr):
    if N_LISTS == 3:  # with w0 (else only the sum: nothing is written)
        tl.store(w_ptr + offs, tl.load(p_ptr + offs, mask=mask), mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    return g * g  # ls_sq (update_math.h)


@triton.jit
def ls_save_sgd_kernel(ptrs, chunks, sums,
                       DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                       N_LISTS: tl.constexpr):
    # N_LISTS: 3 (params, grads, w0), or 2 without w0 (params only carry the checks: never read)
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, N_LISTS, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, N_LISTS, DTYPE, ALIGNED)
    w_ptr = p_ptr  # unused without w0
    if N_LISTS == 3:
        w_ptr = tensor_ptr(ptrs, t, 2, N_LISTS, DTYPE, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for first in range(start, full_end, BLOCK):
        acc += _save_sgd_block(p_ptr, g_ptr, w_ptr, first + tl.arange(0, BLOCK), None, COMPUTE, N_LISTS)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        acc += tl.where(offs < end, _save_sgd_block(p_ptr, g_ptr, w_ptr, offs, offs < end, COMPUTE, N_LISTS), 0.0)
    tl.atomic_add(sums + t, tl.sum(acc, axis=0).to(tl.float64))


@device_function
def _save_adam_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, d_ptr, ms_ptr, vs_ptr, offs, mask,
                     one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, key,
                     DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr, QBLOCK: tl.constexpr,
                     COMPUTE: tl.constexpr, N_LISTS: tl.constexpr):
    if N_LISTS >= 5:  # with w0 (the in-place trials' save, 4 lists, does not read p)
        tl.store(w_ptr + offs, tl.load(p_ptr + offs, mask=mask), mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    m = load_state(m_ptr, ms_ptr, offs, mask, True, STATE_DTYPE, COMPUTE, QBLOCK)
    v = load_state(v_ptr, vs_ptr, offs, mask, False, STATE_DTYPE, COMPUTE, QBLOCK)
    # --- ls_adam_prepare_elem (update_math.h)
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = div_rn(sqrt_rn(v), bc2_sqrt) + eps
    if N_LISTS == 6:  # ls_adam_prepare_dir_elem: the search direction too
        tl.store(d_ptr + offs, to_storage(div_rn(g, denom), DTYPE), mask=mask)
    term = div_rn(g * g, denom)
    # ---
    store_state(m_ptr, offs, mask, m, key, 0, STATE_DTYPE, SR, ms_ptr, QBLOCK)
    store_state(v_ptr, offs, mask, v, key, 1, STATE_DTYPE, SR, vs_ptr, QBLOCK)
    return term


@triton.jit(do_not_specialize=["state_seed"])
def ls_save_adam_kernel(ptrs, chunks, sums, sptrs,
                        one_minus_beta1: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
                        eps: tl.float64, bias_correction2_sqrt: tl.float64, state_seed,
                        DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr, QBLOCK: tl.constexpr,
                        COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, N_LISTS: tl.constexpr):
    # N_LISTS: 4 (no w0: p is not read), 5 (w0), or 6 with the dirs list (the search direction is written)
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, N_LISTS, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, N_LISTS, DTYPE, ALIGNED)
    m_ptr = tensor_ptr(ptrs, t, 2, N_LISTS, STATE_DTYPE, ALIGNED)
    v_ptr = tensor_ptr(ptrs, t, 3, N_LISTS, STATE_DTYPE, ALIGNED)
    ms_ptr = scales_ptr(sptrs, t, 2, N_LISTS, STATE_DTYPE)
    vs_ptr = scales_ptr(sptrs, t, 3, N_LISTS, STATE_DTYPE)
    key = sr_key(state_seed, t)
    w_ptr = p_ptr  # unused without w0
    if N_LISTS >= 5:
        w_ptr = tensor_ptr(ptrs, t, 4, N_LISTS, DTYPE, ALIGNED)
    d_ptr = w_ptr  # unused without dirs
    if N_LISTS == 6:
        d_ptr = tensor_ptr(ptrs, t, 5, N_LISTS, DTYPE, ALIGNED)
    c_one_minus_beta1 = tl.full([], one_minus_beta1, COMPUTE)
    c_beta2 = tl.full([], beta2, COMPUTE)
    c_one_minus_beta2 = tl.full([], one_minus_beta2, COMPUTE)
    c_eps = tl.full([], eps, COMPUTE)
    c_bc2_sqrt = tl.full([], bias_correction2_sqrt, COMPUTE)
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for first in range(start, full_end, BLOCK):
        acc += _save_adam_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, d_ptr, ms_ptr, vs_ptr, first + tl.arange(0, BLOCK),
                                None, c_one_minus_beta1, c_beta2, c_one_minus_beta2, c_eps, c_bc2_sqrt, key, DTYPE,
                                STATE_DTYPE, SR, QBLOCK, COMPUTE, N_LISTS)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        term = _save_adam_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, d_ptr, ms_ptr, vs_ptr, offs, offs < end,
                                c_one_minus_beta1, c_beta2, c_one_minus_beta2, c_eps, c_bc2_sqrt, key, DTYPE,
                                STATE_DTYPE, SR, QBLOCK, COMPUTE, N_LISTS)
        acc += tl.where(offs < end, term, 0.0)
    tl.atomic_add(sums + t, tl.sum(acc, axis=0).to(tl.float64))


@device_function
def _trial_sgd_block(p_ptr, w_ptr, g_ptr, offs, mask, eta, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    w0 = tl.load(w_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    p = w0 - eta * g  # ls_trial_sgd_elem (update_math.h)
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)


@triton.jit
def ls_trial_sgd_kernel(ptrs, chunks, etas,
                        DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, 3, DTYPE, ALIGNED)
    w_ptr = tensor_ptr(ptrs, t, 1, 3, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 2, 3, DTYPE, ALIGNED)
    eta = tl.load(etas + t).to(COMPUTE)
    for first in range(start, full_end, BLOCK):
        _trial_sgd_block(p_ptr, w_ptr, g_ptr, first + tl.arange(0, BLOCK), None, eta, DTYPE, COMPUTE)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _trial_sgd_block(p_ptr, w_ptr, g_ptr, offs, offs < end, eta, DTYPE, COMPUTE)


@device_function
def _step_from_w0_block(p_ptr, w_ptr, d_ptr, v_ptr, ds_ptr, vs_ptr, offs, mask, eta, eps, bc2_sqrt,
                        DTYPE: tl.constexpr, D_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                        QBLOCK: tl.constexpr):
    """p = w0 - eta * d / (sqrt(v)/bc2_sqrt + eps): ls_trial_adam_elem (d = g) and
    ls_final_adam_elem (d = m, eta = eta / bc1) of update_math.h, which differ only in d and eta."""
    w0 = tl.load(w_ptr + offs, mask=mask).to(COMPUTE)
    d = load_state(d_ptr, ds_ptr, offs, mask, True, D_DTYPE, COMPUTE, QBLOCK)  # int8 codes only for m
    v = load_state(v_ptr, vs_ptr, offs, mask, False, STATE_DTYPE, COMPUTE, QBLOCK)
    denom = div_rn(sqrt_rn(v), bc2_sqrt) + eps
    p = w0 - eta * div_rn(d, denom)
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)


@device_function
def _step_from_w0(ptrs, chunks, etas, sptrs, eps, bias_correction2_sqrt, DTYPE: tl.constexpr,
                  D_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, QBLOCK: tl.constexpr, COMPUTE: tl.constexpr,
                  BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # table lists: p, w0, d (g: D_DTYPE = DTYPE, or m: D_DTYPE = STATE_DTYPE), v
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, 4, DTYPE, ALIGNED)
    w_ptr = tensor_ptr(ptrs, t, 1, 4, DTYPE, ALIGNED)
    d_ptr = tensor_ptr(ptrs, t, 2, 4, D_DTYPE, ALIGNED)
    v_ptr = tensor_ptr(ptrs, t, 3, 4, STATE_DTYPE, ALIGNED)
    ds_ptr = scales_ptr(sptrs, t, 2, 4, D_DTYPE)
    vs_ptr = scales_ptr(sptrs, t, 3, 4, STATE_DTYPE)
    eta = tl.load(etas + t).to(COMPUTE)
    c_eps = tl.full([], eps, COMPUTE)
    c_bc2_sqrt = tl.full([], bias_correction2_sqrt, COMPUTE)
    for first in range(start, full_end, BLOCK):
        _step_from_w0_block(p_ptr, w_ptr, d_ptr, v_ptr, ds_ptr, vs_ptr, first + tl.arange(0, BLOCK), None, eta, c_eps,
                            c_bc2_sqrt, DTYPE, D_DTYPE, STATE_DTYPE, COMPUTE, QBLOCK)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _step_from_w0_block(p_ptr, w_ptr, d_ptr, v_ptr, ds_ptr, vs_ptr, offs, offs < end, eta, c_eps, c_bc2_sqrt,
                            DTYPE, D_DTYPE, STATE_DTYPE, COMPUTE, QBLOCK)


@triton.jit
def ls_trial_adam_kernel(ptrs, chunks, etas, sptrs, eps: tl.float64, bias_correction2_sqrt: tl.float64,
                         DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, QBLOCK: tl.constexpr, COMPUTE: tl.constexpr,
                         BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    _step_from_w0(ptrs, chunks, etas, sptrs, eps, bias_correction2_sqrt, DTYPE, DTYPE, STATE_DTYPE, QBLOCK, COMPUTE,
                  BLOCK, ALIGNED)


@triton.jit
def ls_final_adam_kernel(ptrs, chunks, etas_over_bc1, sptrs, eps: tl.float64, bias_correction2_sqrt: tl.float64,
                         DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, QBLOCK: tl.constexpr, COMPUTE: tl.constexpr,
                         BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    _step_from_w0(ptrs, chunks, etas_over_bc1, sptrs, eps, bias_correction2_sqrt, DTYPE, STATE_DTYPE, STATE_DTYPE,
                  QBLOCK, COMPUTE, BLOCK, ALIGNED)


@device_function
def _final_from_trial_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, mask, eta, trial_eta, eps, bc2_sqrt,
                            DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                            QBLOCK: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    m = load_state(m_ptr, ms_ptr, offs, mask, True, STATE_DTYPE, COMPUTE, QBLOCK)
    v = load_state(v_ptr, vs_ptr, offs, mask, False, STATE_DTYPE, COMPUTE, QBLOCK)
    # --- ls_final_adam_from_trial_elem (update_math.h)
    denom = div_rn(sqrt_rn(v), bc2_sqrt) + eps
    w0 = p + trial_eta * div_rn(g, denom)
    p = w0 - eta * div_rn(m, denom)
    # ---
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)


@triton.jit
def ls_final_adam_from_trial_kernel(ptrs, chunks, etas_over_bc1, sptrs, trial_eta: tl.float64, eps: tl.float64,
                                    bias_correction2_sqrt: tl.float64, DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                                    QBLOCK: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                                    ALIGNED: tl.constexpr):
    # table lists: p, g, m, v
    t, start, full_end, end = chunk_of_program(chunks, BLOCK)
    p_ptr = tensor_ptr(ptrs, t, 0, 4, DTYPE, ALIGNED)
    g_ptr = tensor_ptr(ptrs, t, 1, 4, DTYPE, ALIGNED)
    m_ptr = tensor_ptr(ptrs, t, 2, 4, STATE_DTYPE, ALIGNED)
    v_ptr = tensor_ptr(ptrs, t, 3, 4, STATE_DTYPE, ALIGNED)
    ms_ptr = scales_ptr(sptrs, t, 2, 4, STATE_DTYPE)
    vs_ptr = scales_ptr(sptrs, t, 3, 4, STATE_DTYPE)
    eta = tl.load(etas_over_bc1 + t).to(COMPUTE)
    c_trial_eta = tl.full([], trial_eta, COMPUTE)
    c_eps = tl.full([], eps, COMPUTE)
    c_bc2_sqrt = tl.full([], bias_correction2_sqrt, COMPUTE)
    for first in range(start, full_end, BLOCK):
        _final_from_trial_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, first + tl.arange(0, BLOCK), None, eta,
                                c_trial_eta, c_eps, c_bc2_sqrt, DTYPE, STATE_DTYPE, COMPUTE, QBLOCK)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _final_from_trial_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, offs < end, eta, c_trial_eta, c_eps,
                                c_bc2_sqrt, DTYPE, STATE_DTYPE, COMPUTE, QBLOCK)


# ------------------------------------------------------------------------------------ launchers
_ADAM_STATE = {2: "exp_avgs", 3: "exp_avg_sqs"}  # list index -> name, in the Adam save and final step


def _group(lists, written, op="", state=None, scales=None, block_size=DEFAULT_BLOCK_SIZE):
    group = Group(lists, written=written, op=op, state=state, scales=scales, block_size=block_size)
    if group.n_elements:
        runtime.check_device(group.device)
    return group, group.block_shape()


def _reader_types(group: Group) -> dict:
    """STATE_DTYPE and QBLOCK of a kernel that only reads state."""
    types = runtime.state_types(group)
    return dict(STATE_DTYPE=types["STATE_DTYPE"], QBLOCK=types["QBLOCK"])


def group_placeholder(group: Group) -> Tensor:
    """A device tensor the kernels never read (the scale table of float state)."""
    return torch.empty(1, dtype=torch.int64, device=group.device)


def _per_tensor(values: Etas, n: int, group: Group, scale: float = 1.0) -> Tensor:
    """One scalar per tensor as a device tensor in the compute dtype; host values are divided
    by ``scale`` in double first (so eta / bc1 rounds once, as in the reference)."""
    dtype = runtime.scalar_dtype(group.dtype)
    if isinstance(values, Tensor):  # already on the device: no host sync
        if scale == 1.0:
            out = values.to(device=group.device, dtype=dtype).reshape(-1)
        else:
            out = (values.to(device=group.device, dtype=torch.float64).reshape(-1) / scale).to(dtype)
    else:
        out = torch.tensor([float(e) / scale for e in values], dtype=dtype)
        if group.device.type == "cuda":
            # From pinned memory the upload is asynchronous; from pageable memory CUDA first waits
            # for the stream to drain, a host sync per trial (svi-bench counted 2 syncs per trial).
            out = out.pin_memory().to(group.device, non_blocking=True)
    if out.numel() != n:
        raise ValueError(f"expected {n} per-tensor step sizes, got {out.numel()}")
    return out


def _run_reduction(kernel, group: Group, shape: Tuple[int, int], args: tuple, **constexprs) -> Tensor:
    sums = torch.zeros(group.n_tensors, dtype=torch.float64, device=group.device)
    if group.n_elements:
        dtype, compute = runtime.element_types(group.dtype)
        block, chunk = shape
        ptrs, chunks, aligned = group.tables(chunk)
        runtime.launch(kernel, chunks.shape[0], (ptrs, chunks, sums) + args,
                       dict(DTYPE=dtype, COMPUTE=compute, BLOCK=block, ALIGNED=aligned, **constexprs), group.device)
        group.finish()
    return sums.to(torch.float32)


def _run_update(kernel, group: Group, shape: Tuple[int, int], per_tensor: Tensor, args: tuple, **constexprs) -> None:
    if not group.n_elements:
        return
    dtype, compute = runtime.element_types(group.dtype)
    block, chunk = shape
    ptrs, chunks, aligned = group.tables(chunk)
    runtime.launch(kernel, chunks.shape[0], (ptrs, chunks, per_tensor) + args,
                   dict(DTYPE=dtype, COMPUTE=compute, BLOCK=block, ALIGNED=aligned, **constexprs), group.device)
    group.finish()


def ls_save_sgd(params: List[Tensor], grads: List[Tensor], w0: List[Tensor]) -> Tensor:
    """w0 <- p (unless ``w0`` is empty: then nothing is written); returns float32 [n] with sum(g^2)
    per tensor."""
    check_optional_list("ls_save_sgd", "w0", w0, params)
    lists = [params, grads] + ([w0] if len(w0) else [])
    group, shape = _group(lists, written=(2,)[:len(lists) - 2])
    return _run_reduction(ls_save_sgd_kernel, group, shape, (), N_LISTS=len(lists))


def ls_save_adam(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 w0: List[Tensor], dirs: List[Tensor], *, beta1: float, beta2: float, eps: float,
                 bias_correction2_sqrt: float, state_seed: Optional[int] = None,
                 exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    """Moments updated before the search, w0 <- p (unless ``w0`` is empty: then p is not read), and
    (when ``dirs`` is not empty, only with w0) the search direction dirs <- g / (sqrt(v_hat)+eps);
    returns sum(g^2 / (sqrt(v_hat)+eps)) per tensor. w0 and dirs have the params' dtype."""
    check_state_seed("ls_save_adam", state_seed)
    check_optional_list("ls_save_adam", "w0", w0, params)
    check_optional_list("ls_save_adam", "dirs", dirs, params)
    if len(dirs) and not len(w0):
        raise ValueError("ls_save_adam: dirs needs w0 (give both, or an empty dirs)")
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([w0] if len(w0) else []) + ([dirs] if len(dirs) else [])
    group, shape = _group(lists, written=(2, 3, 4, 5)[:len(lists) - 2], op="ls_save_adam", state=_ADAM_STATE,
                          scales={2: exp_avg_scales, 3: exp_avg_sq_scales}, block_size=block_size)
    args = (group.scale_table(group_placeholder(group)), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), float(bias_correction2_sqrt),
            state_seed or 0)
    return _run_reduction(ls_save_adam_kernel, group, shape, args, N_LISTS=len(lists),
                          **runtime.state_types(group, state_seed))


def ls_trial_sgd(params: List[Tensor], w0: List[Tensor], grads: List[Tensor], etas: Etas) -> None:
    """p <- w0 - eta_t * g, one eta per tensor."""
    group, shape = _group([params, w0, grads], written=(0,))
    _run_update(ls_trial_sgd_kernel, group, shape, _per_tensor(etas, group.n_tensors, group), ())


def ls_trial_adam(params: List[Tensor], w0: List[Tensor], grads: List[Tensor], exp_avg_sqs: List[Tensor],
                  etas: Etas, *, eps: float, bias_correction2_sqrt: float,
                  exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """p <- w0 - eta_t * g / (sqrt(v_hat) + eps): the search direction has no momentum."""
    group, shape = _group([params, w0, grads, exp_avg_sqs], written=(0,), op="ls_trial_adam", state={3: "exp_avg_sqs"},
                          scales={3: exp_avg_sq_scales}, block_size=block_size)
    per_tensor = _per_tensor(etas, group.n_tensors, group)
    _run_update(ls_trial_adam_kernel, group, shape, per_tensor,
                (group.scale_table(per_tensor), float(eps), float(bias_correction2_sqrt)), **_reader_types(group))


def ls_final_adam(params: List[Tensor], w0: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                  etas: Etas, *, eps: float, bias_correction1: float, bias_correction2_sqrt: float,
                  exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """p <- w0 - (eta_t / bc1) * m / (sqrt(v_hat) + eps): the final step uses the momentum."""
    group, shape = _group([params, w0, exp_avgs, exp_avg_sqs], written=(0,), op="ls_final_adam", state=_ADAM_STATE,
                          scales={2: exp_avg_scales, 3: exp_avg_sq_scales}, block_size=block_size)
    scaled = _per_tensor(etas, group.n_tensors, group, scale=float(bias_correction1))
    _run_update(ls_final_adam_kernel, group, shape, scaled,
                (group.scale_table(scaled), float(eps), float(bias_correction2_sqrt)), **_reader_types(group))


def ls_final_adam_from_trial(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                             exp_avg_sqs: List[Tensor], etas: Etas, *, trial_eta: float, eps: float,
                             bias_correction1: float, bias_correction2_sqrt: float,
                             exp_avg_scales: Optional[List[Tensor]] = None,
                             exp_avg_sq_scales: Optional[List[Tensor]] = None,
                             block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """From the trial point p = w0 - trial_eta * g / denom (in-place trials): p <- (p + trial_eta * g /
    denom) - (eta_t / bc1) * m / denom."""
    group, shape = _group([params, grads, exp_avgs, exp_avg_sqs], written=(0,), op="ls_final_adam_from_trial",
                          state=_ADAM_STATE, scales={2: exp_avg_scales, 3: exp_avg_sq_scales}, block_size=block_size)
    scaled = _per_tensor(etas, group.n_tensors, group, scale=float(bias_correction1))
    _run_update(ls_final_adam_from_trial_kernel, group, shape, scaled,
                (group.scale_table(scaled), float(trial_eta), float(eps), float(bias_correction2_sqrt)),
                **_reader_types(group))
