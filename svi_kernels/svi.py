"""SVI field for (Linear, activation) layers: ``svi_kernels.svi.attach(model)``.

For a layer ``Y = act(Z)``, ``Z = X Wᵀ + b`` and ``G = dL/dY``, ordinary backprop gives
``dL/dW = (act'(Z) ⊙ G)ᵀ X``. The monotone-VI (SVI) field drops the layer's own activation derivative:
``D_W = Gᵀ X`` and ``D_b = Σ G`` (summed over batch and token dimensions), as in Xu, Cheng & Xie's
released code. Only the layer's own weight and bias gradients change: the gradient passed to lower
layers is still the exact ``(act'(Z) ⊙ G) W``, and every other parameter keeps its ordinary gradient.

Which layers: every ``nn.Linear`` / HF ``Conv1D`` whose output goes straight, and only, into an
elementwise activation (module or function), found by watching one real forward pass
(``svi_detect``). The backward does the same two matmuls as ordinary backprop (``svi_autograd``).

What SVI does to a HF BERT classifier:
- ``intermediate.dense`` (GELU) and ``pooler.dense`` (tanh) get the SVI field (GELU'/tanh' dropped).
- The classifier ``nn.Linear`` trained with cross-entropy has no activation of its own: softmax+CE's
  gradient ``(p - y) Xᵀ`` already *is* the VI operator, so SVI equals SGD there. In classifier-only
  fine-tuning, SVI differs from SGD only through the pooler (when it is trained).
- Q/K/V, attention output and output dense layers are not followed by an elementwise activation and keep
  their ordinary gradients.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import svi_autograd as sa
from . import svi_detect as sd
from .optim import sharding

_PENDING = weakref.WeakKeyDictionary()  # model -> handle still waiting for its first forward
_MAX_PENDING = 8  # outputs of one Linear waiting for their activation (bounded: a path that never taps)


def _function_name(func) -> str:
    """F.gelu, torch.tanh, Tensor.sigmoid: how the model's code spells it."""
    module, name = getattr(func, "__module__", None), getattr(func, "__name__", repr(func))
    if module is None:
        return f"Tensor.{name}"
    return f"F.{name}" if module in ("torch.nn.functional", "torch._C._nn") else f"torch.{name}"


def _refuse_copy(memo=None):
    raise RuntimeError("copy.deepcopy of a model with svi.attach: the copy's layers would still run this model's "
                       "SVI wiring. Copy before attaching (or handle.remove(), copy, attach each)")


class _Slot:
    """Outputs (Z, carrier) of one paired Linear not yet seen by their activation (hook/mode styles)."""

    def __init__(self):
        self.pending: List[tuple] = []

    def push(self, z, carrier):
        self.pending.append((z, carrier))
        if len(self.pending) > _MAX_PENDING:
            del self.pending[0]

    def take(self, t) -> Optional[Tensor]:
        for i, (z, carrier) in enumerate(self.pending):
            if z is t:
                del self.pending[i]
                return carrier
        return None


class _FunctionTaps(TorchFunctionMode):
    """Active while a module that applies an activation *function* to a paired Linear's output runs."""

    def __init__(self):
        super().__init__()
        self.slots: Dict[Callable, List[_Slot]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for slot in self.slots.get(func, ()) if args else ():
            carrier = slot.take(args[0])
            if carrier is not None:
                return sa.tap(out, carrier)
        return out


class SVIHandle:
    """What ``attach`` changed; ``remove()`` restores the model exactly.

    ``layers``: names of the Linears that get the field; ``activations``: layer name -> its activation;
    ``skipped``: Linears whose output reached an activation but also went elsewhere -> why they keep their
    ordinary gradient; ``detected``: whether the observed forward has run yet."""

    def __init__(self, model: nn.Module, quiet: bool):
        self.layers: List[str] = []
        self.activations: Dict[str, str] = {}
        self.skipped: Dict[str, str] = {}
        self.detected = False
        self._model, self._quiet = model, quiet
        self._undo: List[Callable[[], None]] = []
        self._mode = _FunctionTaps()
        self._observer: Optional[sd.Observer] = None

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        _PENDING.pop(self._model, None)
        self.layers, self.activations, self.skipped = [], {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        state = "" if self.detected else ", waiting for the first forward"
        return f"SVIHandle({len(self.layers)} layers{state}: {self.layers})"

    # --------------------------------------------------------------------------- detection
    def _observer_for(self) -> sd.Observer:
        model = self._model
        named = list(model.named_modules())
        linears = {m: t for _, m in named if (t := sd.linear_layout(m)) is not None}
        acts = {m for _, m in named if sd.is_activation_module(m)}
        return sd.Observer(linears, acts, {id(m) for _, m in named})

    def _detect_now(self, args: tuple, kwargs: dict) -> None:
        model = self._model
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        obs = self._observer_for()
        # fresh_gathers: a forward without backward leaves an FSDP2 root (or reshard_after_forward=False
        # module) holding its gathered parameters, which training would then use instead of the updated shards.
        with torch.random.fork_rng(devices=devices), torch.no_grad(), sharding.fresh_gathers(True):
            obs.start()
            try:
                model(*args, **kwargs)
            finally:
                obs.stop()
        self._install(sd.decide(obs))

    def _arm_first_forward(self) -> None:
        def pre(module, args):
            if torch.compiler.is_compiling():
                raise RuntimeError("svi.attach: the first forward runs under torch.compile; pass example_inputs= "
                                   "to attach, or run one forward in eager mode before compiling")
            self._observer = self._observer_for()
            self._observer.start(root=module)

        def post(module, args, output):
            obs, self._observer = self._observer, None
            if obs is None:
                return
            obs.stop()
            if output is None:  # the forward raised: watch the next one instead
                return
            for h in hooks:
                h.remove()
            _PENDING.pop(self._model, None)
            self._install(sd.decide(obs))

        hooks = [self._model.register_forward_pre_hook(pre),
                 self._model.register_forward_hook(post, always_call=True)]
        _PENDING[self._model] = self
        self._undo.append(lambda: [h.remove() for h in hooks])
        self._refuse_deepcopy(self._model)

    # ------------------------------------------------------------------------------ install
    def _install(self, found: sd.Found) -> None:
        self.detected = True
        names = {}
        for name, m in self._model.named_modules():
            names.setdefault(m, name)
        pairs = found.pairs
        exclusive = {}  # activation module -> fuse it away: stateless, and every call takes a paired output
        for lin, use in pairs.items():
            if use.kind == "module" and use.target not in exclusive:
                calls = found.act_inputs.get(use.target, [])
                stateless = not any(True for _ in use.target.parameters()) and not any(True for _ in use.target.buffers())
                exclusive[use.target] = stateless and all(c is not None and c.linear in pairs for c in calls)
        for lin in sorted(pairs, key=lambda m: list(names).index(m)):
            use = pairs[lin]
            if use.kind == "module" and exclusive[use.target]:
                self._fuse(lin, use.target)
                desc = f"{names.get(use.target, '?')} ({type(use.target).__name__})"
            elif use.kind == "module":
                self._tap_module(lin, use.target)
                desc = f"{names.get(use.target, '?')} ({type(use.target).__name__}, hooked)"
            else:
                self._tap_function(lin, use.target, use.caller)
                desc = f"{_function_name(use.target)} called in {names.get(use.caller, '?') or '<root>'}"
            self.layers.append(names[lin])
            self.activations[names[lin]] = desc
        for act in [a for a, ok in exclusive.items() if ok]:
            self._replace_with_identity(act)
        self.skipped = {names[lin]: why for lin, why in found.skipped.items()}
        if not self.layers and not self._quiet:
            warnings.warn("svi.attach found no (Linear, activation) layers in the model; gradients are unchanged",
                          stacklevel=3)

    def _set_forward(self, module: nn.Module, forward: Callable) -> None:
        had = vars(module).get("forward")
        module.forward = forward

        def undo():
            if had is None:
                del module.forward
            else:
                module.forward = had
        self._undo.append(undo)
        self._refuse_deepcopy(module)

    def _refuse_deepcopy(self, module: nn.Module) -> None:
        """A copy would keep forwards/hooks bound to this model's layers and state: refuse it, clearly."""
        if "__deepcopy__" in vars(module):
            return
        module.__deepcopy__ = _refuse_copy
        self._undo.append(lambda: vars(module).pop("__deepcopy__", None))

    def _fuse(self, lin: nn.Module, act: nn.Module) -> None:
        """Style 1: the activation module only ever takes paired outputs: the Linear computes act(Z) itself
        (one node; no state between calls) and the activation's slots hold nn.Identity."""
        transposed, kind = sd.linear_layout(lin), sd.fused_kind(act)

        def forward(*args, **kwargs):
            x, w, b = sa.autocast_args(sa.linear_input(args, kwargs), lin.weight, lin.bias)
            if kind is not None:
                return sa.LinearActSVI.apply(x, w, b, transposed, kind)
            z, carrier = sa.SVILinear.apply(x, w, b, transposed, None)
            return sa.tap(act(z), carrier)
        self._set_forward(lin, forward)

    def _replace_with_identity(self, act: nn.Module) -> None:
        for _, parent in self._model.named_modules(remove_duplicate=False):
            for key, child in list(parent._modules.items()):
                if child is act:
                    parent._modules[key] = nn.Identity()

                    def undo(parent=parent, key=key, act=act):
                        parent._modules[key] = act
                    self._undo.append(undo)

    def _pending_linear(self, lin: nn.Module) -> _Slot:
        transposed, slot = sd.linear_layout(lin), _Slot()

        def forward(*args, **kwargs):
            x, w, b = sa.autocast_args(sa.linear_input(args, kwargs), lin.weight, lin.bias)
            z, carrier = sa.SVILinear.apply(x, w, b, transposed, None)
            slot.push(z, carrier)
            return z
        self._set_forward(lin, forward)
        return slot

    def _tap_module(self, lin: nn.Module, act: nn.Module) -> None:
        """Style 2: the activation module also takes other inputs: a forward hook taps the paired calls."""
        slot = self._pending_linear(lin)

        def hook(module, args, output):
            carrier = slot.take(args[0]) if args else None
            return None if carrier is None else sa.tap(output, carrier)
        h = act.register_forward_hook(hook)
        self._undo.append(h.remove)
        self._refuse_deepcopy(act)

    def _tap_function(self, lin: nn.Module, func: Callable, caller: nn.Module) -> None:
        """Style 3: an activation function: ``caller``'s forward runs under a TorchFunctionMode that taps it."""
        slot = self._pending_linear(lin)
        self._mode.slots.setdefault(func, []).append(slot)
        if getattr(caller, "_svi_taps_mode", None) is self._mode:
            return
        orig, mode, active = caller.forward, self._mode, [False]

        def forward(*args, **kwargs):
            if active[0]:  # already inside (a caller nested in another caller)
                return orig(*args, **kwargs)
            active[0] = True
            try:
                with mode:
                    return orig(*args, **kwargs)
            finally:
                active[0] = False
        self._set_forward(caller, forward)
        caller._svi_taps_mode = mode
        self._undo.append(lambda: delattr(caller, "_svi_taps_mode"))


def attach(model: nn.Module, example_inputs=None, *, example_kwargs: Optional[dict] = None,
           quiet: bool = False) -> SVIHandle:
    """Make backward write the SVI field into every (Linear, activation) layer of ``model``.

    The pairs are found by watching one forward pass (``docs/api.md`` lists what is recognised):
    - ``example_inputs`` (a tensor, a tuple of positional arguments, or a mapping of keyword arguments
      such as a tokenizer's output) and/or ``example_kwargs``: run ``model(*example_inputs, **example_kwargs)``
      (or ``model(**example_inputs, **example_kwargs)``) now, under ``no_grad`` and with the RNG state restored
      afterwards; ``handle.layers`` is filled on return and every training step carries the field.
    - neither: the model's first forward is watched. That step already carries the field (its Linears run
      the SVI backward, decided when the forward ends); ``handle.layers`` is empty until then. Call it
      eagerly: under ``torch.compile`` the first forward raises (pass ``example_inputs`` instead).
    Only layers that the watched forward runs are found. FSDP2 models (attach before or after ``fully_shard``)
    give the unsharded model's layers; the ``example_inputs`` forward reshards the FSDP modules it called.
    Returns a handle listing the changed layers;
    ``handle.remove()`` undoes everything. Warns when it finds none.
    """
    if model in _PENDING:
        raise RuntimeError("svi.attach: this model is already attached and waits for its first forward")
    handle = SVIHandle(model, quiet)
    if example_inputs is None and example_kwargs is None:
        handle._arm_first_forward()
        return handle
    handle._detect_now(*_example_call(example_inputs, example_kwargs))
    return handle


def _example_call(example_inputs, example_kwargs) -> tuple:
    """(args, kwargs) of the example forward: a tensor is one argument, a tuple/list the arguments, a
    Mapping (a dict, a tokenizer's BatchEncoding) keyword arguments; anything else is refused."""
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        return (), kwargs
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, Mapping):
        both = sorted(set(example_inputs) & set(kwargs))
        if both:
            raise ValueError(f"svi.attach: {both} given both in example_inputs (a mapping) and in example_kwargs")
        return (), {**example_inputs, **kwargs}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), kwargs
    raise TypeError(
        f"svi.attach: example_inputs must be a tensor, a tuple or list of positional arguments, or a mapping "
        f"of keyword arguments; got {type(example_inputs).__name__}. Pass keyword arguments as example_kwargs=")
