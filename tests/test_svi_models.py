"""svi.attach on tiny random HF models and custom modules: the detected pairs equal the expected ones,
each pair's gradient equals a hand-computed field Gᵀ X (Σ G for the bias, summed over every use of a
shared layer), and every other gradient equals plain backprop. float64, so "equal" is tight."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import svi_kernels as sk
from tiny_models import CUSTOM, HF_NAMES, custom_model, hf_model

L = "encoder.layer"
# per model: {paired Linear: its activation (a submodule name, or the function the model calls)}
EXPECTED = {
    "bert": {**{f"bert.{L}.{i}.intermediate.dense": f"bert.{L}.{i}.intermediate.intermediate_act_fn" for i in (0, 1)},
             "bert.pooler.dense": "bert.pooler.activation"},
    "electra": {**{f"electra.{L}.{i}.intermediate.dense": f"electra.{L}.{i}.intermediate.intermediate_act_fn"
                   for i in (0, 1)}, "classifier.dense": "classifier.activation"},
    "deberta-v2": {**{f"deberta.{L}.{i}.intermediate.dense": f"deberta.{L}.{i}.intermediate.intermediate_act_fn"
                      for i in (0, 1)}, "pooler.dense": F.gelu},  # ACT2FN[...] made inside ContextPooler.forward
    "roberta": {**{f"roberta.{L}.{i}.intermediate.dense": f"roberta.{L}.{i}.intermediate.intermediate_act_fn"
                   for i in (0, 1)}, "classifier.dense": torch.tanh},  # the head's torch.tanh
    "distilbert": {**{f"distilbert.transformer.layer.{i}.ffn.lin1": f"distilbert.transformer.layer.{i}.ffn.activation"
                      for i in (0, 1)}, "pre_classifier": F.relu},  # nn.ReLU()(x) inside forward
    "albert": {"albert.encoder.albert_layer_groups.0.albert_layers.0.ffn":
               "albert.encoder.albert_layer_groups.0.albert_layers.0.activation",  # one layer used 3 times
               "albert.pooler": "albert.pooler_activation"},
    "t5-encoder": {f"encoder.block.{i}.layer.1.DenseReluDense.wi": f"encoder.block.{i}.layer.1.DenseReluDense.act"
                   for i in (0, 1)},
    "gpt2": {f"transformer.h.{i}.mlp.c_fc": f"transformer.h.{i}.mlp.act" for i in (0, 1)},  # Conv1D, NewGELU
    "llama": {f"model.layers.{i}.mlp.gate_proj": f"model.layers.{i}.mlp.act_fn" for i in (0, 1)},  # gated SiLU
    "vit": {f"vit.layers.{i}.mlp.fc1": f"vit.layers.{i}.mlp.activation_fn" for i in (0, 1)},
}
CASES = [("hf", n) for n in HF_NAMES] + [("custom", n) for n in CUSTOM]


def make(kind, name):
    if kind == "hf":
        return (*hf_model(name), EXPECTED[name])
    return (*custom_model(name), CUSTOM[name][1])


class _FunctionHooks(TorchFunctionMode):
    """Test-side capture of G for functional activations: hooks the output of ``func(z)`` for a known z."""

    def __init__(self, wanted):
        super().__init__()
        self.wanted = wanted  # list of (func, layer name, state)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for f, name, st in self.wanted:
            if func is f and args and st["z"] is not None and args[0] is st["z"]:
                st["z"] = None
                _keep_g(out, st)
        return out


def _keep_g(y, st):
    """G of the latest call (backward visits the calls in reverse order, hence the index)."""
    i = len(st["x"]) - 1
    y.register_hook(lambda g: st["g"].__setitem__(i, g.detach()))


def reference(model, inputs, loss_fn, expected):
    """Plain backprop on an untouched copy, recording X (Linear input) and G (grad of its activation's output)
    for every call of every expected pair."""
    mods = dict(model.named_modules())
    states, hooks, wanted = {}, [], []
    for name, act in expected.items():
        st = states[name] = {"x": [], "g": {}, "z": None}

        def lin_hook(m, args, out, st=st):
            st["x"].append(args[0].detach())
            st["z"] = out
        hooks.append(mods[name].register_forward_hook(lin_hook))
        if isinstance(act, str):
            def act_hook(m, args, out, st=st):
                if st["z"] is not None and args[0] is st["z"]:
                    st["z"] = None
                    _keep_g(out, st)
            hooks.append(mods[act].register_forward_hook(act_hook))
        else:
            wanted.append((act, name, st))
    with _FunctionHooks(wanted):
        loss_fn(model, inputs).backward()
    for h in hooks:
        h.remove()
    return states


def field(mod, st):
    """Σ over uses of Gᵀ X (HF Conv1D stores W as (in, out): Xᵀ G) and Σ G."""
    assert sorted(st["g"]) == list(range(len(st["x"]))) and st["x"]
    gs = [st["g"][i] for i in range(len(st["x"]))]
    conv1d = type(mod).__name__ == "Conv1D"
    dw = sum(torch.einsum("...i,...o->io" if conv1d else "...i,...o->oi", x.to(g.dtype), g) for x, g in zip(st["x"], gs))
    db = sum(g.reshape(-1, g.shape[-1]).sum(0) for g in gs)
    return dw, db


def check_grads(model, ref, states, expected, rtol=1e-9, atol=1e-12):
    params = dict(model.named_parameters())
    changed, differs = set(), False
    for name in expected:
        lin = dict(model.named_modules())[name]
        dw, db = (t.to(lin.weight.dtype) for t in field(lin, states[name]))
        torch.testing.assert_close(params[name + ".weight"].grad, dw, rtol=rtol, atol=atol, msg=name)
        differs |= not torch.allclose(dw, dict(ref.named_parameters())[name + ".weight"].grad)
        changed.add(name + ".weight")
        if lin.bias is not None:
            torch.testing.assert_close(params[name + ".bias"].grad, db, rtol=rtol, atol=atol, msg=name)
            changed.add(name + ".bias")
    assert differs, "the field equals the ordinary gradient everywhere: the test could not fail"
    for name, p in ref.named_parameters():
        if name not in changed and p.grad is not None:
            torch.testing.assert_close(params[name].grad, p.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("mode", ["example_inputs", "first_forward"])
@pytest.mark.parametrize("kind,name", CASES, ids=[n for _, n in CASES])
def test_detected_pairs_and_field(kind, name, mode):
    ref, inputs, loss_fn, expected = make(kind, name)
    model = copy.deepcopy(ref)
    states = reference(ref, inputs, loss_fn, expected)
    if mode == "example_inputs":
        handle = sk.svi.attach(model, example_kwargs=inputs)
        assert sorted(handle.layers) == sorted(expected)
    else:
        handle = sk.svi.attach(model)
        assert handle.layers == [] and not handle.detected
    loss = loss_fn(model, inputs)  # first_forward: this step is watched and already carries the field
    torch.testing.assert_close(loss, loss_fn(ref, inputs), rtol=1e-12, atol=0)  # forward unchanged
    loss.backward()
    assert sorted(handle.layers) == sorted(expected), handle.activations
    check_grads(model, ref, states, expected)
    # a second step (the installed path) gives the same gradients
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss_fn(model, inputs).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-12, atol=1e-14, msg=n)
    handle.remove()
    model.zero_grad()
    ref.zero_grad()
    loss_fn(model, inputs).backward()
    loss_fn(ref, inputs).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_not_paired_are_reported(name):
    model, inputs, _ = custom_model(name)
    handle = sk.svi.attach(model, example_kwargs=inputs)
    not_paired = set(CUSTOM[name][2])
    assert not not_paired & set(handle.layers)
    if name == "module-acts":
        assert "norm_lin" not in handle.skipped  # its output went to a LayerNorm only: never reached an activation
    else:
        assert handle.skipped["l4"] == "its output goes to relu, add (not an activation)"


def test_remove_restores_module_tree():
    model, inputs, _ = custom_model("module-acts")
    before = {n: type(m) for n, m in model.named_modules()}
    handle = sk.svi.attach(model, example_kwargs=inputs)
    assert isinstance(model.act_in, nn.Identity)  # only ever takes the paired output: fused into `inp`
    assert isinstance(model.prelu, nn.PReLU) and any(p is model.prelu.weight for p in model.parameters())  # hooked, kept
    handle.remove()
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all("forward" not in vars(m) for m in model.modules())


def test_activation_descriptions():
    """handle.activations says which activation each layer pairs with, and where a function is called."""
    model, inputs, _ = hf_model("roberta")
    acts = sk.svi.attach(model, example_kwargs=inputs).activations
    assert acts["classifier.dense"] == "torch.tanh called in classifier"
    assert acts["roberta.encoder.layer.0.intermediate.dense"] == (
        "roberta.encoder.layer.0.intermediate.intermediate_act_fn (GELUActivation)")
    model, inputs, _ = hf_model("distilbert")
    assert sk.svi.attach(model, example_kwargs=inputs).activations["pre_classifier"] == "F.relu called in <root>"


@pytest.mark.parametrize("name", list(CUSTOM))
@pytest.mark.parametrize("when", ["pending", "installed"])
def test_deepcopy_of_attached_model_is_refused(name, when):
    model, inputs, _ = custom_model(name)
    handle = sk.svi.attach(model) if when == "pending" else sk.svi.attach(model, example_kwargs=inputs)
    with pytest.raises(RuntimeError, match="deepcopy of a model with svi.attach"):
        copy.deepcopy(model)
    handle.remove()
    assert all("__deepcopy__" not in vars(m) for m in model.modules())
    copy.deepcopy(model)
