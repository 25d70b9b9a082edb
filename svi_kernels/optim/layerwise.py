"""LayerwiseAdamSLS: PLASLS, one Armijo step size per param group (Kenneweg et al. 2023).

Each param group (e.g. from ``svi_kernels.layer_groups(model)``) keeps its own step size.

- Warm-up (the first ``warmup_steps`` steps): one global search with a common step size over all
  groups; afterwards every group starts from the accepted value. The sufficient decrease uses the
  preconditioned norm summed over all groups (the authors' code uses the last group's only, a quirk
  we do not reproduce).
- ``strategy="cycle"``: each later step searches one group, cycling through them in order (with
  ``criterion="code"``, groups before it have already moved with their stored (grown) step size when
  its trials run, groups after it have not yet). Every other group moves with its stored step size.
  Cost per step: 1 forward+backward + (1 + backtracks) forwards, whatever the number of groups.
- ``strategy="all"``: every group is searched each step, in order (1 + backtracks forwards per group).
- ``criterion``: which point a group's trials are evaluated at (after warm-up).
  ``"code"`` (default) is the authors' code, as described above: the trials of group k see the groups
  already moved this step at their new values. ``"paper"`` is the paper's condition
  f(w0 + eta d_k) <= f(w0) - c * eta * s_k, with d_k non-zero in group k only: every other group stays
  at its start-of-step point w0 during group k's trials. With ``"cycle"`` the step then moves every group
  (the searched one with its accepted eta, the others with their stored ones); with ``"all"`` each
  searched group goes back to w0 before the next one is searched, and all groups move at the end.
- Memory: m and v only (8 B/param in fp32; 4 B/param with AdamSLS's ``state_dtype=torch.bfloat16``,
  ~2.03 B/param with ``state_dtype="int8"``),
  warm-up included: the trials move the parameters in
  place (trial_points.py); with ``"paper"`` and ``"all"`` a searched group goes back to w0 by one
  more in-place move. ``keep_start_point=True`` keeps a copy of w0 (+4 B/param).
- ``merge_threshold``: after a step, while there are more than 2 groups and the smallest step size is
  below it, the two groups with the smallest step sizes are merged (their params concatenated, the
  mean of their step sizes kept). Merging changes ``param_groups``, so a checkpoint taken after a merge
  loads only into an optimizer with the same groups.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import initial_step
from . import master_weights
from ._line_search import reset_step_size
from .adam_sls import AdamSLS
from .trial_points import MOMENTUM

CRITERIA = ("code", "paper")


def check_criterion(criterion) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"Invalid criterion {criterion!r}: expected 'code' (the authors' code) or "
                         f"'paper' (the paper's per-group Armijo condition)")
    return criterion


class LayerwiseAdamSLS(AdamSLS):
    _name = "LayerwiseAdamSLS"

    def __init__(self, params, warmup_steps: int = 6, strategy: str = "cycle",
                 merge_threshold: Optional[float] = None, criterion: str = "code", **adam_sls_kwargs):
        if strategy not in ("cycle", "all"):
            raise ValueError(f"Invalid strategy {strategy!r}: expected 'cycle' or 'all'")
        if int(warmup_steps) < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps} (must be >= 0)")
        if merge_threshold is not None and not float(merge_threshold) > 0.0:
            raise ValueError(f"Invalid merge_threshold: {merge_threshold} (must be > 0 or None)")
        check_criterion(criterion)
        super().__init__(params, **adam_sls_kwargs)
        self.warmup_steps = int(warmup_steps)
        self.strategy = strategy
        self.merge_threshold = None if merge_threshold is None else float(merge_threshold)
        self.criterion = criterion

    def state_dict(self):
        sd = super().state_dict()
        sd["layerwise"] = {"warmup_steps": self.warmup_steps, "strategy": self.strategy,
                           "merge_threshold": self.merge_threshold, "criterion": self.criterion}
        return sd

    def load_state_dict(self, state_dict):
        extra = state_dict.get("layerwise")
        if extra is not None:  # checkpoints from before the option was added were taken with "code"
            check_criterion(extra.get("criterion", "code"))
        state_dict = {k: v for k, v in state_dict.items() if k != "layerwise"}
        super().load_state_dict(state_dict)
        if extra is not None:
            self.warmup_steps = extra["warmup_steps"]
            self.strategy = extra["strategy"]
            self.merge_threshold = extra["merge_threshold"]
            self.criterion = extra.get("criterion", "code")

    @master_weights.line_search_step  # (master_weights= modes: fp32 working copies)
    def step(self, closure=None):
        """One PLASLS step. ``closure`` returns the loss and does not call backward. Returns the loss."""
        with torch.no_grad():
            # The warm-up steps always search; afterwards the search= schedule may skip a step.
            runner, loss, f0, points, s, step = self._begin(closure,
                                                             force_search=self.ls_state["step"] < self.warmup_steps)
            if points is None:
                return loss
            ls = self.ls_state
            old = dict(enumerate(ls["step_sizes"]))
            with points.restoring():  # an error in the search puts the start point back
                searched = self._search_groups(runner, f0, points, s, step)
            chosen = list(range(len(self.param_groups))) if searched is None else searched
            self._finish(runner, True, {i: ls["step_sizes"][i] for i in chosen}, {i: old[i] for i in chosen})
            self._merge()
        return loss

    def _search_groups(self, runner, f0, points, s, step: int):
        """This step's searches and final steps; returns the groups whose step size a search chose
        (None: all)."""
        ls = self.ls_state
        n = len(self.param_groups)
        etas = [reset_step_size(ls["step_sizes"][i], g) for i, g in enumerate(self.param_groups)]
        everyone = list(range(n))
        if step <= self.warmup_steps:
            eta, backtracks, found = self._search(runner, f0, points, s, everyone,
                                                  initial_step.start(ls, etas[0], self.param_groups[0], 0),
                                                  self.param_groups[0])
            points.move({i: eta for i in everyone}, MOMENTUM)
            for i in everyone:
                self._record(i, eta, backtracks if i == 0 else 0, found)
            return None
        if self.strategy == "all":
            paper = self.criterion == "paper"
            for i, group in enumerate(self.param_groups):
                start = initial_step.start(ls, etas[i], group, i)  # search="auto": may catch up (ours)
                eta, backtracks, found = self._search(runner, f0, points, s, [i], start, group)
                etas[i] = eta
                if paper:  # the next group's trials must see this one at w0 again
                    if i + 1 < n:
                        points.restore([i])
                else:
                    points.move({i: eta}, MOMENTUM)
                self._record(i, eta, backtracks, found)
            if paper:
                points.move({i: etas[i] for i in everyone}, MOMENTUM)
            return None
        k = ls.setdefault("next_group", 0) % n
        # "code": groups before k move first, so k's trials see them moved; "paper": every
        # group but k stays at w0 (its trial op touches only group k's tensors).
        before = {i: etas[i] for i in range(k)} if self.criterion == "code" else {}
        if before:
            points.move(before, MOMENTUM)
        start = initial_step.start(ls, etas[k], self.param_groups[k], k)  # search="auto" (ours)
        eta, backtracks, found = self._search(runner, f0, points, s, [k], start, self.param_groups[k])
        etas[k] = eta
        points.move({i: etas[i] for i in everyone if i not in before}, MOMENTUM)
        for i in everyone:
            self._record(i, etas[i], backtracks if i == k else 0, found if i == k else True)
        ls["next_group"] = (k + 1) % n
        return [k]

    def _merge(self) -> None:
        if self.merge_threshold is None:
            return
        ls = self.ls_state
        while len(self.param_groups) > 2 and min(ls["step_sizes"]) < self.merge_threshold:
            order = sorted(range(len(self.param_groups)), key=lambda i: ls["step_sizes"][i])
            a, b = sorted(order[:2])
            merged = dict(self.param_groups[a])
            merged["params"] = list(self.param_groups[a]["params"]) + list(self.param_groups[b]["params"])
            eta = 0.5 * (ls["step_sizes"][a] + ls["step_sizes"][b])
            self.param_groups[a] = merged
            del self.param_groups[b]
            for key in ("step_sizes", "n_backtracks", "found"):
                vals = ls[key]
                vals[a] = eta if key == "step_sizes" else (vals[a] + vals[b] if key == "n_backtracks"
                                                            else vals[a] and vals[b])
                del vals[b]
            if "next_group" in ls:
                ls["next_group"] %= len(self.param_groups)
