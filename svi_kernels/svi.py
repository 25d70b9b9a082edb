"""SVI field for (Linear, activation) layers: ``svi_kernels.svi.attach(model)``.

For a layer ``Y = act(Z)``, ``Z = X Wᵀ + b`` and ``G = dL/dY``, ordinary backprop gives
``dL/dW = (act'(Z) ⊙ G)ᵀ X``. The monotone-VI (SVI) field drops the layer's own activation derivative:
``D_W = Gᵀ X`` and ``D_b = Σ G`` (summed over batch and token dimensions), as in Xu, Cheng & Xie's
released code. Only the layer's own weight and bias gradients change: the gradient passed to lower
layers is still the exact ``(act'(Z) ⊙ G) W``, and every other parameter keeps its ordinary gradient.

``attach`` fuses each pair into one autograd function whose backward does the same two matmuls as
ordinary backprop (``dX = dZ W`` and the weight product, now with ``G`` instead of ``dZ``) plus one
elementwise pass for ``dZ = act'(Z) ⊙ G`` (a Triton kernel on CUDA, PyTorch otherwise): no extra matmul.

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
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Elementwise activations recognised as the "activation" of a (Linear, activation) pair.
_TORCH_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
_HF_CLASSES = {  # transformers.activations classes (matched by name: transformers is optional)
    "GELUActivation": "gelu", "NewGELUActivation": None, "FastGELUActivation": None, "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh", "QuickGELUActivation": None, "SiLUActivation": "silu",
    "ReLUSquaredActivation": None, "MishActivation": None, "ClippedGELUActivation": None,
}
_FUNCTIONS = {F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh",
              torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu"}
_ACT_ATTRS = ("intermediate_act_fn", "activation", "transform_act_fn", "act_fn", "act")


def activation_kind(act) -> tuple[bool, Optional[str]]:
    """(is a recognised elementwise activation, kernel kind or None for the generic autograd path)."""
    if isinstance(act, nn.GELU):
        return True, "gelu" if act.approximate == "none" else "gelu_tanh"
    for cls, kind in _TORCH_MODULES.items():
        if isinstance(act, cls):
            return True, kind
    name = type(act).__name__
    if isinstance(act, nn.Module) and name in _HF_CLASSES:
        if name == "GELUActivation" and getattr(act, "act", F.gelu) is not F.gelu:
            return True, None  # the python-gelu variant: same function, generic derivative
        return True, _HF_CLASSES[name]
    if callable(act) and not isinstance(act, nn.Module):
        try:
            if act in _FUNCTIONS:
                return True, _FUNCTIONS[act]
        except TypeError:
            pass
    return False, None


def act_backward(z: Tensor, g: Tensor, kind: Optional[str], act: Callable) -> Tensor:
    """dZ = act'(Z) ⊙ G in one elementwise pass (Triton on CUDA when available)."""
    if z.is_cuda and kind is not None:
        try:
            from .triton import svi_backward as tsb
            if tsb.triton_available():
                return tsb.act_backward(z, g, kind)
        except ImportError:
            pass
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (dz,) = torch.autograd.grad(act(zz), zz, g)
    return dz


class LinearActSVI(torch.autograd.Function):
    """Y = act(X Wᵀ + b); backward: dX exact, dW = Gᵀ X, db = Σ G (the SVI field)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act, kind):
        z = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, z)
        ctx.act, ctx.kind, ctx.has_bias = act, kind, bias is not None
        return act(z)

    @staticmethod
    def backward(ctx, g):
        x, weight, z = ctx.saved_tensors
        dx = dw = db = None
        out_f, in_f = weight.shape
        if ctx.needs_input_grad[0]:
            dz = act_backward(z, g, ctx.kind, ctx.act)
            dx = (dz.to(weight.dtype) @ weight).to(x.dtype)
        g2 = g.reshape(-1, out_f)
        if ctx.needs_input_grad[1]:
            dw = (g2.t().to(x.dtype) @ x.reshape(-1, in_f)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0).to(weight.dtype)
        return dx, dw, db, None, None


class SVIHandle:
    """What ``attach`` changed; ``remove()`` restores the model exactly."""

    def __init__(self):
        self.layers: List[str] = []
        self._undo: List[Callable[[], None]] = []

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.layers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        return f"SVIHandle({len(self.layers)} layers: {self.layers})"


def _patch(handle: SVIHandle, name: str, linear: nn.Linear, act, kind, restore_act: Callable[[], None]) -> None:
    if "forward" in vars(linear):
        raise RuntimeError(f"svi.attach: {name} already has a patched forward (attached twice?)")

    def forward(x: Tensor) -> Tensor:
        return LinearActSVI.apply(x, linear.weight, linear.bias, act, kind)

    linear.forward = forward
    linear._svi_attached = True

    def undo():
        del linear.forward
        del linear._svi_attached
        restore_act()

    handle._undo.append(undo)
    handle.layers.append(name)


def attach(model: nn.Module, *, quiet: bool = False) -> SVIHandle:
    """Make backward write the SVI field into every (Linear, activation) layer of ``model``.

    Finds Linear layers followed by an elementwise activation: consecutive children of ``nn.Sequential``
    (Linear then GELU/ReLU/Tanh/Sigmoid/SiLU), and HF-style modules holding ``dense`` plus an activation
    attribute (``intermediate_act_fn`` in BertIntermediate, ``activation`` in BertPooler,
    ``transform_act_fn`` in prediction heads). Returns a handle listing the changed layers
    (``handle.layers``); ``handle.remove()`` undoes everything. Warns when it finds none.
    """
    handle = SVIHandle()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (n1, m1), (n2, m2) in zip(children, children[1:]):
                ok, kind = activation_kind(m2)
                if isinstance(m1, nn.Linear) and ok and not getattr(m1, "_svi_attached", False):
                    def restore(seq=module, key=n2, orig=m2):
                        seq._modules[key] = orig
                    _patch(handle, prefix + n1, m1, m2, kind, restore)
                    module._modules[n2] = nn.Identity()
        dense = getattr(module, "dense", None)
        if isinstance(dense, nn.Linear) and not getattr(dense, "_svi_attached", False):
            for attr in _ACT_ATTRS:
                act = getattr(module, attr, None)
                if act is None:
                    continue
                ok, kind = activation_kind(act)
                if not ok:
                    continue

                def restore(mod=module, key=attr, orig=act):
                    mod._modules.pop(key, None)  # the Identity we put there
                    setattr(mod, key, orig)
                _patch(handle, prefix + "dense", dense, act, kind, restore)
                setattr(module, attr, nn.Identity())
                break
    if not handle.layers and not quiet:
        warnings.warn("svi.attach found no (Linear, activation) layers in the model; gradients are unchanged",
                      stacklevel=2)
    return handle
