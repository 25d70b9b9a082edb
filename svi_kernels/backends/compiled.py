"""The compiled extension's ops (``torch.ops.svi_kernels.*``), for the "cpu" and "cuda" backends.

The C++ library (``svi_kernels._C``) registers one schema per op (csrc/ops_schema.cpp) with a CPU
kernel (csrc/cpu) and, when built with CUDA, a CUDA kernel (csrc/cuda). PyTorch's dispatcher picks
the kernel from the tensors' device, so both backends share these wrappers; they differ only in
which device they accept. Importing this module never fails: ``load()`` reports why the extension
is missing instead.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import jit

_load_error: Optional[str] = None
_loaded = False
_origin = ""


def load() -> tuple[bool, str]:
    """Import the extension once (compiling it first if this torch has none: jit.py); returns (ok, reason)."""
    global _loaded, _load_error, _origin
    if not _loaded and _load_error is None:
        try:
            _origin = jit.load()
            _register_fakes()
            _find_direct_calls()
            _loaded = True
        except jit.ExtensionUnavailable as exc:
            _load_error = str(exc)
        except Exception as exc:  # an import error of a library that matched this torch
            _load_error = (
                f"the compiled extension svi_kernels._C could not be imported ({type(exc).__name__}: {exc}); "
                "rebuild it with `pip install --no-build-isolation .` against the torch you run"
            )
    return (True, _origin) if _loaded else (False, _load_error or "")


_MUTATING = ("adam_step", "sgd_momentum_step", "adam_step_tensor", "sgd_momentum_step_tensor", "ls_trial_sgd",
             "ls_trial_adam", "ls_final_adam", "ls_final_adam_from_trial")
_REDUCING = ("ls_save_sgd", "ls_save_adam")


def _register_fakes() -> None:
    """Fake (meta) kernels, so torch.compile / FakeTensor tracing can see through the ops."""
    def no_output(*args, **kwargs):
        return None

    def per_tensor_sums(params, *args, **kwargs):
        if not params:
            return torch.empty(0, dtype=torch.float32)
        return params[0].new_empty(len(params), dtype=torch.float32)

    for name in _MUTATING:
        torch.library.register_fake(f"svi_kernels::{name}")(no_output)
    for name in _REDUCING:
        torch.library.register_fake(f"svi_kernels::{name}")(per_tensor_sums)


# svi_kernels._C's direct calls of the CPU ops (csrc/cpu/direct_calls.cpp): on plain CPU tensors
# outside autograd, tracing, dispatch modes and the profiler they skip torch.ops' per-tensor argument
# conversion (about half of a step over 10,000 small tensors); otherwise they return NotImplemented
# and the op goes through torch.ops. Empty when the loaded library has none.
_DIRECT_OPS = ("adam_step", "sgd_momentum_step", "ls_save_sgd", "ls_save_adam", "ls_trial_sgd", "ls_trial_adam",
               "ls_final_adam", "ls_final_adam_from_trial", "increment_steps")
_direct_calls: dict = {}


def _find_direct_calls() -> None:
    import svi_kernels._C as C
    _direct_calls.update({name: getattr(C, "_" + name) for name in _DIRECT_OPS if hasattr(C, "_" + name)})


def _call(name: str, *args):
    """torch.ops.svi_kernels.<name>(*args), by the direct call when it takes it (never while
    torch.compile traces: it cannot see into it)."""
    ops = _ops()
    direct = _direct_calls.get(name)
    if direct is not None and not torch.compiler.is_compiling():
        out = direct(*args)
        if out is not NotImplemented:
            return out
    return getattr(ops, name)(*args)


def has_cuda_kernels() -> bool:
    if not load()[0]:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("svi_kernels::adam_step", "CUDA")


def _ops():
    ok, why = load()
    if not ok:
        raise RuntimeError(why)
    return torch.ops.svi_kernels


def _empty_sums() -> Tensor:
    # The dispatcher picks a kernel from the tensors' device; an empty list has none.
    return torch.zeros(0, dtype=torch.float32)


def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
              bias_correction1: float, bias_correction2_sqrt: float, maximize: bool = False,
              max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
              exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
              max_exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = 256) -> None:
    if not params:
        return
    _call_state("adam_step", (exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales), block_size,
                params, grads, exp_avgs, exp_avg_sqs, float(lr), float(beta1), float(beta2), float(eps),
                float(weight_decay), bool(decoupled), float(bias_correction1), float(bias_correction2_sqrt),
                bool(maximize), max_exp_avg_sqs, _seed(state_seed))


def sgd_momentum_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                      lr: float, momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False,
                      dampening: float = 0.0, state_seed: Optional[int] = None,
                      momentum_buffer_scales: Optional[List[Tensor]] = None, block_size: int = 256) -> None:
    if not params:
        return
    _call_state("sgd_momentum_step", (momentum_buffer_scales,), block_size, params, grads, momentum_buffers,
                float(lr), float(momentum), bool(nesterov), float(weight_decay), bool(maximize), float(dampening),
                _seed(state_seed))


def _call_state(name: str, scales: tuple, block_size: int, *args):
    """An op with state lists: int8 state (scales given) passes its scales lists and block_size
    through torch.ops (the direct calls take float state only); float state goes through _call."""
    if all(s is None for s in scales):
        return _call(name, *args)
    return getattr(_ops(), name)(*args, *scales, int(block_size))


def _seed(state_seed: Optional[int]) -> Optional[int]:
    """The ops' state_seed: None (round to nearest) or a plain int (stochastic rounding into bf16 state)."""
    return None if state_seed is None else int(state_seed)


def _lr_args(lr: Union[float, Tensor]) -> tuple:
    """(lr, lr_tensor) of the tensor ops: a tensor is read by the kernel, a number passed as is."""
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def adam_step_tensor(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                     state_steps: List[Tensor], *, lr: Union[float, Tensor], beta1: float, beta2: float, eps: float,
                     weight_decay: float, decoupled: bool, correct_bias: bool, maximize: bool = False,
                     grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
                     max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
                     exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
                     max_exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = 256) -> None:
    if not params:
        return
    _ops().adam_step_tensor(params, grads, exp_avgs, exp_avg_sqs, state_steps, *_lr_args(lr), float(beta1),
                            float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(correct_bias),
                            bool(maximize), grad_scale, found_inf, max_exp_avg_sqs, _seed(state_seed),
                            exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales, int(block_size))


def sgd_momentum_step_tensor(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                             lr: Union[float, Tensor], momentum: float, nesterov: bool, weight_decay: float,
                             maximize: bool = False, grad_scale: Optional[Tensor] = None,
                             found_inf: Optional[Tensor] = None, dampening: float = 0.0,
                             state_seed: Optional[int] = None, momentum_buffer_scales: Optional[List[Tensor]] = None,
                             block_size: int = 256) -> None:
    if not params:
        return
    _ops().sgd_momentum_step_tensor(params, grads, momentum_buffers, *_lr_args(lr), float(momentum), bool(nesterov),
                                    float(weight_decay), bool(maximize), grad_scale, found_inf, float(dampening),
                                    _seed(state_seed), momentum_buffer_scales, int(block_size))


def ls_save_sgd(params: List[Tensor], grads: List[Tensor], w0: List[Tensor]) -> Tensor:
    if not params:
        return _empty_sums()
    return _call("ls_save_sgd", params, grads, w0)


def ls_save_adam(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 w0: List[Tensor], dirs: List[Tensor], *, beta1: float, beta2: float, eps: float,
                 bias_correction2_sqrt: float, state_seed: Optional[int] = None,
                 exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
                 block_size: int = 256) -> Tensor:
    if not params:
        return _empty_sums()
    return _call_state("ls_save_adam", (exp_avg_scales, exp_avg_sq_scales), block_size, params, grads, exp_avgs,
                       exp_avg_sqs, w0, dirs, float(beta1), float(beta2), float(eps), float(bias_correction2_sqrt),
                       _seed(state_seed))


def ls_trial_sgd(params: List[Tensor], w0: List[Tensor], grads: List[Tensor], etas: Sequence[float]) -> None:
    if not params:
        return
    _call("ls_trial_sgd", params, w0, grads, list(map(float, etas)))


def ls_trial_adam(params: List[Tensor], w0: List[Tensor], grads: List[Tensor], exp_avg_sqs: List[Tensor],
                  etas: Sequence[float], *, eps: float, bias_correction2_sqrt: float,
                  exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = 256) -> None:
    if not params:
        return
    _call_state("ls_trial_adam", (exp_avg_sq_scales,), block_size, params, w0, grads, exp_avg_sqs,
                list(map(float, etas)), float(eps), float(bias_correction2_sqrt))


def ls_final_adam(params: List[Tensor], w0: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                  etas: Sequence[float], *, eps: float, bias_correction1: float, bias_correction2_sqrt: float,
                  exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
                  block_size: int = 256) -> None:
    if not params:
        return
    _call_state("ls_final_adam", (exp_avg_scales, exp_avg_sq_scales), block_size, params, w0, exp_avgs, exp_avg_sqs,
                list(map(float, etas)), float(eps), float(bias_correction1), float(bias_correction2_sqrt))


def ls_final_adam_from_trial(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                             exp_avg_sqs: List[Tensor], etas: Sequence[float], *, trial_eta: float, eps: float,
                             bias_correction1: float, bias_correction2_sqrt: float,
                             exp_avg_scales: Optional[List[Tensor]] = None,
                             exp_avg_sq_scales: Optional[List[Tensor]] = None, block_size: int = 256) -> None:
    if not params:
        return
    _call_state("ls_final_adam_from_trial", (exp_avg_scales, exp_avg_sq_scales), block_size, params, grads, exp_avgs,
                exp_avg_sqs, list(map(float, etas)), float(trial_eta), float(eps), float(bias_correction1),
                float(bias_correction2_sqrt))


def increment_steps(steps: List[Tensor]) -> List[float]:
    """+1 on each one-element CPU step counter, in place; their new values (CPU kernel only)."""
    if not steps:
        return []
    return _call("increment_steps", steps)
