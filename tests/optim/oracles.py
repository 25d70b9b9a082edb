"""Straight re-statements of the published algorithms, used as test oracles.

They work on a flat float64 vector ``w`` with a loss function ``f(w)`` and its gradient ``grad(w)``,
follow the reference code line by line (IssamLaradji/sls ``Sls.step``; Kenneweg et al.'s
``AdamSLS.step`` with one group), and return everything a test compares.
"""
from __future__ import annotations

import math

import torch


def sls_reset(step_size, n_batches_per_epoch, gamma, reset_option, init_step_size):
    if reset_option == 0:
        return step_size
    if reset_option == 1:
        return step_size * gamma ** (1.0 / n_batches_per_epoch)
    return init_step_size


class SlsOracle:
    """IssamLaradji/sls ``Sls`` (armijo), one param group."""

    def __init__(self, init_step_size=1.0, n_batches_per_epoch=500, c=0.1, beta_b=0.9, gamma=2.0,
                 reset_option=1, max_backtracks=100):
        self.step_size = init_step_size
        self.kw = dict(n_batches_per_epoch=n_batches_per_epoch, gamma=gamma, reset_option=reset_option,
                       init_step_size=init_step_size)
        self.c, self.beta_b, self.max_bt = c, beta_b, max_backtracks
        self.n_forwards = self.n_backwards = 0
        self.last_backtracks = None

    def step(self, w, f, grad):
        loss = f(w)
        g = grad(w)
        self.n_forwards += 1
        self.n_backwards += 1
        w0 = w.clone()
        grad_norm = float(g.norm())
        step_size = sls_reset(self.step_size, **self.kw)
        found = 0
        backtracks = 0
        if grad_norm >= 1e-8:
            for e in range(self.max_bt):
                w = w0 - step_size * g
                loss_next = f(w)
                self.n_forwards += 1
                if loss_next - (loss - step_size * self.c * grad_norm ** 2) <= 0:
                    found = 1
                    break
                step_size = step_size * self.beta_b
                backtracks += 1
            if found == 0:
                w = w0 - 1e-6 * g
        self.step_size = step_size
        self.last_backtracks = backtracks
        return w, loss


class AdamSlsOracle:
    """Kenneweg et al.'s ADAMSLS (smooth=False), one param group, float64."""

    def __init__(self, init_step_size=0.1, n_batches_per_epoch=500, c=0.1, beta_b=0.9, gamma=2.0,
                 betas=(0.9, 0.999), eps=1e-8, max_backtracks=100):
        self.step_size = init_step_size
        self.n, self.gamma, self.c, self.beta_b = n_batches_per_epoch, gamma, c, beta_b
        self.b1, self.b2 = betas
        self.eps, self.max_bt = eps, max_backtracks
        self.m = self.v = None
        self.k = 0
        self.n_forwards = 0
        self.last_backtracks = None

    def step(self, w, f, grad):
        f0 = f(w)
        g = grad(w)
        self.n_forwards += 1
        if self.m is None:
            self.m, self.v = torch.zeros_like(w), torch.zeros_like(w)
        w0 = w.clone()
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        self.m = self.b1 * self.m + (1 - self.b1) * g
        t = self.k + 1
        m_hat = self.m / (1 - self.b1 ** t)
        v_hat = self.v / (1 - self.b2 ** t)
        P = 1.0 / (v_hat.sqrt() + self.eps)
        s = float((g * g * P).sum())
        eta = self.step_size * self.gamma ** (1.0 / self.n)
        backtracks = 0
        if s < 1e-8 or f0 == 0:
            self.n_forwards += 1  # the authors' code still spends one forward
        else:
            for _ in range(self.max_bt):
                w = w0 - eta * g * P
                f1 = f(w)
                self.n_forwards += 1
                if f0 - f1 >= self.c * eta * s:
                    break
                eta *= self.beta_b
                backtracks += 1
        w = w0 - eta * m_hat * P
        self.step_size = eta
        self.k += 1
        self.last_backtracks = backtracks
        return w, f0


def quadratic(A: torch.Tensor, b: torch.Tensor):
    """f(w) = 0.5 ||A w - b||^2 / n and its gradient, float64."""
    n = A.shape[0]

    def f(w):
        r = A @ w - b
        return 0.5 * float(r @ r) / n

    def grad(w):
        return A.T @ (A @ w - b) / n

    return f, grad


def assert_close_f64(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def isclose(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)
