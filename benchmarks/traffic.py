"""Bytes moved per parameter by each fused op, from the op's reads and writes of each operand.

Every row reports the traffic of the *fused* implementation of what it computes, so a torch or
reference-style row doing the same update gets the same bytes/param and its GB/s is an effective
bandwidth (useful bytes / time), directly comparable with ours and with the streaming bandwidth.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

# (reads, writes) per element, by operand role:
#   param: the parameter p; grad: its gradient g;
#   copy:  scratch in p's dtype: the start point w0 of a line search, where the step keeps one
#          (fp16/bf16 parameters, keep_start_point=True; svi_kernels/optim/trial_points.py);
#   state: optimizer state (Adam's m and v, the momentum buffer).
OP_ACCESSES: Dict[str, Dict[str, Tuple[int, int]]] = {
    "adam_step": {"param": (1, 1), "grad": (1, 0), "state": (2, 2)},                   # p,g,m,v -> p,m,v
    "sgd_momentum_step": {"param": (1, 1), "grad": (1, 0), "state": (1, 1)},           # p,g,buf -> p,buf
    "ls_save_sgd": {"param": (1, 0), "grad": (1, 0), "copy": (0, 1)},                  # p,g -> w0 (+ sum g^2)
    "ls_save_adam": {"param": (1, 0), "grad": (1, 0), "state": (2, 2), "copy": (0, 1)},  # p,g,m,v -> w0,m,v
    "ls_trial_sgd": {"param": (0, 1), "grad": (1, 0), "copy": (1, 0)},                 # w0,g -> p
    "ls_trial_adam": {"param": (0, 1), "grad": (1, 0), "state": (1, 0), "copy": (1, 0)},  # w0,g,v -> p
    "ls_final_adam": {"param": (0, 1), "state": (2, 0), "copy": (1, 0)},               # w0,m,v -> p
    # the Adam final step from the last (in-place) trial point, w0 recovered in registers
    "ls_final_adam_from_trial": {"param": (1, 1), "grad": (1, 0), "state": (2, 0)},   # p,g,m,v -> p
}
KEPT_W0_OPS = ("ls_save_sgd", "ls_save_adam", "ls_trial_sgd", "ls_trial_adam", "ls_final_adam")


def without_w0(op: str) -> str:
    """``op`` as a line search calls it with no kept start point: a save given an empty w0 reads
    neither p nor w0 and writes no copy (``_no_w0``: ls_save_sgd reads only g); a move given w0 = p
    reads p where it read w0 (``_in_place``)."""
    return op + ("_no_w0" if op.startswith("ls_save") else "_in_place")


def _accesses_without_w0(op: str) -> Dict[str, Tuple[int, int]]:
    acc = dict(OP_ACCESSES[op])
    w0_reads, _w0_writes = acc.pop("copy")
    if op.startswith("ls_save"):
        acc.pop("param")  # p is read only to be copied
    else:
        acc["param"] = (acc["param"][0] + w0_reads, acc["param"][1])
    return acc


OP_ACCESSES.update({without_w0(op): _accesses_without_w0(op) for op in KEPT_W0_OPS})

Phases = Iterable[Tuple[str, float]]  # (op, how many times per step; fractions allowed)


def op_bytes(op: str, param_itemsize: int, state_itemsize: Optional[float] = None) -> float:
    """Bytes per parameter element of one call of ``op``; state defaults to the param dtype (a fraction
    counts quantised state with its scales: 1 + 4/256 for 8-bit codes with one fp32 scale per 256)."""
    state_itemsize = param_itemsize if state_itemsize is None else state_itemsize
    size = {"param": param_itemsize, "grad": param_itemsize, "copy": param_itemsize, "state": state_itemsize}
    return float(sum((r + w) * size[role] for role, (r, w) in OP_ACCESSES[op].items()))


def bytes_per_param(phases: Phases, param_itemsize: int, state_itemsize: Optional[float] = None) -> float:
    """Sum of the phases' traffic: e.g. a line-search step is save + trial(s) + final."""
    return float(sum(count * op_bytes(op, param_itemsize, state_itemsize) for op, count in phases))


def line_search_op(op: str, keeps_w0: bool) -> str:
    """The form of ``op`` a line search runs: from a kept w0, or without one (``without_w0``)."""
    return op if keeps_w0 else without_w0(op)


# Before their save phase touches the moments, the Adam line searches check every gradient finite
# with ArmijoSGD's save op given an empty w0 (sum g^2 per tensor, nothing written): _line_search._grad_norms.
ADAM_GRAD_CHECK = (without_w0("ls_save_sgd"), 1.0)


def armijo_sgd_phases(keeps_w0: bool = False) -> list:
    """ArmijoSGD with one accepted trial: save (sum g^2; w0 <- p where kept) + the trial, which is the step."""
    return [(line_search_op("ls_save_sgd", keeps_w0), 1.0), (line_search_op("ls_trial_sgd", keeps_w0), 1.0)]


def adam_search_phases(keeps_w0: bool = False) -> list:
    """A searched Adam step up to its first trial: the gradient check, the save (moments; w0 where
    kept), one trial (SaLSA's accepted trial is its step)."""
    return [ADAM_GRAD_CHECK, (line_search_op("ls_save_adam", keeps_w0), 1.0),
            (line_search_op("ls_trial_adam", keeps_w0), 1.0)]


def adam_sls_phases(searched_fraction: float = 1.0, keeps_w0: bool = False) -> list:
    """AdamSLS with one accepted trial: gradient check + save + trial over the searched parameters +
    final step. The final step from a kept w0 is ls_final_adam over every parameter; in place it is
    ls_final_adam_from_trial for the searched parameters (at their trial point) and ls_final_adam
    in place for those still at w0.

    LayerwiseAdamSLS ("cycle") searches one of n groups per step: over a cycle the trial touches
    1/n of the parameters per step on average.
    """
    phases = adam_search_phases(keeps_w0)
    phases[-1] = (phases[-1][0], searched_fraction)
    if keeps_w0:
        return phases + [("ls_final_adam", 1.0)]
    phases.append(("ls_final_adam_from_trial", searched_fraction))
    if searched_fraction < 1.0:
        phases.append((without_w0("ls_final_adam"), 1.0 - searched_fraction))
    return phases
