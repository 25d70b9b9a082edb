"""Line-search bookkeeping done the way the public reference SLS code does it, for measurement only.

Re-implemented here (not imported) so the benchmark can time, side by side with our fused
optimizers, the per-step costs that the reference implementations pay:

- IssamLaradji/sls (``Sls``, Vaswani et al. 2019): ``copy.deepcopy`` of the parameters every step,
  a per-tensor Python loop for the gradient norm, trial points rebuilt per tensor as
  ``p.data = p0 - eta * g`` (two fresh tensors each), tensor comparisons in ``if`` (host syncs).
- TheMody AdamSLS / PLASLS (Kenneweg et al. 2023): the same copies plus per-tensor Adam moments
  rebuilt out of place, the preconditioner recomputed in every loop (norm, each trial, final step),
  ``.item()`` bookkeeping and a NaN check each step.

The arithmetic is the same as our optimizers' (so one accepted trial gives the same update); only
the way it is organised differs. This is not part of the package API.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import List, Sequence

import torch


@contextlib.contextmanager
def _seeded(seed: int, devices: Sequence[torch.device]):
    """Fixed RNG for every closure call of a step (same dropout masks), restored afterwards."""
    cpu_state = torch.get_rng_state()
    cuda = any(d.type == "cuda" for d in devices) and torch.cuda.is_available()
    cuda_state = torch.cuda.get_rng_state() if cuda else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state)


def _grad_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(1, device=grads[0].device if grads else "cpu")
    for g in grads:
        total += torch.sum(torch.mul(g, g))
    return torch.sqrt(total)


class ReferenceStyleSLS:
    """``mode="sgd"``: Armijo SGD (one global search). ``mode="adam"``: AdamSLS; with several groups
    and ``strategy="cycle"`` it is PLASLS (after ``warmup_steps`` global searches, one group is
    searched per step and the others move with their stored step size)."""

    def __init__(self, groups: Sequence[Sequence[torch.nn.Parameter]], mode: str = "sgd", *,
                 init_step_size: float = 1.0, c: float = 0.1, beta_b: float = 0.9, gamma: float = 2.0,
                 n_batches_per_epoch: int = 500, betas=(0.9, 0.999), eps: float = 1e-8,
                 strategy: str = "global", warmup_steps: int = 0, max_backtracks: int = 100):
        if mode not in ("sgd", "adam"):
            raise ValueError(mode)
        self.groups = [list(g) for g in groups]
        self.mode, self.strategy, self.warmup_steps = mode, strategy, warmup_steps
        self.c, self.beta_b, self.gamma, self.n_batches = c, beta_b, gamma, n_batches_per_epoch
        self.beta1, self.beta2 = betas
        self.eps, self.max_backtracks = eps, max_backtracks
        self.step_sizes = [init_step_size] * len(self.groups)
        self.devices = sorted({p.device for g in self.groups for p in g}, key=str)
        self.exp_avg = [[torch.zeros_like(p) for p in g] for g in self.groups] if mode == "adam" else None
        self.exp_avg_sq = [[torch.zeros_like(p) for p in g] for g in self.groups] if mode == "adam" else None
        self.n_steps = 0
        self.next_group = 0
        self.history = {"loss": [], "loss_next": [], "step_sizes": [], "grad_norm": [], "backtracks": []}

    # ---- per-tensor helpers, recomputed wherever the reference recomputes them ----
    def _precond(self, v: torch.Tensor) -> torch.Tensor:
        v_hat = v / (1 - self.beta2 ** max(1, self.n_steps + 1))
        return 1.0 / (torch.sqrt(v_hat) + self.eps)

    def _pp_norm(self, i: int, grads: List[torch.Tensor]):
        total = 0
        for g, v in zip(grads, self.exp_avg_sq[i]):
            total += ((g ** 2) * self._precond(v)).sum()
        return total

    def _move(self, i: int, eta, w0, grads, use_momentum: bool) -> None:
        for j, (p, p0, g) in enumerate(zip(self.groups[i], w0, grads)):
            if self.mode == "sgd":
                p.data = p0 - eta * g
                continue
            d = g
            if use_momentum:
                d = self.exp_avg[i][j] / (1 - self.beta1 ** max(1, self.n_steps + 1))
            p.data[:] = p0.data
            p.data.add_(self._precond(self.exp_avg_sq[i][j]) * d, alpha=-eta)

    def _search(self, group_ids, eta, w0, grads, loss, suff, closure_det):
        """Backtrack from ``eta`` until the Armijo test passes; returns (eta, loss_next)."""
        loss_next = loss
        found = False
        if loss.item() != 0 and suff >= 1e-8:  # host sync on a device tensor
            for e in range(self.max_backtracks):
                for i in group_ids:
                    self._move(i, eta, w0[i], grads[i], use_momentum=False)
                loss_next = closure_det()
                if loss - loss_next >= eta * self.c * suff:  # another host sync
                    found = True
                    break
                eta = eta * self.beta_b
            self.history["backtracks"].append(e)
        if not found and self.mode == "sgd":
            for i in group_ids:
                self._move(i, 1e-6, w0[i], grads[i], use_momentum=False)
        return eta, loss_next

    def step(self, closure):
        """``closure(backwards=False)`` returns the loss and calls backward on it when ``backwards``
        (the form svi-bench's timed trivial closure has, so its backward is timed with its forward)."""
        seed = int(time.time())

        def closure_det(backwards=False):
            with _seeded(seed, self.devices):
                return closure(backwards=backwards)

        loss = closure_det(backwards=True)

        w0 = [copy.deepcopy(g) for g in self.groups]  # a full parameter copy every step
        grads = [[p.grad for p in g] for g in self.groups]
        grad_norms = [_grad_norm(gs) for gs in grads]
        growth = self.gamma ** (1.0 / self.n_batches)
        etas = [eta * growth for eta in self.step_sizes]

        with torch.no_grad():
            if self.mode == "sgd":
                ids = range(len(self.groups))
                gn2 = sum(gn ** 2 for gn in grad_norms)
                eta, loss_next = self._search(ids, etas[0], w0, grads, loss, gn2, closure_det)
                etas = [eta] * len(etas)
            else:
                for i, gs in enumerate(grads):  # moments rebuilt out of place, per tensor
                    for j, g in enumerate(gs):
                        self.exp_avg_sq[i][j] = (1 - self.beta2) * (g ** 2) + self.beta2 * self.exp_avg_sq[i][j]
                        self.exp_avg[i][j] = (1 - self.beta1) * g + self.beta1 * self.exp_avg[i][j]
                pp = [self._pp_norm(i, gs) for i, gs in enumerate(grads)]
                if self.strategy == "global" or self.n_steps < self.warmup_steps:
                    ids = list(range(len(self.groups)))
                    eta, loss_next = self._search(ids, etas[0], w0, grads, loss, sum(pp), closure_det)
                    etas = [eta] * len(etas)
                    for i in ids:
                        self._move(i, eta, w0[i], grads[i], use_momentum=True)
                else:
                    loss_next = loss
                    for i in range(len(self.groups)):
                        if i == self.next_group:
                            etas[i], loss_next = self._search([i], etas[i], w0, grads, loss, pp[i], closure_det)
                        self._move(i, etas[i], w0[i], grads[i], use_momentum=True)
                    self.next_group = (self.next_group + 1) % len(self.groups)

        self.step_sizes = [float(e.item()) if isinstance(e, torch.Tensor) else e for e in etas]
        self.history["step_sizes"].append(self.step_sizes)
        self.history["loss"].append(loss.item())
        self.history["loss_next"].append(loss_next.item())
        self.history["grad_norm"].append([gn.item() for gn in grad_norms])
        self.n_steps += 1
        if torch.isnan(self.groups[0][0]).sum() > 0:
            raise ValueError("nans detected")
        return loss
