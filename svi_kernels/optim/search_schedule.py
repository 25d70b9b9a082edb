"""When a line-search optimizer runs its search (the ``search=`` argument), and when it skips it.

A skipped step reads nothing back and runs no trial: it moves along the step's direction with the
stored step size, in one fused update (the cost of an AdamW step). The schedules:

- ``"every"``: search on every step (ArmijoSGD, AdamSLS and LayerwiseAdamSLS by default).
- an int ``k >= 1``: search on steps 1, k+1, 2k+1, ...
- ``"salsa"``: the rule of ``salsa-optimizer`` 0.1.0 (Kenneweg et al. 2024), reproduced exactly:
  always on steps 1..9; afterwards when the number of steps since the last search reaches
  ``min(10, 1 / (r - 1 + 1e-8))``, r = fast / slow average of the accepted step size (inverted when
  below 1), averages 0.9 and 0.99 started at 1e-8 without bias correction. Because of that start the
  averages lag the step size for hundreds of searches (r stays far from 1), so a run of a few hundred
  steps still searches on most of its steps.
- ``"auto"``: ours. The same idea with the start fixed: bias-corrected averages of log(step size),
  so they agree as soon as the step size settles; ``AUTO_WARMUP`` searches first; then the gap to
  the next search is ``1 / |fast - slow|`` steps (the log step size's drift per step, inverted),
  at most ``AUTO_MAX_INTERVAL``. A search that moves the step size by more than one backtrack-or-growth
  factor (``AUTO_JUMP``) restarts the gap at 1 until the step size settles again.

With several param groups each group keeps its own averages; a step searches when any group asks.
The schedule's state is a plain dict inside ``opt.ls_state["search"]`` (so it is in ``state_dict``);
``decide`` reads it, ``advance`` commits the step once it has succeeded (a refused step changes nothing).
"""
from __future__ import annotations

import math
from typing import Dict, Union

SALSA_WARMUP_STEPS = 10  # the package searches while step < 10
SALSA_MAX_INTERVAL = 10
SALSA_AVG_START = 1e-8
SALSA_SLOW, SALSA_FAST = 0.99, 0.9

AUTO_WARMUP = 5
AUTO_MAX_INTERVAL = 25
AUTO_SLOW, AUTO_FAST = 0.99, 0.8
AUTO_JUMP = math.log(1.5)  # |log(eta_new / eta_old)| above this: the step size is still moving

NAMES = ("every", "salsa", "auto")


def check_search(search) -> Union[str, int]:
    """Validate a ``search=`` value: "every", "salsa", "auto" or an int k >= 1."""
    if isinstance(search, bool):
        raise ValueError(f"Invalid search {search!r}: expected 'every', 'salsa', 'auto' or an int k >= 1")
    if isinstance(search, int):
        if search < 1:
            raise ValueError(f"Invalid search {search}: an integer schedule searches every k-th step, k >= 1")
        return search
    if search not in NAMES:
        raise ValueError(f"Invalid search {search!r}: expected 'every', 'salsa', 'auto' or an int k >= 1")
    return search


def new_state(search, n_groups: int) -> dict:
    search = check_search(search)
    state = {"kind": search, "since": 0, "n_searches": 0, "n_skipped": 0}
    if search == "salsa":
        state.update(since=100, fast=[SALSA_AVG_START] * n_groups, slow=[SALSA_AVG_START] * n_groups)
    elif search == "auto":
        state.update(fast=[0.0] * n_groups, slow=[0.0] * n_groups, n=[0] * n_groups, jump=[False] * n_groups)
    return state


def add_group(state: dict) -> None:
    """A param group added after construction starts with fresh averages."""
    if state["kind"] == "salsa":
        state["fast"].append(SALSA_AVG_START)
        state["slow"].append(SALSA_AVG_START)
    elif state["kind"] == "auto":
        state["fast"].append(0.0)
        state["slow"].append(0.0)
        state["n"].append(0)
        state["jump"].append(False)


def _salsa_needed(fast: float, slow: float) -> float:
    rate = fast / slow
    if rate < 1:
        rate = 1 / rate
    return min(SALSA_MAX_INTERVAL, 1 / ((rate - 1) + 1e-8))


def _auto_interval(state: dict, gi: int) -> float:
    n = state["n"][gi]
    if n < AUTO_WARMUP or state["jump"][gi]:
        return 1
    fast = state["fast"][gi] / (1 - AUTO_FAST ** n)
    slow = state["slow"][gi] / (1 - AUTO_SLOW ** n)
    drift = abs(fast - slow)
    return AUTO_MAX_INTERVAL if drift * AUTO_MAX_INTERVAL <= 1 else max(1.0, 1 / drift)


def decide(state: dict, step: int) -> bool:
    """Does step ``step`` (1-based) search? Reads the state only."""
    kind = state["kind"]
    if kind == "every":
        return True
    since = state["since"] + 1  # steps since the last search, this one included
    if isinstance(kind, int):
        return (step - 1) % kind == 0
    if kind == "salsa":
        if step < SALSA_WARMUP_STEPS:
            return True
        return any(since >= _salsa_needed(f, s) for f, s in zip(state["fast"], state["slow"]))
    return any(since >= _auto_interval(state, gi) for gi in range(len(state["fast"])))


def advance(state: dict, searched: bool, etas: Dict[int, float], old_etas: Dict[int, float]) -> None:
    """Commit a successful step: ``etas`` are the accepted step sizes of the searched groups (by
    index), ``old_etas`` their stored values before the step."""
    if not searched:
        state["since"] += 1
        state["n_skipped"] += 1
        return
    state["since"] = 0
    state["n_searches"] += 1
    kind = state["kind"]
    for gi, eta in etas.items():
        if kind == "salsa":  # the package's arithmetic, operation for operation
            state["slow"][gi] = state["slow"][gi] * SALSA_SLOW + eta * (1 - SALSA_SLOW)
            state["fast"][gi] = state["fast"][gi] * SALSA_FAST + eta * (1 - SALSA_FAST)
        elif kind == "auto" and eta > 0 and math.isfinite(eta):
            x = math.log(eta)
            state["slow"][gi] = AUTO_SLOW * state["slow"][gi] + (1 - AUTO_SLOW) * x
            state["fast"][gi] = AUTO_FAST * state["fast"][gi] + (1 - AUTO_FAST) * x
            state["n"][gi] += 1
            old = old_etas.get(gi)
            state["jump"][gi] = bool(old) and abs(x - math.log(old)) > AUTO_JUMP
