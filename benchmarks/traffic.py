"""Bytes moved per parameter by each fused op, from the op's reads and writes of each operand.

Every row reports the traffic of the *fused* implementation of what it computes, so a torch or
reference-style row doing the same update gets the same bytes/param and its GB/s is an effective
bandwidth (useful bytes / time), directly comparable with ours and with the streaming bandwidth.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

# (reads, writes) per element, by operand role:
#   param: the parameter p; grad: its gradient g;
#   copy:  scratch in p's dtype: the saved start point w0 of a line search, and the Adam search
#          direction d = g / (sqrt(v_hat) + eps) that the save phase writes for the trials;
#   state: optimizer state (Adam's m and v, the momentum buffer).
OP_ACCESSES: Dict[str, Dict[str, Tuple[int, int]]] = {
    "adam_step": {"param": (1, 1), "grad": (1, 0), "state": (2, 2)},                   # p,g,m,v -> p,m,v
    "sgd_momentum_step": {"param": (1, 1), "grad": (1, 0), "state": (1, 1)},           # p,g,buf -> p,buf
    "ls_save_sgd": {"param": (1, 0), "grad": (1, 0), "copy": (0, 1)},                  # p,g -> w0 (+ sum g^2)
    # ls_save_sgd given an empty w0: the Adam searches' gradient check, sum g^2 only
    "ls_grad_check": {"grad": (1, 0)},                                                   # g -> (sum g^2)
    "ls_save_adam": {"param": (1, 0), "grad": (1, 0), "state": (2, 2), "copy": (0, 1)},  # p,g,m,v -> w0,m,v
    # ls_save_adam given a dirs list (fp32/fp64): also writes d
    "ls_save_adam_dir": {"param": (1, 0), "grad": (1, 0), "state": (2, 2), "copy": (0, 2)},  # p,g,m,v -> w0,d,m,v
    "ls_trial_sgd": {"param": (0, 1), "grad": (1, 0), "copy": (1, 0)},                 # w0,g -> p
    "ls_trial_adam": {"param": (0, 1), "grad": (1, 0), "state": (1, 0), "copy": (1, 0)},  # w0,g,v -> p
    # an Adam trial along the saved d: ls_trial_sgd on (p, w0, d)
    "ls_trial_adam_dir": {"param": (0, 1), "copy": (2, 0)},                           # w0,d -> p
    "ls_final_adam": {"param": (0, 1), "state": (2, 0), "copy": (1, 0)},               # w0,m,v -> p
}

Phases = Iterable[Tuple[str, float]]  # (op, how many times per step; fractions allowed)


def op_bytes(op: str, param_itemsize: int, state_itemsize: Optional[int] = None) -> float:
    """Bytes per parameter element of one call of ``op``; state defaults to the param dtype."""
    state_itemsize = param_itemsize if state_itemsize is None else state_itemsize
    size = {"param": param_itemsize, "grad": param_itemsize, "copy": param_itemsize, "state": state_itemsize}
    return float(sum((r + w) * size[role] for role, (r, w) in OP_ACCESSES[op].items()))


def bytes_per_param(phases: Phases, param_itemsize: int, state_itemsize: Optional[int] = None) -> float:
    """Sum of the phases' traffic: e.g. a line-search step is save + trial(s) + final."""
    return float(sum(count * op_bytes(op, param_itemsize, state_itemsize) for op, count in phases))


def adam_search_ops(direction_saved: bool = True) -> Tuple[str, str]:
    """(save, trial) ops of an Adam line search: with the direction saved (fp32/fp64 parameters,
    _line_search.EXACT_DIRECTION) the save writes d and every trial reads w0 and d; else (fp16/bf16)
    the trials recompute d from g and v."""
    return ("ls_save_adam_dir", "ls_trial_adam_dir") if direction_saved else ("ls_save_adam", "ls_trial_adam")


# Before their save phase touches the moments, the Adam line searches check every gradient finite
# with ArmijoSGD's save op given an empty w0 (sum g^2 per tensor, nothing written): _line_search._grad_norms.
ADAM_GRAD_CHECK = ("ls_grad_check", 1.0)


def adam_search_phases(direction_saved: bool = True) -> list:
    """A searched Adam step up to its first trial: the gradient check, the save (moments, w0, d), one trial."""
    save, trial = adam_search_ops(direction_saved)
    return [ADAM_GRAD_CHECK, (save, 1.0), (trial, 1.0)]


def adam_sls_phases(searched_fraction: float = 1.0, direction_saved: bool = True) -> list:
    """AdamSLS with one accepted trial: gradient check + save (moments, w0, d) + trial over the searched
    parameters + final.

    LayerwiseAdamSLS ("cycle") searches one of n groups per step: over a cycle the trial touches
    1/n of the parameters per step on average.
    """
    save, trial = adam_search_ops(direction_saved)
    return [ADAM_GRAD_CHECK, (save, 1.0), (trial, searched_fraction), ("ls_final_adam", 1.0)]


ARMIJO_SGD_PHASES = [("ls_save_sgd", 1.0), ("ls_trial_sgd", 1.0)]  # the accepted trial is the step
