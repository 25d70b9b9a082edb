"""ArmijoSGD: SGD with a backtracking Armijo line search (Vaswani et al. 2019, "Painless SGD").

Reproduces the reference ``Sls`` (IssamLaradji/sls) step for step, with the step size kept per
param group: reset ``eta * gamma^(1/n_batches_per_epoch)`` (reset_option 1; 0 keeps it, 2 restarts
at init_step_size), trials ``w0 - eta * g`` until ``f(w0 - eta g) <= f(w0) - c * eta * ||g||^2``,
backtracking by ``beta_b``; after ``max_backtracks`` failures the parameters move by ``1e-6 * g`` and
the reduced eta is kept; no update when ``||g|| < 1e-8``.

``search=`` (search_schedule): "every" (default), an int k, "salsa" or "auto"; a skipped step is
``p <- p - eta * g`` with the stored step size grown as before a search (the stored one unchanged).

Memory: nothing per parameter (as torch's SGD). The trials move the parameters in place by
``(eta_prev - eta) * g`` (trial_points.py), so the accepted trial is the new point, no final pass;
``keep_start_point=True`` keeps a copy of w0 (+4 B/param) for the release's bits and an exact restore.

``master_weights=`` (False, True, "kahan", "8bit", "stochastic"): fp16/bf16 parameters keep their precise
value beside p (a float32 master, a compensation, an int8 code, or none with stochastic rounding); the
search runs on float32 working copies and each trial forward sees the rounded point (master_weights.py,
docs/api.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import bucketing
from . import initial_step
from . import master_weights
from ._closure import read_host
from ._line_search import (LineSearchOptimizer, check_ls_hyperparameters, read_first,
                           reset_step_size)
from .trial_points import SGD, TrialPoints

FALLBACK_STEP = 1e-6
MIN_GRAD_NORM = 1e-8


class ArmijoSGD(LineSearchOptimizer):
    _name = "ArmijoSGD"

    def __init__(self, params, n_batches_per_epoch=500, init_step_size=1.0, c=0.1, beta_b=0.9, gamma=2.0,
                 reset_option=1, max_backtracks=100, backend: Optional[str] = None, process_group=None,
                 search="every", keep_start_point: bool = False,
                 *, master_weights=False):
        check_ls_hyperparameters(n_batches_per_epoch, init_step_size, c, beta_b, gamma, max_backtracks)
        if reset_option not in (0, 1, 2):
            raise ValueError(f"Invalid reset_option {reset_option!r} (expected 0, 1 or 2)")
        defaults = dict(n_batches_per_epoch=n_batches_per_epoch, init_step_size=init_step_size, c=c,
                        beta_b=beta_b, gamma=gamma, reset_option=reset_option, max_backtracks=max_backtracks,
                        backend=bucketing._backends.validate(backend), master_weights=master_weights)
        super().__init__(params, defaults, process_group=process_group, search=search,
                         keep_start_point=keep_start_point)

    @master_weights.line_search_step  # (master_weights= modes: fp32 working copies)
    def step(self, closure=None):
        """One SLS step. ``closure`` returns the loss and does not call backward. Returns the loss.

        Host syncs: one for f0 and the gradient norms, then one per trial.
        """
        search = self._searches_now()
        # A searched step fails before the forward; a skipped step checks once, after it (host cost of SGD).
        runner = self._runner(closure, check=search)
        loss = runner.first()  # the gradients are checked by the first op that reads them
        ls = self.ls_state
        old = list(ls["step_sizes"])
        if not search:  # the search= schedule skips this step: one SGD update with the stored step size
            with torch.no_grad():
                self._skip_sgd([reset_step_size(eta, g) for eta, g in zip(old, self.param_groups)])
            self._finish(runner, searched=False)
            return loss
        with torch.no_grad():
            t, sums = self._checked_phase(False, self._save_sgd)  # writes only the scratch w0, if kept
            f0 = read_first(runner, loss, sums)
            if not sums.all_finite():
                raise FloatingPointError(f"{self._name}: non-finite gradient; parameters and state were left unchanged")
            gn2 = sums.per_group
            points = TrialPoints(self, t)
            with points.restoring():  # an error in the search puts the start point back
                for gi, group in enumerate(self.param_groups):
                    eta = initial_step.start(ls, reset_step_size(ls["step_sizes"][gi], group), group, gi)
                    if math.sqrt(gn2[gi]) < MIN_GRAD_NORM:
                        self._record(gi, eta, 0, True)
                        continue
                    eta, backtracks, found = self._armijo(
                        runner, f0, eta, group, lambda e, gi=gi: points.move({gi: e}, SGD),
                        lambda f1, gi=gi: (read_host([f1])[0], gn2[gi], False),
                        lambda gi=gi: points.check_finite([gi]))
                    if not found:
                        points.move({gi: FALLBACK_STEP}, SGD)
                    self._record(gi, eta, backtracks, found)
        self._finish(runner, True, dict(enumerate(ls["step_sizes"])), dict(enumerate(old)))
        return loss
