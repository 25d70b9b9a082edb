"""Where a line-search step has moved each param group, and how it moves them (issue 23).

By default the trials move the parameters in place: from the start point w0 of the step, a group at
the trial point ``w0 - eta_prev * d`` goes to ``w0 - eta * d`` by ``p <- p - (eta - eta_prev) * d``,
with d recomputed from what the optimizer already holds (g for ArmijoSGD; g and v for the Adam trial
direction g / (sqrt(v_hat) + eps); m and v for the momentum direction m_hat / (sqrt(v_hat) + eps)).
So neither w0 nor d is stored: ArmijoSGD keeps 0 B/param, the Adam line searches their moments only.
Each in-place move rounds once, so after K moves a point differs from ``w0 - eta * d`` computed from
w0 by at most about K roundings (docs/kernels.md, "In-place trials", states and tests/optim/
test_trial_points.py tests the bound). The final Adam step from a trial point is one fused pass
(ls_final_adam_from_trial); an accepted SGD or SaLSA trial is already the new point.

``keep_start_point=True`` keeps a copy of w0 (+4 B/param on every step): trials and the final step
are then taken from it (the release's bits), and a failed step puts w0 back bit for bit. fp16 and bf16
parameters always keep it (KEEP_DTYPES, 2 B/param: their mantissa is too short to move in place).

If anything raises during the search (the closure, a refused launch, KeyboardInterrupt), ``restoring``
moves every group back to the start point (exactly with a kept w0, else within the bound) and puts
back the step sizes and averages the step had changed, before the error propagates.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Dict, Iterable, Optional

import torch

from . import bucketing
from .adamw import adam_scalars

# Directions of a move: the gradient (ArmijoSGD), Adam's trial direction g / (sqrt(v_hat) + eps),
# and the momentum direction m_hat / (sqrt(v_hat) + eps) (the final Adam step, SaLSA's use_mv trials).
SGD, ADAM, MOMENTUM = "sgd", "adam", "momentum"
# The tensor lists each direction's op reads after (params, base point).
_READS = {SGD: ("grads",), ADAM: ("grads", "exp_avg_sqs"), MOMENTUM: ("exp_avgs", "exp_avg_sqs")}
# Parameter dtypes whose start point is always kept (2 B/param): with an 8- or 11-bit mantissa every
# in-place move rounds to a coarse grid, and a backtrack smaller than half an ulp of p would not move
# the point at all (a long search would stay near its first trial); fp16's range also ends at 65504,
# and a trial point that overflowed to inf could not be moved back. (In fp32/fp64 an overflow takes
# |eta * d| > 3e38: refused, see check_finite.)
KEEP_DTYPES = (torch.float16, torch.bfloat16)


def check_keep_start_point(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"keep_start_point must be True or False, got {value!r}")
    return value


class TrialPoints:
    """The parameters of one step's searched groups relative to the start point: ``at[gi]`` is
    (direction, eta) for a group at ``w0 - eta * d``, absent for a group at w0. Buckets with a kept
    w0 (``t.w0``: keep_start_point, fp16) move from it, the others in place."""

    def __init__(self, opt, t, step: Optional[int] = None):
        self.opt = opt
        self.t = t  # the step's StepTensors
        self.step = step  # Adam's bias-correction step t (None for ArmijoSGD)
        self.at: Dict[int, tuple] = {}

    # ------------------------------------------------------------------ moves
    def move(self, etas: Dict[int, float], direction: str) -> None:
        """Put each group ``gi`` of ``etas`` at ``w0 - etas[gi] * d`` (d along ``direction``)."""
        deltas: Dict[int, float] = {}
        from_trial: Dict[float, Dict[int, float]] = {}  # the final Adam step, by the trial eta groups are at
        for gi, eta in etas.items():
            where = self.at.get(gi)
            if where is None or where[0] == direction:
                deltas[gi] = eta - (where[1] if where is not None else 0.0)
            elif where[0] == ADAM and direction == MOMENTUM:
                from_trial.setdefault(where[1], {})[gi] = eta
            else:  # (no optimizer changes direction otherwise) back to w0 first
                self.restore([gi])
                deltas[gi] = eta
        if self.t.any_kept:
            self._launch(etas, direction, kept=True)
        moved = {gi: d for gi, d in deltas.items() if d != 0.0}
        if moved:
            self._launch(moved, direction, kept=False)
        for trial_eta, finals in from_trial.items():
            self._final_from_trial(finals, trial_eta)
        for gi, eta in etas.items():
            self.at[gi] = (direction, eta)

    def restore(self, gids: Iterable[int]) -> None:
        """Put the groups ``gids`` back at the start point (bit for bit where w0 is kept)."""
        gids = [gi for gi in gids if gi in self.at]
        for _device, _g, (params, w0), _pos, _n in self.t.buckets(["params", "w0"], gids=gids) if self.t.any_kept else ():
            if w0[0] is not None:
                torch._foreach_copy_(params, w0)
        for direction in (SGD, ADAM, MOMENTUM):
            back = {gi: -self.at[gi][1] for gi in gids if self.at[gi][0] == direction and self.at[gi][1] != 0.0}
            if back:
                self._launch(back, direction, kept=False)
        for gi in gids:
            del self.at[gi]

    @contextlib.contextmanager
    def restoring(self):
        """On any exception inside: every group back at the start point, and the line-search state
        (step sizes, backtracks, SaLSA's averages, the cycle position) as before the step; then re-raise."""
        ls = self.opt.ls_state
        saved = {k: (list(v) if isinstance(v, list) else v) for k, v in ls.items() if k != "search"}
        if ls["search"]["kind"] == "auto":  # (its search notes where the search started and how it went)
            saved["search"] = copy.deepcopy(ls["search"])
        try:
            yield self
        except BaseException:
            self.restore(list(self.at))
            ls.update(saved)
            raise

    def check_finite(self, gids: Iterable[int]) -> None:
        """After a non-finite trial loss: the in-place groups' parameters must still be finite (a trial
        point that overflowed its dtype cannot be moved back without a kept w0). Reads p once; sharded
        parameters decide on the sums over all shards, so every rank raises or none."""
        from ._closure import read_host
        from ._line_search import DeviceSums
        parts = []
        for device, g, (params, w0), pos, n_check in self.t.buckets(["params", "w0"], gids=list(gids)):
            if w0[0] is None:
                impl = bucketing.backend_for(g["backend"], device, [params, params], n_check and 2)
                parts.append((pos, impl.ls_save_sgd(params, params, [])))  # sum(p^2) per tensor
        sums = DeviceSums(self.t, parts)
        if parts and not all(map(math.isfinite, read_host(sums.tensors()))):
            raise FloatingPointError(
                f"{self.opt._name}: a trial point overflowed the parameters' dtype (step size times the search "
                f"direction beyond its range), and without a copy of the start point it cannot be moved back; "
                f"construct the optimizer with keep_start_point=True")

    # ---------------------------------------------------------------- launches
    def _launch(self, etas: Dict[int, float], direction: str, kept: bool) -> None:
        """The buckets with a kept w0 (``kept``): p <- w0 - eta * d; the others: p <- p - eta * d (an
        in-place move by eta). One fused launch per bucket."""
        t = self.t
        names = ["params", "w0" if kept else "params"] + list(_READS[direction])
        buckets = t.state_buckets(names, gids=list(etas)) if direction != SGD else \
            [b + ({},) for b in t.buckets(names, gids=list(etas))]
        for device, g, lists, pos, n_check, int8 in buckets:
            if t.any_kept and (t.lists(["w0"], pos)[0][0] is not None) != kept:
                continue
            impl = bucketing.backend_for(g["backend"], device, lists, n_check)
            per_tensor = t.per_tensor(etas, pos)
            if direction == SGD:
                impl.ls_trial_sgd(*lists, per_tensor)
                continue
            bc1, bc2_sqrt = adam_scalars(self.step, *g["betas"], True)
            if direction == ADAM:
                impl.ls_trial_adam(*lists, per_tensor, **int8, eps=g["eps"], bias_correction2_sqrt=bc2_sqrt)
            else:
                impl.ls_final_adam(*lists, per_tensor, **int8, eps=g["eps"], bias_correction1=bc1,
                                   bias_correction2_sqrt=bc2_sqrt)

    def _final_from_trial(self, etas: Dict[int, float], trial_eta: float) -> None:
        """The final Adam step (eta per group) of in-place groups at the trial point
        ``w0 - trial_eta * g / denom`` (the kept buckets took it from w0 in ``move``)."""
        t = self.t
        for device, g, lists, pos, n_check, int8 in t.state_buckets(["params", "grads", "exp_avgs", "exp_avg_sqs"],
                                                                  gids=list(etas)):
            if t.any_kept and t.lists(["w0"], pos)[0][0] is not None:
                continue
            bc1, bc2_sqrt = adam_scalars(self.step, *g["betas"], True)
            impl = bucketing.backend_for(g["backend"], device, lists, n_check)
            impl.ls_final_adam_from_trial(*lists, t.per_tensor(etas, pos), **int8, trial_eta=trial_eta, eps=g["eps"],
                                          bias_correction1=bc1, bias_correction2_sqrt=bc2_sqrt)
