"""SaLSA: Adam with a smoothed Armijo line search run only while the step size still changes
(Kenneweg et al., "No learning rates needed: Introducing SALSA", IJCNN 2024).

With its defaults it follows ``salsa-optimizer`` 0.1.0 (``salsa.SaLSA.SaLSA``) step for step on
deterministic models, including the package's own choices:

- Adam moments are updated with the gradient first; bias corrections use t = completed steps + 2
  (the package corrects with ``step + 1`` after incrementing ``step``).
- Every step starts from eta = growth * eta_prev (1.1x). ``search=`` decides whether it searches
  (``"salsa"``: the package's rule, see search_schedule).
- A search step: S <- smoothing * S + (1 - smoothing) * sum(g^2 / (sqrt(v_hat) + eps)); trials
  ``p = w0 - eta * g / (sqrt(v_hat) + eps)`` (no momentum) with D = smoothing * D_bar +
  (1 - smoothing) * (f0 - f1); accepted when f1 == f0 (D_bar unchanged) or D >= c * eta * S (then
  D_bar <- D), else eta *= beta_b, at most ``max_backtracks`` trials. The parameters stay at the
  accepted trial point, and eta_prev <- eta. When f0 == 0 or S < 1e-8 the step is the momentum step
  ``w0 - eta * m_hat / (sqrt(v_hat) + eps)`` instead.
- A skipped step: ``p <- p - growth * eta_prev * m_hat / (sqrt(v_hat) + eps)`` (with momentum),
  eta_prev unchanged; one fused Adam update, no trial, nothing read back.
- ``momentum_direction=True`` (the package's ``use_mv``): trials along m_hat / (sqrt(v_hat) + eps)
  and S from sum(g * m_hat / (sqrt(v_hat) + eps)); its sum takes a few extra foreach passes.
- ``weight_decay`` as the package's current repository (after 0.1.0): p <- p - wd * eta_prev * p
  after the gradient is computed, on every step; the search starts from the decayed point (the
  start point a failed step goes back to).
- Memory: m and v (8 B/param in fp32; 4 B/param with ``state_dtype=torch.bfloat16``, stored with
  stochastic rounding; ~2.03 B/param with ``state_dtype="int8"``; state_storage.py): the trials move the parameters in place (trial_points.py);
  ``keep_start_point=True`` keeps a copy of w0 (+4 B/param).

``master_weights=`` (False, True, "kahan", "8bit", "stochastic"): fp16/bf16 parameters keep their precise
value beside p (a float32 master, a compensation, an int8 code, or none with stochastic rounding); the
search runs on float32 working copies and each trial forward sees the rounded point (master_weights.py,
docs/api.md).

Where the package is unsafe we differ (docs/api.md lists it): the RNG is replayed for every
closure call of a step (the package reseeds from the wall clock), ``state_dict`` holds the step
size and the averages (``ls_state``), param groups work (one step size each, searched in turn), a
NaN/inf loss or gradient is refused before anything changes and a non-finite trial loss is a failed
trial (the package checks the first element of the first parameter after the step), and with f0 == 0
or S < 1e-8 the momentum step spends no forward (the package spends one it does not count; the
counts agree). Host reads: one with f0, one per trial; S is read on its own first only when the guard
may apply (and always with ``momentum_direction``, whose S may be negative).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from . import bucketing
from . import hyperparams
from . import initial_step
from . import state_storage
from . import master_weights
from ._closure import read_host
from ._line_search import LS_KEY, DeviceSums, LineSearchOptimizer, StepTensors, read_first, read_trial
from .adamw import adam_scalars
from .trial_points import ADAM, MOMENTUM, TrialPoints

MIN_SUFFICIENT = 1e-8  # below this smoothed sufficient-decrease term the package does not search


def check_salsa_hyperparameters(init_step_size, c, smoothing, beta_b, growth, max_backtracks) -> None:
    hyperparams.check_positive(init_step_size, "init_step_size")
    hyperparams.check_open_unit(c, "c")
    hyperparams.check_open_unit(smoothing, "smoothing")
    hyperparams.check_open_unit(beta_b, "beta_b")
    g = hyperparams.as_float(growth, "growth")
    if not (g >= 1.0 and math.isfinite(g)):
        raise ValueError(f"Invalid growth: {g} (must be >= 1 and finite)")
    if int(max_backtracks) < 1:
        raise ValueError(f"Invalid max_backtracks: {max_backtracks} (must be >= 1)")


class SaLSA(LineSearchOptimizer):
    """SaLSA (see the module docstring). ``closure`` may be ``closure()`` (returns the loss) or the
    package's ``closure(backwards=False)`` (calls backward itself when asked).

    ``ls_state``: ``step_sizes`` (eta_prev per group, the package's ``step_size``), ``n_forwards``
    (counted as the package counts), ``avg_sufficient`` / ``avg_decrease`` (S and D_bar per group),
    ``searched`` (did the last step search), ``search`` (the schedule's state).
    """

    _name = "SaLSA"
    _uses_moments = True
    _group_keys = ("init_step_size", "c", "betas", "smoothing", "eps", "weight_decay", "beta_b", "growth",
                   "momentum_direction", "max_backtracks", "backend")

    def __init__(self, params, init_step_size=1.0, c=0.5, betas=(0.9, 0.999), smoothing=0.9, eps=1e-8,
                 weight_decay=0.0, beta_b=0.8, growth=1.1, search="salsa", momentum_direction=False,
                 max_backtracks=100, backend: Optional[str] = None, process_group=None,
                 keep_start_point: bool = False, *, master_weights=False, state_dtype: Optional[torch.dtype] = None,
                 state_block_size: int = 256):
        check_salsa_hyperparameters(init_step_size, c, smoothing, beta_b, growth, max_backtracks)
        hyperparams.check_betas(betas)
        hyperparams.check_nonneg(eps, "eps")
        hyperparams.check_nonneg(weight_decay, "weight_decay")
        defaults = dict(init_step_size=init_step_size, c=c, betas=betas, smoothing=smoothing, eps=eps,
                        weight_decay=weight_decay, beta_b=beta_b, growth=growth,
                        momentum_direction=hyperparams.check_bool(momentum_direction, "momentum_direction"),
                        max_backtracks=max_backtracks, backend=bucketing._backends.validate(backend),
                        state_dtype=state_storage.check_value(state_dtype),
                        state_block_size=state_storage.check_block_size(state_block_size),
                        master_weights=master_weights)
        super().__init__(params, defaults, process_group=process_group, search=search,
                         keep_start_point=keep_start_point)
        ls = self.ls_state
        ls["avg_sufficient"] = [0.0] * len(self.param_groups)
        ls["avg_decrease"] = [0.0] * len(self.param_groups)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        ls = self.state.get(LS_KEY)
        if ls is not None and "avg_sufficient" in ls:
            ls["avg_sufficient"].append(0.0)
            ls["avg_decrease"].append(0.0)

    @master_weights.line_search_step  # (master_weights= modes: fp32 working copies)
    def step(self, closure=None):
        """One SaLSA step; returns the loss at the start of the step."""
        with torch.no_grad():
            ls = self.ls_state
            search = self._searches_now()
            seeds = state_storage.step_seeds(self)  # (this step() call's; drawn by the launches that write m, v)
            # A searched step fails before the forward; a skipped step checks once, after it (AdamW's host cost).
            runner = self._runner(closure, check=search)
            loss = runner.first()  # the gradients are checked by the first op that reads them
            t_bias = ls["step"] + 2  # the package's bias-correction step (see the module docstring)
            old = list(ls["step_sizes"])
            grown = [eta * g["growth"] for eta, g in zip(old, self.param_groups)]
            if not search:
                decays = [1.0 - g["weight_decay"] * eta for eta, g in zip(old, self.param_groups)]
                self._skip_adam(grown, t_bias, seeds, decays)
                self._finish(runner, searched=False)
                return loss
            t, norms = self._checked_phase(True, self._grad_norms)
            f0 = read_first(runner, loss, norms)
            if not norms.all_finite():
                raise FloatingPointError(f"{self._name}: non-finite gradient; parameters and state were left unchanged")
            self._decay(t, old)
            s = self._save_adam(t, t_bias, seeds)
            if any(g["momentum_direction"] for g in self.param_groups):
                s = self._momentum_sums(t, t_bias, s)
            accepted: Dict[int, float] = {}
            points = TrialPoints(self, t, t_bias)
            with points.restoring():  # an error in the search puts the start point back
                for gi, group in enumerate(self.param_groups):
                    start = initial_step.start(ls, grown[gi], group, gi)  # search="auto": caught up (ours)
                    eta, backtracks, found = self._search(runner, f0, points, s, gi, start, group)
                    self._record(gi, eta, backtracks, found)
                    accepted[gi] = eta
            self._finish(runner, True, accepted, {gi: old[gi] for gi in accepted})
        return loss

    # ------------------------------------------------------------------ phases
    def _decay(self, t: StepTensors, old: List[float]) -> None:
        """p <- p - wd * eta_prev * p before w0 is saved (the package's current repository)."""
        for gi, group in enumerate(self.param_groups):
            wd = group["weight_decay"]
            if wd == 0.0:
                continue
            for _device, _g, (params,), _pos, _n in t.buckets(["params"], gids=[gi]):
                torch._foreach_add_(params, params, alpha=-wd * old[gi])

    def _momentum_sums(self, t: StepTensors, step: int, precond: DeviceSums) -> DeviceSums:
        """sum(g * m_hat / (sqrt(v_hat) + eps)) per tensor for momentum_direction groups (the others
        keep sum(g^2 / (sqrt(v_hat) + eps)) from the save phase). One tensor at a time: the scratch is
        two tensors of the largest parameter, never of the whole bucket."""
        chosen = [gi for gi, g in enumerate(self.param_groups) if g["momentum_direction"]]
        parts = []
        for _device, g, (grads, ms, vs), pos, _n, int8 in t.state_buckets(["grads", "exp_avgs", "exp_avg_sqs"],
                                                                           gids=chosen):
            bc1, bc2_sqrt = adam_scalars(step, *g["betas"], True)
            if int8:  # (one tensor's decoded moments at a time, float32)
                block = int8["block_size"]
                ms = map(state_storage.values, ms, int8["exp_avg_scales"], [block] * len(ms))
                vs = map(state_storage.values, vs, int8["exp_avg_sq_scales"], [block] * len(vs))
            sums = []
            for grad, m, v in zip(grads, ms, vs):
                # (bf16 state beside fp32 gradients: the denominator in float32, as the kernels compute it)
                denom = torch.sqrt(v.to(torch.promote_types(grad.dtype, v.dtype)))
                denom.div_(bc2_sqrt).add_(g["eps"])
                term = torch.mul(grad, m).div_(denom)
                sums.append(term.sum(dtype=torch.float64) / bc1)
            parts.append((pos, torch.stack(sums).float()))
        mine = {i for pos, _ in parts for i in pos}
        for pos, sums in precond.parts:
            keep = [k for k, i in enumerate(pos) if i not in mine]
            if keep:
                parts.append(([pos[k] for k in keep], sums[keep]))
        return DeviceSums(t, parts)

    def _search(self, runner, f0: float, points: TrialPoints, s: DeviceSums, gi: int, eta: float, group: dict):
        """Smoothed Armijo search of group ``gi`` from ``eta``; returns (eta, failed trials, found).

        The parameters stay at the accepted (or last) trial point. S (``s``) is still on the device
        until the first trial's read, except when f0 == 0 (no trial is needed then).
        """
        ls = self.ls_state
        beta3, c, beta_b = group["smoothing"], group["c"], group["beta_b"]
        momentum = group["momentum_direction"]

        def try_point(e: float) -> float:
            points.move({gi: e}, MOMENTUM if momentum else ADAM)
            return read_trial(runner.trial(), s)

        # S joins the first trial's read, unless the guard below might skip the search: when f0 == 0,
        # when S can fall below 1e-8 (beta3 * S_old < 1e-8), or when S may be negative (momentum
        # direction), it is read first, so that no forward is spent on a trial that is not used.
        f1 = None
        if f0 != 0.0 and not momentum and ls["avg_sufficient"][gi] * beta3 >= MIN_SUFFICIENT:
            f1 = try_point(eta)
        if s.per_group is None:
            s.load(read_host(s.tensors()))
        avg_s = ls["avg_sufficient"][gi] * beta3 + s.per_group[gi] * (1 - beta3)
        ls["avg_sufficient"][gi] = avg_s
        if f0 == 0.0 or not avg_s >= MIN_SUFFICIENT:
            points.move({gi: eta}, MOMENTUM)  # the momentum step (from w0)
            return eta, 0, True
        max_backtracks = int(group["max_backtracks"])
        for e in range(max_backtracks):
            if f1 is None or e > 0:
                f1 = try_point(eta)
            diff = f0 - f1
            if diff == 0.0:  # the package accepts an equal loss as it is
                return eta, e, True
            decrease = ls["avg_decrease"][gi] * beta3 + diff * (1 - beta3)
            if math.isfinite(f1) and decrease >= eta * c * avg_s:
                ls["avg_decrease"][gi] = decrease
                initial_step.accepted(ls, group, eta, f0, f1, s.per_group[gi])  # search="auto"'s climbing rule
                return eta, e, True
            if not math.isfinite(f1):
                points.check_finite([gi])
            if initial_step.exhausted(ls, eta):  # "auto": failed at the package's last trial
                return eta * beta_b, e + 1, False
            eta = initial_step.backtrack(ls, group, eta, f0, f1, s.per_group[gi])  # the package's: eta * beta_b
        return eta, max_backtracks, False
