"""The "triton" backend: Triton multi-tensor kernels (svi_kernels/triton), same functions and
signatures as ``reference.py`` (optimizer state in another dtype, ``state_seed``, int8 state with its scales
and ``block_size``: see there).

Each call is one kernel launch for the whole tensor list (a cached device table of pointers and
chunks; see svi_kernels/triton/table.py). The tensors must be CUDA tensors, or CPU tensors when
TRITON_INTERPRET=1 was set before triton was imported. Importing this module never fails when
triton is missing; ``available()`` says why the backend cannot run.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .state_storage import DEFAULT_BLOCK_SIZE

Lists = Optional[List[Tensor]]

NAME = "triton"

_status: Optional[tuple] = None


def available() -> tuple[bool, str]:
    """(True, how) when triton imports and a CUDA device exists or TRITON_INTERPRET=1."""
    global _status
    if _status is None:
        try:
            triton = importlib.import_module("triton")
            importlib.import_module("triton.language")
        except Exception as exc:  # ImportError, or a broken install
            _status = (False, f"triton could not be imported ({type(exc).__name__}: {exc}); `pip install triton`")
        else:
            if os.environ.get("TRITON_INTERPRET", "0") == "1" or triton.knobs.runtime.interpret:
                _status = (True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors")
            elif torch.cuda.is_available():
                _status = (True, f"Triton {triton.__version__} kernels on CUDA")
            else:
                _status = (False, f"Triton {triton.__version__} is installed but no CUDA device is available "
                                  "(TRITON_INTERPRET=1 runs its kernels on CPU tensors)")
    return _status


def _kernels(module: str):
    ok, why = available()
    if not ok:
        raise RuntimeError(f"backend 'triton' is not available: {why}")
    return importlib.import_module(f"svi_kernels.triton.{module}")


def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
              bias_correction1: float, bias_correction2_sqrt: float, maximize: bool = False,
              max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
              exp_avg_scales: Lists = None, exp_avg_sq_scales: Lists = None, max_exp_avg_sq_scales: Lists = None,
              block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    _kernels("adam").adam_step(params, grads, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, decoupled=decoupled, bias_correction1=bias_correction1,
                               bias_correction2_sqrt=bias_correction2_sqrt, maximize=maximize,
                               max_exp_avg_sqs=max_exp_avg_sqs, state_seed=state_seed, exp_avg_scales=exp_avg_scales,
                               exp_avg_sq_scales=exp_avg_sq_scales, max_exp_avg_sq_scales=max_exp_avg_sq_scales,
                               block_size=block_size)


def sgd_momentum_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                      lr: float, momentum: float, nesterov: bool, weight_decay: float, maximize: bool = False,
                      dampening: float = 0.0, state_seed: Optional[int] = None,
                      momentum_buffer_scales: Lists = None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    _kernels("sgd").sgd_momentum_step(params, grads, momentum_buffers, lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay, maximize=maximize, dampening=dampening,
                                      state_seed=state_seed, momentum_buffer_scales=momentum_buffer_scales,
                                      block_size=block_size)


def adam_step_tensor(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                     state_steps: List[Tensor], *, lr: Union[float, Tensor], beta1: float, beta2: float, eps: float,
                     weight_decay: float, decoupled: bool, correct_bias: bool, maximize: bool = False,
                     grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
                     max_exp_avg_sqs: Optional[List[Tensor]] = None, state_seed: Optional[int] = None,
                     exp_avg_scales: Lists = None, exp_avg_sq_scales: Lists = None,
                     max_exp_avg_sq_scales: Lists = None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    _kernels("adam").adam_step_tensor(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                                      beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                                      correct_bias=correct_bias, maximize=maximize, grad_scale=grad_scale,
                                      found_inf=found_inf, max_exp_avg_sqs=max_exp_avg_sqs, state_seed=state_seed,
                                      exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                                      max_exp_avg_sq_scales=max_exp_avg_sq_scales, block_size=block_size)


def sgd_momentum_step_tensor(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
                             lr: Union[float, Tensor], momentum: float, nesterov: bool, weight_decay: float,
                             maximize: bool = False, grad_scale: Optional[Tensor] = None,
                             found_inf: Optional[Tensor] = None, dampening: float = 0.0,
                             state_seed: Optional[int] = None, momentum_buffer_scales: Lists = None,
                             block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    _kernels("sgd").sgd_momentum_step_tensor(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                                             nesterov=nesterov, weight_decay=weight_decay, maximize=maximize,
                                             grad_scale=grad_scale, found_inf=found_inf, dampening=dampening,
                                             state_seed=state_seed, momentum_buffer_scales=momentum_buffer_scales,
                                             block_size=block_size)


def ls_save_sgd(params: List[Tensor], grads: List[Tensor], w0: List[Tensor]) -> Tensor:
    return _kernels("line_search").ls_save_sgd(params, grads, w0)


def ls_save_adam(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 w0: List[Tensor], dirs: List[Tensor], *, beta1: float, beta2: float, eps: float,
                 bias_correction2_sqrt: float, state_seed: Optional[int] = None, exp_avg_scales: Lists = None,
                 exp_avg_sq_scales: Lists = None, block_size: int = DEFAULT_BLOCK_SIZE) -> Tensor:
    return _kernels("line_search").ls_save_adam(params, grads, exp_avgs, exp_avg_sqs, w0, dirs, beta1=beta1,
                                                beta2=beta2, eps=eps, bias_correction2_sqrt=bias_correction2_sqrt,
                                                state_seed=state_seed, exp_avg_scales=exp_avg_scales,
                                                exp_avg_sq_scales=exp_avg_sq_scales, block_size=block_size)


def ls_trial_sgd(params: List[Tensor], w0: List[Tensor], grads: List[Tensor],
                 etas: Union[Sequence[float], Tensor]) -> None:
    _kernels("line_search").ls_trial_sgd(params, w0, grads, etas)


def ls_trial_adam(params: List[Tensor], w0: List[Tensor], grads: List[Tensor], exp_avg_sqs: List[Tensor],
                  etas: Union[Sequence[float], Tensor], *, eps: float, bias_correction2_sqrt: float,
                  exp_avg_sq_scales: Lists = None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    _kernels("line_search").ls_trial_adam(params, w0, grads, exp_avg_sqs, etas, eps=eps,
                                          bias_correction2_sqrt=bias_correction2_sqrt,
                                          exp_avg_sq_scales=exp_avg_sq_scales, block_size=block_size)


def ls_final_adam(params: List[Tensor], w0: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                  etas: Union[Sequence[float], Tensor], *, eps: float, bias_correction1: float,
                  bias_correction2_sqrt: float, exp_avg_scales: Lists = None, exp_avg_sq_scales: Lists = None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    _kernels("line_search").ls_final_adam(params, w0, exp_avgs, exp_avg_sqs, etas, eps=eps,
                                          bias_correction1=bias_correction1,
                                          bias_correction2_sqrt=bias_correction2_sqrt, exp_avg_scales=exp_avg_scales,
                                          exp_avg_sq_scales=exp_avg_sq_scales, block_size=block_size)


def ls_final_adam_from_trial(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                             exp_avg_sqs: List[Tensor], etas: Union[Sequence[float], Tensor], *, trial_eta: float,
                             eps: float, bias_correction1: float, bias_correction2_sqrt: float,
                             exp_avg_scales: Lists = None, exp_avg_sq_scales: Lists = None,
                             block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    _kernels("line_search").ls_final_adam_from_trial(params, grads, exp_avgs, exp_avg_sqs, etas, trial_eta=trial_eta,
                                                     eps=eps, bias_correction1=bias_correction1,
                                                     bias_correction2_sqrt=bias_correction2_sqrt,
                                                     exp_avg_scales=exp_avg_scales,
                                                     exp_avg_sq_scales=exp_avg_sq_scales, block_size=block_size)
