"""Hugging Face ``transformers.Trainer`` with the svi_kernels optimizers.

AdamW and SVI are ordinary optimizers: hand them to the stock ``Trainer``, which then builds its usual
weight-decay / no-decay param groups and its learning-rate schedule around them::

    trainer = Trainer(model, args, train_dataset=ds, optimizer_cls_and_kwargs=(sk.AdamW, {"lr": 2e-5}))
    handle = sk.svi.attach(model)   # SVI: the field replaces the gradient of (Linear, activation) layers
    trainer = Trainer(model, args, train_dataset=ds, optimizer_cls_and_kwargs=(sk.SVI, {"lr": 1e-3}))

The line-search optimizers evaluate the loss themselves (``opt.step(closure)`` runs the forward and
backward and the trial forwards), so the Trainer must not do its own backward or call ``step()``
without a closure. ``LineSearchTrainer`` overrides ``training_step`` so the optimizer's step does
the work, with the closure computing ``self.compute_loss(model, inputs)``; the Trainer loop's own
``optimizer.step()`` after it does nothing, and the "learning rate" it logs is the line-search step size::

    opt = sk.AdamSLS(model.parameters(), n_batches_per_epoch=len(ds) // args.per_device_train_batch_size)
    trainer = LineSearchTrainer(model, args, train_dataset=ds, optimizers=(opt, None))

``build_trainer(model, args, "adamw" | "svi" | "armijo_sgd" | "adam_sls" | "layerwise_adam_sls" | "salsa", ...)``
does either for you. Supported with line search: DDP (every rank takes the same decision), bf16 autocast,
fp32, gradient accumulation (``gradient_accumulation_steps > 1``: the micro-batches of one optimizer step
are gathered and the step's closure runs over all of them, calling backward on each, so every trial
evaluates the whole accumulated batch; the step equals one step on the concatenated batch). Refused with
a clear error: fp16 with a GradScaler, DeepSpeed, FSDP.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("svi_kernels.integrations.hf needs transformers and accelerate: "
                      "pip install 'transformers[torch]'") from exc

from .. import svi as _svi
from ..layer_groups import layer_groups
from ..optim import SVI, AdamSLS, AdamW, ArmijoSGD, LayerwiseAdamSLS, SaLSA
from ..optim._line_search import LineSearchOptimizer

logger = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": AdamW, "svi": SVI, "armijo_sgd": ArmijoSGD, "adam_sls": AdamSLS,
              "layerwise_adam_sls": LayerwiseAdamSLS, "salsa": SaLSA}


class StepSizeSchedule:
    """The Trainer's scheduler slot for a line-search optimizer: ``step()`` does nothing (the search picks
    the step size) and ``get_last_lr()`` returns the current step sizes, so the Trainer logs them as the
    learning rate (one per param group; the Trainer shows group 0's)."""

    def __init__(self, optimizer: LineSearchOptimizer):
        self.optimizer = optimizer

    def step(self, *args, **kwargs) -> None:
        pass

    def get_last_lr(self):
        return list(self.optimizer.ls_state["step_sizes"])

    def state_dict(self) -> dict:
        return {}  # the step sizes live in the optimizer's state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class _ClosureDriven(torch.optim.Optimizer):
    """What the Trainer loop holds instead of the line-search optimizer.

    ``LineSearchTrainer.training_step`` runs ``step(closure)``; the loop's ``step()`` right after it is
    then skipped. A ``step()`` without a closure at any other time reaches the optimizer and fails with its
    "needs a closure" error. Everything else is the wrapped optimizer's (param_groups, state, state_dict).
    """

    def __init__(self, optimizer: LineSearchOptimizer):  # no Optimizer.__init__: nothing of its own to hold
        self.optimizer = optimizer
        self.stepped = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def step(self, closure=None):
        if closure is None and self.stepped:
            self.stepped = False
            return None
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"ClosureDriven({self.optimizer!r})"


def _unwrap(opt):
    """The line-search optimizer under accelerate's AcceleratedOptimizer and our _ClosureDriven."""
    while not isinstance(opt, LineSearchOptimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _find_closure_driven(opt) -> Optional[_ClosureDriven]:
    while opt is not None and not isinstance(opt, _ClosureDriven):
        opt = getattr(opt, "optimizer", None)
    return opt


_FP16_REFUSED = (
    "LineSearchTrainer does not support fp16 with a GradScaler: the scaler multiplies the loss before backward and "
    "decides in optimizer.step() whether to skip the step, but the line search has already evaluated its trial "
    "points and moved the parameters inside training_step by then, and its sufficient-decrease test would compare "
    "scaled gradients with unscaled losses. Use bf16=True (autocast, no scaler) or fp32")


def _check_args(args) -> None:
    if args.fp16:
        raise ValueError(_FP16_REFUSED)


class LineSearchTrainer(Trainer):
    """``transformers.Trainer`` for ArmijoSGD, AdamSLS, LayerwiseAdamSLS and SaLSA.

    Give the optimizer as ``optimizers=(opt, None)`` or as ``optimizer_cls_and_kwargs=(cls, kwargs)``;
    in the latter case it gets every trainable parameter in one group (``sk.layer_groups(model)`` for
    LayerwiseAdamSLS) and ``n_batches_per_epoch`` defaults to the number of steps per epoch.
    ``trainer.line_search_optimizer`` is the optimizer (its ``ls_state`` holds the step sizes and counters).

    Each training step is one ``opt.step(closure)``: one forward+backward and the trial forwards. The
    Trainer's gradient clipping comes after it, so ``max_grad_norm`` only sets the logged ``grad_norm`` (the
    norm of the gradient at the start of the step); the search controls the step length instead.
    """

    def __init__(self, *args, **kwargs):
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None:  # before the Trainer sets up the accelerator for them
            _check_args(targs)
        super().__init__(*args, **kwargs)
        self._check_supported()
        if self.lr_scheduler is not None and not isinstance(self.lr_scheduler, StepSizeSchedule):
            raise ValueError("LineSearchTrainer: line-search optimizers choose their own step size; pass "
                             "optimizers=(opt, None), not a learning-rate scheduler")
        if self.optimizer is not None:
            self.optimizer = self._closure_driven(self.optimizer)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            logger.info("LineSearchTrainer: gradient clipping does not apply to line-search steps "
                        "(max_grad_norm=%s only affects the logged grad_norm)", self.args.max_grad_norm)

    # ------------------------------------------------------------------ checks
    def _check_supported(self) -> None:
        _check_args(self.args)
        if getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(_FP16_REFUSED)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            raise ValueError(
                "LineSearchTrainer does not support DeepSpeed or FSDP. The line-search optimizers do work on FSDP2 "
                "(fully_shard) models in your own loop, loss = opt.step(closure) (docs/production.md); the Trainer "
                "path is untested because accelerate runs FSDP on accelerator devices only. Use DDP with the Trainer")

    def _closure_driven(self, opt) -> _ClosureDriven:
        if isinstance(opt, _ClosureDriven):
            return opt
        if not isinstance(opt, LineSearchOptimizer):
            raise TypeError(f"LineSearchTrainer is for the line-search optimizers (ArmijoSGD, AdamSLS, "
                            f"LayerwiseAdamSLS, SaLSA), got {type(opt).__name__}; give other optimizers to the plain "
                            "transformers.Trainer")
        return _ClosureDriven(opt)

    @property
    def line_search_optimizer(self) -> Optional[LineSearchOptimizer]:
        return None if self.optimizer is None else _unwrap(self.optimizer)

    # --------------------------------------------------------- optimizer setup
    def _steps_per_epoch(self) -> Optional[int]:
        ds = self.train_dataset
        try:
            n = len(ds)
        except TypeError:
            return None
        per_step = self.args.per_device_train_batch_size * max(1, self.args.world_size)
        batches = n // per_step if self.args.dataloader_drop_last else math.ceil(n / per_step)
        return max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            if self.optimizer_cls_and_kwargs is None:
                raise ValueError("LineSearchTrainer needs a line-search optimizer: optimizers=(sk.AdamSLS("
                                 "model.parameters()), None) or optimizer_cls_and_kwargs=(sk.AdamSLS, {...})")
            cls, kwargs = self.optimizer_cls_and_kwargs
            model = self.model if model is None else model
            if isinstance(cls, type) and issubclass(cls, LayerwiseAdamSLS):
                params = layer_groups(model)
            else:
                params = [p for p in model.parameters() if p.requires_grad]
            kwargs = dict(kwargs)
            takes_epoch = "n_batches_per_epoch" in getattr(cls, "_group_keys", ())  # not SaLSA
            if takes_epoch and "n_batches_per_epoch" not in kwargs and self._steps_per_epoch() is not None:
                kwargs["n_batches_per_epoch"] = self._steps_per_epoch()
            self.optimizer = cls(params, **kwargs)
        self.optimizer = self._closure_driven(self.optimizer)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = StepSizeSchedule(_unwrap(self.optimizer if optimizer is None else optimizer))
        return self.lr_scheduler

    # ------------------------------------------------------------------- step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """One line-search step on this batch; returns the loss at the start of the step (detached).

        With gradient accumulation the Trainer calls this once per micro-batch: the micro-batches are
        kept until the last one of the optimizer step arrives, which runs the step over all of them
        (the earlier calls return 0, so the Trainer's summed loss is the step's loss).
        """
        self._check_supported()
        driven = _find_closure_driven(self.optimizer)
        if driven is None:  # e.g. an optimizer set after __init__
            raise RuntimeError("LineSearchTrainer: the optimizer was replaced after setup; create the Trainer "
                               "with optimizers=(opt, None)")
        model.train()
        inputs = self._prepare_inputs(inputs)
        pending = self.__dict__.setdefault("_line_search_micro_batches", [])
        pending.append(inputs)
        n_micro = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        if len(pending) < n_micro:
            driven.stepped = False
            return torch.zeros((), device=self.args.device)
        batches = list(pending)
        pending.clear()

        def loss_of(batch, items):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch, num_items_in_batch=items)
            if self.args.n_gpu > 1:
                loss = loss.mean()  # nn.DataParallel returns one loss per GPU
            return loss

        if len(batches) == 1:
            def closure():
                return loss_of(batches[0], num_items_in_batch)
        else:
            # Each micro-batch's own mean loss, weighted by its share of the examples: the mean loss of
            # the concatenated batch (exact for per-example losses; for token-level losses the tokens
            # of a micro-batch count by its examples). The Trainer's num_items_in_batch is not passed:
            # models that take loss kwargs but ignore it would otherwise sum the micro-batch means.
            sizes = [_batch_size(b) for b in batches]
            weights = [n / sum(sizes) for n in sizes]

            def closure(backwards=False):
                total = None
                for i, batch in enumerate(batches):
                    # DDP: reduce the gradients once, on the last micro-batch's backward
                    sync = contextlib.nullcontext() if (not backwards or i == len(batches) - 1) \
                        else self.accelerator.no_sync(model)
                    with sync:
                        loss = loss_of(batch, None) * weights[i]
                        if backwards:
                            loss.backward()
                    total = loss.detach() if total is None else total + loss.detach()
                return total

        driven.stepped = False
        driven.optimizer.zero_grad()
        loss = driven.optimizer.step(closure)
        driven.stepped = True
        return loss.detach()


def _batch_size(inputs) -> int:
    """The number of examples in a batch dict (the first dimension of its first batched tensor)."""
    for v in inputs.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("LineSearchTrainer: cannot tell the size of a micro-batch (no batched tensor in it)")


def build_trainer(model, args, optimizer: str = "adamw", optimizer_kwargs: Optional[dict] = None,
                  **trainer_kwargs) -> Trainer:
    """A Trainer set up for one of our optimizers (``optimizer`` names a key of ``OPTIMIZERS``).

    - ``"adamw"`` / ``"svi"``: the stock ``Trainer`` with ``optimizer_cls_and_kwargs``; ``lr`` defaults to
      ``args.learning_rate``, and weight decay comes from ``args.weight_decay`` (the Trainer's param groups
      exempt biases and LayerNorm). ``"svi"`` first calls ``sk.svi.attach(model)``; the handle is
      ``trainer.svi_handle`` (``trainer.svi_handle.remove()`` restores the model).
    - the line-search names: a ``LineSearchTrainer``.
    """
    key = optimizer.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[key]
    kwargs = dict(optimizer_kwargs or {})
    if issubclass(cls, LineSearchOptimizer):
        return LineSearchTrainer(model=model, args=args, optimizer_cls_and_kwargs=(cls, kwargs), **trainer_kwargs)
    kwargs.setdefault("lr", args.learning_rate)
    handle = _svi.attach(model) if cls is SVI else None
    try:
        trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=(cls, kwargs), **trainer_kwargs)
    except Exception:
        if handle is not None:
            handle.remove()
        raise
    trainer.svi_handle = handle
    return trainer
