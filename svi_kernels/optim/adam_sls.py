"""AdamSLS: Adam with an Armijo line search on the preconditioned gradient (Kenneweg et al. 2023, ADAMSLS).

Per step: Adam moments are updated before the search; trials ``w0 - eta * g / (sqrt(v_hat) + eps)``
(no momentum) are accepted when ``f0 - f1 >= c * eta * sum(g^2 / (sqrt(v_hat) + eps))``, backtracking
by ``beta_b`` from ``eta * gamma^(1/n_batches_per_epoch)``; the final step is
``w0 - eta * m_hat / (sqrt(v_hat) + eps)`` (with momentum). Bias correction uses t = completed steps + 1.
After ``max_backtracks`` failures eta is simply the reduced value (the authors' code has no 1e-6 fallback)
and ``ls_state["found"]`` says so. The search is skipped (final step with the grown eta) when the
preconditioned norm is below 1e-8 or the loss is exactly 0 (one trial forward is
still spent, as in the authors' code: the norm is read with the first trial's loss). With several param groups each group is
searched in turn, the earlier ones already at their new values.

``search=`` (search_schedule): "every" (default), an int k, "salsa" or "auto"; a skipped step is one
fused Adam update ``p - eta * m_hat / (sqrt(v_hat) + eps)`` with the stored step size grown as before
a search (the stored one unchanged), no trial and nothing read back.

Memory: m and v (8 B/param in fp32, as AdamW; 4 B/param with ``state_dtype=torch.bfloat16``, stored with
stochastic rounding; ~2.03 B/param with ``state_dtype="int8"``, blockwise 8-bit codes with one float32
scale per ``state_block_size`` elements; ``torch.float32`` keeps fp32 moments beside fp16/bf16 parameters;
state_storage.py).
The trials move the parameters in place along
g / (sqrt(v_hat) + eps) recomputed from g and v, and the final step starts from the last trial point
(trial_points.py); ``keep_start_point=True`` keeps a copy of w0 (+4 B/param).

``master_weights=`` (False, True, "kahan", "8bit", "stochastic"): fp16/bf16 parameters keep their precise
value beside p (a float32 master, a compensation, an int8 code, or none with stochastic rounding); the
search runs on float32 working copies and each trial forward sees the rounded point (master_weights.py,
docs/api.md).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from . import bucketing
from . import hyperparams
from . import initial_step
from . import state_storage
from . import master_weights
from ._line_search import (DeviceSums, LineSearchOptimizer, check_ls_hyperparameters, read_first,
                           read_trial, reset_step_size)
from .trial_points import ADAM, MOMENTUM, TrialPoints

MIN_PRECOND_NORM = 1e-8


class AdamSLS(LineSearchOptimizer):
    _name = "AdamSLS"
    _group_keys = LineSearchOptimizer._group_keys + ("betas", "eps")
    _uses_moments = True

    def __init__(self, params, n_batches_per_epoch=500, init_step_size=0.1, c=0.1, beta_b=0.9, gamma=2.0,
                 betas=(0.9, 0.999), eps=1e-8, max_backtracks=100, reset_option=1,
                 backend: Optional[str] = None, process_group=None, search="every", keep_start_point: bool = False,
                 *, master_weights=False, state_dtype: Optional[torch.dtype] = None, state_block_size: int = 256):
        check_ls_hyperparameters(n_batches_per_epoch, init_step_size, c, beta_b, gamma, max_backtracks)
        hyperparams.check_betas(betas)
        hyperparams.check_nonneg(eps, "eps")
        if reset_option not in (0, 1, 2):
            raise ValueError(f"Invalid reset_option {reset_option!r} (expected 0, 1 or 2)")
        defaults = dict(n_batches_per_epoch=n_batches_per_epoch, init_step_size=init_step_size, c=c,
                        beta_b=beta_b, gamma=gamma, betas=betas, eps=eps, max_backtracks=max_backtracks,
                        reset_option=reset_option, backend=bucketing._backends.validate(backend),
                        state_dtype=state_storage.check_value(state_dtype),
                        state_block_size=state_storage.check_block_size(state_block_size),
                        master_weights=master_weights)
        super().__init__(params, defaults, process_group=process_group, search=search,
                         keep_start_point=keep_start_point)

    def _begin(self, closure, force_search: bool = False):
        """First evaluation, checks, and the fused prepare phase. Returns (runner, loss, f0, points, s, step)
        with ``points`` the step's TrialPoints.

        One host sync reads f0 and the gradient norms (checked before the moments are touched); the
        preconditioned norms ``s`` stay on the device and join the first trial's read.
        When the ``search=`` schedule skips this step, it is done here (one fused Adam update with the
        stored step sizes grown as before a search, nothing read back) and ``t`` is None.
        """
        search = force_search or self._searches_now()
        seeds = state_storage.step_seeds(self)  # (this step() call's; drawn by the launches that write m, v)
        # A searched step fails before the forward; a skipped step checks once, after it (host cost of AdamW).
        runner = self._runner(closure, check=search)
        loss = runner.first()  # the gradients are checked by the first op that reads them
        if not search:
            step = self.ls_state["step"] + 1
            self._skip_adam([reset_step_size(eta, g) for eta, g in zip(self.ls_state["step_sizes"], self.param_groups)],
                            step, seeds)
            self._finish(runner, searched=False)
            return runner, loss, None, None, None, step
        t, norms = self._checked_phase(True, self._grad_norms)
        f0 = read_first(runner, loss, norms)
        if not norms.all_finite():
            raise FloatingPointError(f"{self._name}: non-finite gradient; parameters and state were left unchanged")
        step = self.ls_state["step"] + 1
        s = self._save_adam(t, step, seeds)
        return runner, loss, f0, TrialPoints(self, t, step), s, step

    def _search(self, runner, f0, points: TrialPoints, s: DeviceSums, gids: List[int], eta: float, group: dict):
        """Armijo search moving the groups ``gids`` together with one eta; returns (eta, backtracks, found).

        The search is skipped (eta accepted) when the preconditioned norm is below 1e-8 or f0 == 0; as in
        the authors' code, that is known only after the first trial's forward.
        """
        def read(f1):
            f1v = read_trial(f1, s)
            s_sel = sum(s.per_group[g] for g in gids)
            return f1v, s_sel, (s_sel < MIN_PRECOND_NORM or f0 == 0.0)

        return self._armijo(runner, f0, eta, group, lambda e: points.move({g: e for g in gids}, ADAM), read,
                            lambda: points.check_finite(gids))

    @master_weights.line_search_step  # (master_weights= modes: fp32 working copies)
    def step(self, closure=None):
        """One ADAMSLS step. ``closure`` returns the loss and does not call backward. Returns the loss."""
        with torch.no_grad():
            runner, loss, f0, points, s, step = self._begin(closure)
            if points is None:  # skipped by the search= schedule
                return loss
            ls = self.ls_state
            old = dict(enumerate(ls["step_sizes"]))
            with points.restoring():  # an error in the search puts the start point back
                for gi, group in enumerate(self.param_groups):
                    eta = initial_step.start(ls, reset_step_size(ls["step_sizes"][gi], group), group, gi)
                    eta, backtracks, found = self._search(runner, f0, points, s, [gi], eta, group)
                    points.move({gi: eta}, MOMENTUM)  # the final step, with momentum
                    self._record(gi, eta, backtracks, found)
            self._finish(runner, True, dict(enumerate(ls["step_sizes"])), old)
        return loss
