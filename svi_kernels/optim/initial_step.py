"""The step sizes a search tries under ``search="auto"``: where it starts and where it goes after a
failed trial. Ours, not the papers'; every other ``search=`` value keeps the papers' search exactly.

- *Start, caught up.* The papers grow the stored step size once per step before searching (AdamSLS,
  ArmijoSGD, LayerwiseAdamSLS: ``gamma^(1/n_batches_per_epoch)`` with reset_option 1; SaLSA:
  ``growth``). A step skipped by the schedule does not grow it, so a search after ``k`` skipped steps
  started from the stored value grown once: the step size rose once per *search*, where searching
  every step lets it rise once per *step*. A run whose first searches landed on a far too small step
  size stayed there (a binary task stuck near chance loss while ``"every"`` learned it). While the
  schedule says the group is climbing (its last searches took their first trial with room to spare:
  search_schedule), the search starts from the stored value grown once per step since the last
  search: the growth "every" would have had, at most ``MAX_CATCH_UP`` (1.25x, the drift the schedule
  tolerates between searches) more; the Armijo test checks it. Otherwise the start is the paper's
  (catching up where the test holds the step size would only add backtracks).
- *Interpolating backtracking.* A failed trial at ``eta`` gives f0, the slope ``-s`` (``s`` the
  sufficient-decrease sum, the directional derivative along the trial direction) and f(eta). On the
  quadratic through them the test holds up to ``t_A = (1 - c) s eta^2 / (f(eta) - f0 + s eta)`` and the
  minimum is at ``t_min = s eta^2 / (2 (f(eta) - f0 + s eta))``. The next trial is the larger of
  ``beta_b * t_A`` (where the papers' scan by beta_b would stop on that model; AdamSLS, c = 0.1: the
  minimum alone, half as far, left its slowly growing step sizes below the papers') and ``t_min``
  (SaLSA, c = 0.5). After a second failure the loss along the line is not that quadratic (a
  cross-entropy line falls steeply, then rises about linearly, and the quadratic shrinks eta by ~0.8
  a trial there): the line through the last two trials meets the Armijo line at ``t_sec``, and the
  next trial is at most ``beta_b * t_sec``, but only where ``t_sec > 0``: a line through two trials
  that lies above f0 at 0 (the two trials on a plateau: not convex with f0) meets the Armijo line at
  t <= 0 and says nothing about where the test holds; the quadratic's step is taken. (Following it
  sent the trial to the ``MIN_SHRINK`` floor. Issue 26: on the second search of a MiniLM fine-tuning
  run, claim 2b n500, that happened twice in a row, the accepted step size was ~8x below the papers'
  scan's, and AdamSLS's growth, 2^(1/500) a step, never recovered it: final step size 3.6e-5 where
  the papers' search ends near 1e-4, 5/10 seeds reaching the target.) Kept between
  ``MIN_SHRINK * eta`` and ``beta_b * eta`` (a non-finite trial loss: the lower bound), and never below
  the papers' last trial, ``start * beta_b^(max_backtracks - 1)``: a failure there ends the search, not
  found, at ``floor * beta_b``, where the papers' exhausted scan ends (``exhausted``), after a handful of
  trials where the papers' scan takes ``max_backtracks``. The papers
  multiply by ``beta_b`` (0.9 or 0.8): from ``init_step_size`` to the accepted step size of a
  fine-tuning run that took 18-40 trials on the first searches; on a pre-trained net of our own this
  takes 4-5 trials where the papers' took 21-30.
- *Headroom.* An accepted trial tells the schedule how much larger a step the test would have taken on
  the same quadratic (``accepted``): its climbing rule needs room to spare, not just a first trial.
"""
from __future__ import annotations

import math

from . import search_schedule

MIN_SHRINK = 0.1  # a failed trial shrinks eta by at most 10x (the usual safeguard of interpolation)
MAX_CATCH_UP = 1.25  # at most this much growth caught up per search (the drift "auto" tolerates between searches)


def ours(ls: dict) -> bool:
    """Does this optimizer search our way (``search="auto"``)? ``ls``: its ``ls_state``."""
    return ls["search"]["kind"] == "auto"


def growth_per_step(group: dict) -> float:
    """The factor by which the paper's rule grows a group's step size before each search (1: none)."""
    if "growth" in group:  # SaLSA
        return float(group["growth"])
    if group.get("reset_option") == 1:
        return float(group["gamma"]) ** (1.0 / group["n_batches_per_epoch"])
    return 1.0  # reset_option 0 keeps it, 2 restarts at init_step_size: nothing to catch up


def start(ls: dict, paper_start: float, group: dict, gi: int) -> float:
    """Where group ``gi``'s search starts: the paper's start (stored step size grown once); under
    ``"auto"``, while the schedule says the group is climbing (its step size held by the growth, not
    by the test), grown once more per step the schedule skipped since, at most ``MAX_CATCH_UP``."""
    if not ours(ls):
        return paper_start
    state, growth = ls["search"], growth_per_step(group)
    eta = paper_start
    if search_schedule.climbing(state, gi):
        eta *= min(growth ** state["since"], MAX_CATCH_UP)
    search_schedule.note_start(state, gi, eta, growth)
    # the papers' scan from here would try eta * beta_b^(max_backtracks - 1) last: ours goes no lower
    state["floor"] = eta * float(group["beta_b"]) ** (int(group["max_backtracks"]) - 1)
    return eta


def exhausted(ls: dict, eta: float) -> bool:
    """Under ``"auto"``: did the search just fail at the papers' last trial step size (``floor``)?
    Then it ends there, not found, as the papers' scan ends after its last trial (at ``floor * beta_b``).
    Without it, interpolation (up to 10x a trial) took a search that no step size can pass (a
    LayerwiseAdamSLS group whose trials see the other groups already moved, "code" criterion) through
    all ``max_backtracks`` trials, to a step size of ~1e-104."""
    if not ours(ls):
        return False
    floor = ls["search"].get("floor")
    return floor is not None and eta <= floor


def accepted(ls: dict, group: dict, eta: float, f0: float, f1: float, s: float) -> None:
    """A trial at ``eta`` passed: tell the schedule how much larger a step the test would take on the
    quadratic through f0, the slope -s and f1 (``"auto"`` only; search_schedule's climbing rule)."""
    if not ours(ls) or not (math.isfinite(f1) and s > 0):
        return
    curvature = f1 - f0 + s * eta
    room = (1.0 - group["c"]) * s * eta / curvature if curvature > 0 else 1e30  # no curvature seen: unbounded
    search_schedule.note_headroom(ls["search"], room)


def backtrack(ls: dict, group: dict, eta: float, f0: float, f1: float, s: float) -> float:
    """The next trial step size after a failed trial at ``eta`` (loss ``f1``, start loss ``f0``,
    slope ``-s``): the papers' ``eta * beta_b``, or under ``"auto"`` the safeguarded quadratic fit."""
    beta_b = group["beta_b"]
    if not ours(ls):
        return eta * beta_b
    lo, hi = MIN_SHRINK * eta, beta_b * eta
    state, c = ls["search"], group["c"]
    previous, state["trial"] = state.get("trial"), [eta, f1]  # (note_start clears it for each search)
    curvature = f1 - f0 + s * eta  # > 0 for a failed trial with s > 0 (f1 above the tangent line)
    if not (math.isfinite(f1) and s > 0 and curvature > 0):
        return lo if not math.isfinite(f1) else hi
    # on the model, the test holds up to (1 - c) s eta^2 / curvature (< eta: the trial failed); its
    # minimum is at half of s eta^2 / curvature
    nxt = max(beta_b * (1.0 - c), 0.5) * s * eta * eta / curvature
    if previous is not None and math.isfinite(previous[1]) and previous[0] > eta and previous[1] > f1:
        # a second failure: the loss is not that quadratic (a cross-entropy line falls steeply, then
        # rises about linearly). The line through the last two trials meets the Armijo line at t_sec.
        slope = (previous[1] - f1) / (previous[0] - eta)
        t_sec = (f0 - f1 + slope * eta) / (slope + c * s)
        if t_sec > 0:  # else the line lies above f0 at 0: not convex there, the secant says nothing
            nxt = min(nxt, beta_b * t_sec)
    return max(min(max(nxt, lo), hi), state.get("floor") or 0.0)  # never below the papers' last trial
