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
- ``"auto"``: ours. The package measures the drift of the step size per *search*, from averages that
  start at 1e-8; what a skipped step risks is the drift per *step*. So: after each search, the change
  of log(step size) since the previous search divided by the steps between them, averaged (``rate``);
  the next search comes when the step size may have moved by ``AUTO_TOLERANCE`` (x1.25, about one
  backtrack): after ``AUTO_TOLERANCE / rate`` steps, between 1 and ``AUTO_MAX_INTERVAL``. A search whose
  step size moved by more than ``AUTO_JUMP`` (x1.5) restarts the estimate (searches on the next
  ``AUTO_WARMUP`` steps). A search's own resolution (x1.1 growth, x0.8 backtrack) then lets the gap grow
  about 2x per search while the step size only jitters, and keeps it short while it trends.
  *Climbing*: a search that takes its first trial, where the quadratic through f0, the slope and the
  trial's loss passes the test up to ``AUTO_HEADROOM`` (2x) its step or more, says the step size is
  held by the growth before each search, not by the test; after ``AUTO_CLIMB`` such searches in a row
  the next search comes once the growth could have reached the tolerance (2 steps at SaLSA's 1.1x),
  and initial_step.start lets the search catch up the growth of the skipped steps. Without it a run
  whose step size started (or fell) far too small grew it once per search and stayed near chance loss
  where ``"every"`` learned
  (tests/optim/test_initial_step.py). Under ``"auto"`` the search also backtracks by interpolation
  (initial_step.backtrack).
  Designed on a 600-step fine-tuning run (docs/results.md, claim 2b). Known limit: SaLSA's smoothed test
  moves its step size by about one notch per search, so when the step size trends slowly (late in
  training) the gaps stay long and SaLSA's step size lags the one found by searching every step (there:
  ~3x larger at the end, same accuracy within one std over 10 seeds).

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

AUTO_WARMUP = 2
AUTO_MAX_INTERVAL = 25
AUTO_TOLERANCE = math.log(1.25)  # how far log(step size) may drift between two searches
AUTO_CLIMB = 2  # this many searches in a row took their first trial with room to spare: the step size is climbing
AUTO_HEADROOM = 2.0  # room to spare: the accepted trial's quadratic model passes the test up to this x its step
AUTO_JUMP = math.log(1.5)  # a search moving the step size by more: a new level, the estimate restarts

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
        state.update(rate=[0.0] * n_groups, n=[0] * n_groups, start=[None] * n_groups, growth=[1.0] * n_groups,
                     climb=[0] * n_groups)
    return state


def add_group(state: dict) -> None:
    """A param group added after construction starts with fresh averages."""
    if state["kind"] == "salsa":
        state["fast"].append(SALSA_AVG_START)
        state["slow"].append(SALSA_AVG_START)
    elif state["kind"] == "auto":
        for key, value in (("rate", 0.0), ("n", 0), ("start", None), ("growth", 1.0), ("climb", 0)):
            state.setdefault(key, []).append(value)


def _salsa_needed(fast: float, slow: float) -> float:
    rate = fast / slow
    if rate < 1:
        rate = 1 / rate
    return min(SALSA_MAX_INTERVAL, 1 / ((rate - 1) + 1e-8))


def _auto_interval(state: dict, gi: int) -> float:
    if state["n"][gi] < AUTO_WARMUP:
        return 1
    rate = state["rate"][gi]
    gap = AUTO_MAX_INTERVAL if rate * AUTO_MAX_INTERVAL <= AUTO_TOLERANCE else max(1.0, AUTO_TOLERANCE / rate)
    if state.get("climb", [0] * len(state["n"]))[gi] >= AUTO_CLIMB:  # (absent in checkpoints from before it)
        # climbing: search again once the growth could have reached AUTO_TOLERANCE
        return min(gap, max(1, math.floor(AUTO_TOLERANCE / math.log(state["growth"][gi]))))
    return gap


def note_start(state: dict, gi: int, eta: float, growth: float) -> None:
    """A search of group ``gi`` starts at ``eta``, its step size growing by ``growth`` per step
    (initial_step.start): a search that accepts this first trial with room to spare is climbing (see
    ``advance``)."""
    if state["kind"] == "auto" and "start" in state:
        state["start"][gi] = eta
        state["growth"][gi] = growth
        state["current"] = gi  # the group whose trials note_headroom hears about
        state["trial"] = None  # initial_step.backtrack's last failed trial of this search
        state.setdefault("headroom", [None] * len(state["n"]))[gi] = None


def note_headroom(state: dict, headroom: float) -> None:
    """The accepted trial of the current search: on the quadratic through f0, the slope and its loss,
    the test would pass up to ``headroom`` x its step size (initial_step.accepted)."""
    if state["kind"] == "auto" and state.get("current") is not None:
        state["headroom"][state["current"]] = headroom


def climbing(state: dict, gi: int) -> bool:
    """Did group ``gi``'s last search accept its first trial (its step size held by the growth)?"""
    return state["kind"] == "auto" and bool(state.get("climb", [0] * (gi + 1))[gi])


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
    return any(since >= _auto_interval(state, gi) for gi in range(len(state["n"])))


def advance(state: dict, searched: bool, etas: Dict[int, float], old_etas: Dict[int, float]) -> None:
    """Commit a successful step: ``etas`` are the accepted step sizes of the searched groups (by
    index), ``old_etas`` their stored values before the step."""
    if not searched:
        state["since"] += 1
        state["n_skipped"] += 1
        return
    steps = state["since"] + 1  # steps since the previous search, this one included
    state["since"] = 0
    state["n_searches"] += 1
    kind = state["kind"]
    for gi, eta in etas.items():
        if kind == "salsa":  # the package's arithmetic, operation for operation
            state["slow"][gi] = state["slow"][gi] * SALSA_SLOW + eta * (1 - SALSA_SLOW)
            state["fast"][gi] = state["fast"][gi] * SALSA_FAST + eta * (1 - SALSA_FAST)
        elif kind == "auto":
            if "start" in state:  # (absent in checkpoints from before it)
                growth, start = state["growth"][gi], state["start"][gi]
                room = state.get("headroom", [None] * (gi + 1))[gi]
                # took its first trial, and the test would have taken a much larger one (None: not known)
                held = start is not None and eta == start and growth > 1.0 and (room is None or room >= AUTO_HEADROOM)
                state["climb"][gi] = state["climb"][gi] + 1 if held else 0
                state["start"][gi] = None
            old = old_etas.get(gi)
            moved = abs(math.log(eta / old)) if eta > 0 and old and old > 0 and math.isfinite(eta / old) else math.inf
            if moved > AUTO_JUMP:  # a new level: start the estimate again
                state["n"][gi], state["rate"][gi] = 0, 0.0
            elif state["n"][gi] > 0:  # the first search after a restart has no previous one to compare
                d = moved / steps
                state["rate"][gi] = d if state["n"][gi] == 1 else 0.5 * (state["rate"][gi] + d)
            state["n"][gi] += 1
