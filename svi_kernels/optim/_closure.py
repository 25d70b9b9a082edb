"""Closure evaluation for the line-search optimizers (the SLS closure contract).

Three closure forms are accepted:

- ``closure()`` returns the loss and does not call backward (SLS, AdamSLS); the first evaluation
  runs with grad enabled and is backpropagated here.
- ``closure(backwards=False)`` (salsa-optimizer's form, told apart by its signature) calls
  ``loss.backward()`` itself when ``backwards`` is true; the first evaluation passes ``backwards=True``.
  This form is what gradient accumulation needs: the closure loops over micro-batches, calls backward
  on each, and returns the mean loss (detached or not).
- torch's convention (LBFGS, PyTorch Lightning): ``closure()`` zeroes the gradients, calls backward and
  returns the loss (a tensor or a number). Told apart from the first form by its first evaluation: the
  gradients changed. Its trial evaluations set the step's gradients aside (the closure's zero_grad and
  backward cannot touch them; they are put back after) and turn backward into a no-op in this thread
  (``backward_off``), so a trial costs a forward, as in the other forms.

Whether a closure called backward is told by its gradients: a gradient that is new (a weak reference
to the old tensor no longer points at it, so nothing old is kept alive) or whose version moved (in-place
zeroing, accumulation). Trial evaluations run under ``torch.no_grad()``. Every
evaluation of one step starts from the same RNG state, so dropout masks match (Vaswani et al. run
the closure under a fixed seed for the same reason). Under ``torch.distributed`` the losses are
averaged over ranks, so every rank takes the same Armijo decision and replicas stay identical.
"""
from __future__ import annotations

import inspect
import math
import threading
import warnings
import weakref
from contextlib import contextmanager
from inspect import CO_VARARGS, CO_VARKEYWORDS
from types import FunctionType
from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor

from . import sharding


WATCHED = 16  # gradients checked at each end of the parameter list (see ClosureRunner.watched)


class NonFiniteLossError(FloatingPointError):
    """The loss at the start of a line-search step is NaN or inf."""


class ClosureRunner:
    def __init__(self, opt_name: str, closure: Callable[[], Tensor], params: List[Tensor], process_group=None,
                 sharded: Optional[bool] = None, trials: bool = True):
        if closure is None:
            raise RuntimeError(
                f"{opt_name}.step() needs a closure: `loss = opt.step(lambda: loss_fn(model(x), y))`; "
                "the closure returns the loss and does not call backward() (or takes `backwards` and calls "
                "loss.backward() itself when it is true, or zeroes the gradients and calls backward itself "
                "as torch.optim.LBFGS's closure does)")
        self.name = opt_name
        self.closure = closure
        self.backwards = takes_backwards(closure)
        self.calls_backward = False  # torch's convention (set by the first evaluation)
        self.params = params
        # Whose gradients tell whether the closure called backward: a few at both ends of the list
        # (a backward reaches nearly every parameter; all 10,000 would cost ~10 ms of host time).
        self.watched = params if len(params) <= 2 * WATCHED else params[:WATCHED] + params[-WATCHED:]
        self.sharded = sharding.any_sharded(params) if sharded is None else sharded  # (the step plan knows)
        self.process_group = process_group
        # Counted here and added to the optimizer's state only when the step succeeds.
        self.n_forwards = 0
        self.n_backwards = 0
        # The RNG state every evaluation starts from; ``trials=False`` (a step the search= schedule skips:
        # one evaluation, nothing to match it with) captures none (a copy of the generator's state: up to ~10 us
        # of host work a step inside a training loop).
        self.cpu_rng = torch.get_rng_state() if trials else None
        self.cuda_rng = (torch.cuda.get_rng_state_all()
                         if trials and torch.cuda.is_available() and torch.cuda.is_initialized() else None)

    def _restore_rng(self) -> None:
        if self.cpu_rng is None:
            return
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def _check_loss(self, loss) -> Tensor:
        if not isinstance(loss, Tensor):
            raise TypeError(f"{self.name}: the closure must return the loss as a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{self.name}: the closure must return a scalar loss, got shape {tuple(loss.shape)}")
        return loss

    def _number_as_loss(self, loss):
        """A number from the closure where no parameter requires grad (nothing to differentiate: torch's
        no-op step, as in torch's hook tests) becomes a tensor; anything else goes to _check_loss as is."""
        if not isinstance(loss, Tensor) and not any(p.requires_grad for p in self.params):
            return torch.as_tensor(float(loss))
        return loss

    def first(self) -> Tensor:
        """Evaluate f(w0) with grad and backpropagate it; returns the loss (nothing read back yet).

        The caller reads f0 together with the gradient reductions in one host sync and calls
        ``check_f0``; backward has only filled ``.grad``, so a bad f0 still leaves params and state as
        they were.
        """
        self._restore_rng()
        before = grad_marks(self.watched)
        with torch.enable_grad():
            loss = self.closure(backwards=True) if self.backwards else self.closure()
        changed = grads_changed(before, self.watched)
        self.n_forwards += 1
        if self.backwards:
            loss = self._check_loss(self._number_as_loss(loss))
            if not changed and len(self.watched) < len(self.params):
                # the watched ones may all be unused: any gradient at all will do then
                changed = any(p.grad is not None for p in self.params)
            if not changed and self.params:
                raise RuntimeError(
                    f"{self.name}: closure(backwards=True) did not call backward (no gradient changed); a "
                    "closure that takes `backwards` must call loss.backward() itself when it is true")
            self.n_backwards += 1
            return loss
        if changed:  # torch's convention: the closure called backward itself (LBFGS, Lightning)
            self.calls_backward = True
            self.n_backwards += 1
            return self._check_loss(_as_tensor(loss))
        loss = self._check_loss(self._number_as_loss(loss))
        if not loss.requires_grad:
            if any(p.requires_grad for p in self.params):
                warnings.warn(
                    f"{self.name}: the closure's loss does not require grad (it does not depend on the parameters, "
                    "or was detached or computed under no_grad): step() used the gradients present, and "
                    "parameters without one did not move", stacklevel=4)
            return loss  # nothing to differentiate (torch's no-op step where no gradient exists)
        loss.backward()
        self.n_backwards += 1
        return loss

    def check_f0(self, f0: float) -> None:
        if not math.isfinite(f0):
            raise NonFiniteLossError(
                f"{self.name}: the loss at the start of the line-search step is {f0}; parameters and optimizer "
                "state were left unchanged")

    def trial(self) -> Tensor:
        """Evaluate f at the current (trial) parameters without grad; returns the (rank-averaged) loss
        as a float64 tensor on its device, not read back. NaN/inf are returned as they are."""
        if self.cpu_rng is None:
            raise RuntimeError(f"{self.name}: a trial evaluation in a step whose runner has no RNG state (trials=False)")
        self._restore_rng()
        with torch.no_grad(), sharding.fresh_gathers(self.sharded):  # FSDP2: the next forward sees new shards
            if self.calls_backward:
                with grads_set_aside(self.params), backward_off():
                    loss = _as_tensor(self.closure())
            else:
                loss = self.closure(backwards=False) if self.backwards else self.closure()
            loss = self._check_loss(self._number_as_loss(loss))
        self.n_forwards += 1
        return self.average(loss)

    def average(self, loss: Tensor) -> Tensor:
        return average_over_ranks(loss, self.process_group)


def _as_tensor(loss) -> Tensor:
    """torch's convention lets the closure return a Python number (LBFGS calls float() on it)."""
    return loss if isinstance(loss, Tensor) else torch.as_tensor(float(loss))


def grad_marks(params: List[Tensor]) -> list:
    """What identifies each parameter's gradient now: None, or a weak reference to the tensor and its
    version. Weak, so the old gradients are not kept alive: once freed (zero_grad(set_to_none=True)),
    the reference is dead and no new tensor can pass for the old one (as a reused id() would)."""
    return [None if (g := p.grad) is None else (weakref.ref(g), g._version) for p in params]


def grads_changed(marks: list, params: List[Tensor]) -> bool:
    """Did any gradient change since ``marks``: a new tensor (set_to_none then backward, or replaced by
    a hook or a trainer), or the same one written in place (zeroed, accumulated into)?"""
    for mark, p in zip(marks, params):
        g = p.grad
        if mark is None:
            if g is not None:
                return True
        elif g is None or mark[0]() is not g or mark[1] != g._version:
            return True
    return False


@contextmanager
def grads_set_aside(params: List[Tensor]):
    """The gradients are taken off the parameters (no copy) and put back on exit, whatever the body
    did to ``.grad``: a trial of a closure that zeroes the gradients cannot touch the step's."""
    saved = [p.grad for p in params]
    for p, g in zip(params, saved):
        if g is not None:
            p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


@contextmanager
def backward_off():
    """``torch.autograd.backward`` (what ``Tensor.backward`` calls) does nothing in this thread until
    exit; other threads' calls go through. A trial evaluation of a closure that calls backward (torch's
    convention) costs a forward then: its gradients would be thrown away."""
    real = torch.autograd.backward
    thread = threading.get_ident()

    def backward(*args, **kwargs):
        if threading.get_ident() != thread:
            return real(*args, **kwargs)
        return None

    torch.autograd.backward = backward
    try:
        yield
    finally:
        if torch.autograd.backward is backward:
            torch.autograd.backward = real


def average_over_ranks(loss: Tensor, process_group=None) -> Tensor:
    """A float64 copy of ``loss`` averaged over the ranks of ``process_group`` (default: the world)
    when torch.distributed is initialised, so that every rank takes the same Armijo decision.
    ``process_group=False`` turns averaging off (independent models on each rank)."""
    out = loss.detach().reshape(1).to(torch.float64)
    dist = torch.distributed
    if process_group is False or not (dist.is_available() and dist.is_initialized()):
        return out
    group = process_group
    size = dist.get_world_size(group)
    if size > 1:
        if dist.get_backend(group) == "nccl" and not out.is_cuda:
            out = out.cuda()
        dist.all_reduce(out, group=group)
        out /= size
    return out


def read_host(tensors: List[Tensor]) -> List[float]:
    """Read several small device tensors back with one synchronisation per device."""
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: List[float] = []
    values = [None] * len(tensors)
    for _dev, idx in by_device.items():
        flat = torch.cat([tensors[i].reshape(-1).to(torch.float64) for i in idx]).tolist()
        k = 0
        for i in idx:
            n = tensors[i].numel()
            values[i] = flat[k:k + n]
            k += n
    for v in values:
        out.extend(v)
    return out


def takes_backwards(closure) -> bool:
    """The closure is of the ``closure(backwards=False)`` form (it has a parameter so named)."""
    if type(closure) is FunctionType and not ({"__wrapped__", "__signature__"} & closure.__dict__.keys()):
        # A plain function (the usual lambda): its parameter names from its code, as inspect.signature
        # reads them (~70 us a step less)
        code = closure.__code__
        n = code.co_argcount + code.co_kwonlyargcount
        n += bool(code.co_flags & CO_VARARGS) + bool(code.co_flags & CO_VARKEYWORDS)
        return "backwards" in code.co_varnames[:n]
    try:
        return "backwards" in inspect.signature(closure).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def all_params(groups: Iterable[dict]) -> List[Tensor]:
    return [p for g in groups for p in g["params"]]
