"""Find the (Linear, activation) pairs of a model by watching one real forward pass.

Global module hooks see every module call; a ``TorchFunctionMode`` sees every torch function. Each output
of a candidate Linear (``nn.Linear`` or HF ``Conv1D``, registered in the model) is tracked, and every
use of it is recorded: a call of a registered activation module, a call of an activation function
(``F.gelu``, ``torch.tanh``, ...; also the one inside an activation module created in ``forward``), or
anything else (a view, a norm, dropout, a product, another Linear...). Metadata reads (``.shape``,
``.dtype``, ``._base``...) and calls that return no tensor (``register_hook``, ``.tolist()``: nothing they
compute reaches autograd) are not uses, so FSDP2's hooks on a layer's output (``requires_grad``, ``_base``,
``register_hook``) leave the layer a pair. A Linear is a pair when every one of its calls had exactly one use, an
activation, always the same one. While watching, each call already carries the field (``SVILinear`` with
a ``decided`` token set after the forward), so an observed training forward gives an exact SVI step.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import svi_autograd as sa

# Elementwise activation modules (torch's), plus every class of transformers.activations but the identity.
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
               nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold)
ACT_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh,
                 F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.sigmoid,
                 F.tanh, torch.tanh, torch.sigmoid, torch.relu, torch.selu, torch.celu, torch.special.expit,
                 Tensor.tanh, Tensor.sigmoid, Tensor.relu}
_METADATA = {"size", "dim", "shape", "dtype", "device", "numel", "is_floating_point", "is_complex", "ndim",
             "ndimension", "layout", "is_cuda", "__len__", "data_ptr", "element_size", "stride", "is_contiguous",
             "nelement", "requires_grad", "is_leaf", "grad_fn", "names", "storage_offset", "is_sparse",
             "get_device", "__format__", "__repr__", "is_quantized", "is_meta", "is_nested", "__hash__", "_base",
             "is_inference", "_version"}


def is_activation_module(m: nn.Module) -> bool:
    if isinstance(m, ACT_MODULES):
        return True
    cls = type(m)
    return cls.__module__ == "transformers.activations" and cls.__name__ != "LinearActivation"


def fused_kind(act: nn.Module) -> Optional[str]:
    """The ``LinearActSVI`` kind of an activation module whose forward is exactly that function, else None."""
    cls = type(act)
    if getattr(act, "inplace", False):
        return None
    if cls is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    simple = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
    if cls in simple:
        return simple[cls]
    if cls.__module__ == "transformers.activations":
        if cls.__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
            return "gelu"
        if cls.__name__ == "SiLUActivation":
            return "silu"
    return None


def linear_layout(m: nn.Module) -> Optional[bool]:
    """``transposed`` for a Linear we can pair (False: nn.Linear, True: HF Conv1D), None for other modules."""
    if "forward" in vars(m):  # its forward is replaced by someone (another library, or attach itself)
        return None
    cls = type(m)
    if isinstance(m, nn.Linear) and cls.forward is nn.Linear.forward:
        return False
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    if conv1d is not None and isinstance(m, conv1d) and cls.forward is conv1d.forward:
        return True
    return None


def _method_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property read (Tensor.shape...): name the property
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _is_inplace(args, kwargs) -> bool:
    return kwargs.get("inplace", False) is True or any(a is True for a in args[1:])


@dataclass
class Use:
    kind: str  # "module", "function" or "other"
    target: object  # the activation module, the function, or the function that used Z otherwise
    caller: Optional[nn.Module] = None  # function uses: innermost registered module running the call


@dataclass
class Call:
    """One call of a candidate Linear during the observed forward."""
    linear: nn.Module
    z: Tensor
    carrier: Tensor
    decided: "Decided"
    uses: List[Use] = field(default_factory=list)


class Decided:
    pair = False


def site_of(use: Use):
    return (use.kind, use.target if use.kind == "module" else (use.target, use.caller))


class Observer(TorchFunctionMode):
    """Records uses of candidate Linears' outputs during one forward; see the module docstring."""

    def __init__(self, linears: Dict[nn.Module, bool], acts: set, registered: set):
        super().__init__()
        self.linears, self.acts, self.registered = linears, acts, registered
        self.tracked: Dict[int, Call] = {}
        self.calls: Dict[nn.Module, List[Call]] = {}
        self.act_inputs: Dict[nn.Module, List[Optional[Call]]] = {}  # per activation module: its inputs' calls
        self.stack: List[tuple] = []  # (module, Call or None) of the modules running
        self.suppress = 0  # > 0 inside a registered activation module: its inner ops are the activation's
        self._hooks = []
        self._undo: List[Callable[[], None]] = []

    # --------------------------------------------------------------------------------- lifecycle
    def start(self, root: Optional[nn.Module] = None):
        from torch.nn.modules import module as mm
        self._hooks = [mm.register_module_forward_pre_hook(self._pre),
                       mm.register_module_forward_hook(self._post, always_call=True)]
        for lin, transposed in self.linears.items():
            self._patch(lin, transposed)
        if root is not None:  # the root's own call is already under way (attach's first-forward hook)
            self.stack.append((root, None))
        self.__enter__()

    def stop(self):
        self.__exit__(None, None, None)
        for h in self._hooks:
            h.remove()
        for undo in self._undo:
            undo()
        self._hooks, self._undo = [], []

    def _patch(self, lin: nn.Module, transposed: bool):
        def forward(*args, **kwargs):
            x, w, b = sa.autocast_args(sa.linear_input(args, kwargs), lin.weight, lin.bias)
            z, carrier = sa.SVILinear.apply(x, w, b, transposed, decided := Decided())
            call = Call(lin, z, carrier, decided)
            self.tracked[id(z)] = call
            self.calls.setdefault(lin, []).append(call)
            return z
        lin.forward = forward
        self._undo.append(lambda: delattr(lin, "forward"))

    # ------------------------------------------------------------------------------ observation
    def _call_of(self, t) -> Optional[Call]:
        call = self.tracked.get(id(t)) if isinstance(t, Tensor) else None
        return call if call is not None and call.z is t else None

    def _caller(self) -> Optional[nn.Module]:
        for m, _ in reversed(self.stack):
            if id(m) in self.registered:
                return m
        return None

    def _pre(self, module, args):
        call = None
        if self.suppress:
            self.suppress += 1
        elif module in self.acts:
            call = self._call_of(args[0]) if args else None
            self.act_inputs.setdefault(module, []).append(call)
            if call is not None:
                call.uses.append(Use("module", module))
            self.suppress = 1
        elif module in self.linears:
            for t in tree_leaves(args):
                c = self._call_of(t)
                if c is not None:
                    c.uses.append(Use("other", module))
        self.stack.append((module, call))

    def _post(self, module, args, output):
        if not self.stack or self.stack[-1][0] is not module:
            return None
        _, call = self.stack.pop()
        if self.suppress:
            self.suppress -= 1
        if call is None or not isinstance(output, Tensor):
            return None
        self.suppress += 1  # our own ops on the (possibly in-place) output are not uses
        try:
            return sa.tap(output, call.carrier)
        finally:
            self.suppress -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suppress or not self.tracked:
            return func(*args, **kwargs)
        hits = [c for c in map(self._call_of, tree_leaves((args, kwargs))) if c is not None]
        if not hits or _method_name(func) in _METADATA:
            return func(*args, **kwargs)
        first = self._call_of(args[0]) if args else None
        if (func in ACT_FUNCTIONS and first is not None and len(hits) == 1 and not _is_inplace(args, kwargs)):
            first.uses.append(Use("function", func, self._caller()))
            return sa.tap(func(*args, **kwargs), first.carrier)
        out = func(*args, **kwargs)
        if any(isinstance(t, Tensor) for t in tree_leaves(out)):  # else nothing computed from Z reaches autograd
            for c in hits:
                c.uses.append(Use("other", func))
        return out


@dataclass
class Found:
    """What one observed forward found."""
    pairs: Dict[nn.Module, Use]  # paired Linear -> its activation use
    skipped: Dict[nn.Module, str]  # Linear whose output reached an activation but is not a pair -> why
    act_inputs: Dict[nn.Module, List[Optional[Call]]]


def _describe(use: Use) -> str:
    what = use.target if use.kind == "function" or use.kind == "other" else type(use.target)
    name = getattr(what, "__name__", None) or type(what).__name__
    return name if use.kind != "other" else f"{name} (not an activation)"


def decide(obs: Observer) -> Found:
    pairs, skipped = {}, {}
    for lin, calls in obs.calls.items():
        reason = None
        sites = {site_of(u) for c in calls for u in c.uses if u.kind != "other"}
        if not sites:
            continue  # never fed an activation: an ordinary Linear
        for c in calls:
            if len(c.uses) != 1 or c.uses[0].kind == "other":
                reason = "its output goes to " + ", ".join(_describe(u) for u in c.uses)
                break
        if reason is None and len(sites) > 1:
            reason = "its calls feed different activations"
        if reason is None:
            pairs[lin] = calls[0].uses[0]
            for c in calls:
                c.decided.pair = True
        else:
            skipped[lin] = reason
    return Found(pairs, skipped, obs.act_inputs)
