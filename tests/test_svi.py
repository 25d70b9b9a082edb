"""svi.attach mechanics: the field on an MLP and a tiny BERT, lower layers exact, remove(), matmul counts,
torch.compile vs eager, bf16 autocast, the activation-backward kernel (Triton on CUDA), errors."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import svi_kernels as sk
from tiny_models import CUSTOM, custom_model, hf_model


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))


def capture(model, pairs):
    """Hooks on an unpatched model: X = input of each Linear, G = grad w.r.t. its activation's output."""
    xs, gs = {}, {}
    hooks = []
    for name, lin, act in pairs:
        hooks.append(lin.register_forward_hook(lambda m, i, o, name=name: xs.__setitem__(name, i[0].detach())))

        def fwd(m, i, o, name=name):
            o.register_hook(lambda g, name=name: gs.__setitem__(name, g.detach()))
        hooks.append(act.register_forward_hook(fwd))
    return xs, gs, hooks


def field(x, g):
    return torch.einsum("...o,...i->oi", g, x), g.reshape(-1, g.shape[-1]).sum(0)


def test_mlp_field_equals_hand_computed():
    ref, model = mlp(), mlp()
    x = torch.randn(4, 6, 5)  # batch and token dimensions are both summed
    y = torch.randn(4, 6, 3)
    xs, gs, hooks = capture(ref, [("0", ref[0], ref[1]), ("2", ref[2], ref[3])])
    ((ref(x) - y) ** 2).mean().backward()
    handle = sk.svi.attach(model, x)
    assert handle.layers == ["0", "2"]
    out = model(x)
    torch.testing.assert_close(out, ref(x))  # the forward is unchanged
    ((out - y) ** 2).mean().backward()
    for name in ("0", "2"):
        dw, db = field(xs[name], gs[name])
        torch.testing.assert_close(model[int(name)].weight.grad, dw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[int(name)].bias.grad, db, rtol=1e-5, atol=1e-6)
        # and it differs from backprop (the activation derivative was dropped)
        assert not torch.allclose(model[int(name)].weight.grad, ref[int(name)].weight.grad)
    # the last Linear has no activation after it: ordinary gradient
    torch.testing.assert_close(model[4].weight.grad, ref[4].weight.grad)
    torch.testing.assert_close(model[4].bias.grad, ref[4].bias.grad)


class _Inspects(nn.Module):
    """Linear -> GELU, with what FSDP2's hooks do to a layer output in between (read ``requires_grad`` and
    ``_base``, ``register_hook``) plus ``.tolist()``: none computes a tensor, so the pair stays; ``clone``
    (when ``copy``) does, so it is not a pair."""

    def __init__(self, copy_z: bool):
        super().__init__()
        self.lin, self.act, self.copy_z, self.hooked = nn.Linear(5, 4), nn.GELU(), copy_z, []

    def forward(self, x):
        z = self.lin(x)
        if z.requires_grad and z._base is None:
            z.register_hook(lambda g: self.hooked.append(g.shape))
        z.tolist()
        if self.copy_z:
            z.clone()
        return self.act(z)


@pytest.mark.parametrize("example", [True, False])
def test_calls_returning_no_tensor_are_not_uses(example):
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    for copy_z, layers in ((False, ["lin"]), (True, [])):
        model = _Inspects(copy_z)
        ref = copy.deepcopy(model)
        xs, gs, hooks = capture(ref, [("lin", ref.lin, ref.act)])
        ref(x).pow(2).sum().backward()
        handle = sk.svi.attach(model, x if example else None, quiet=True)
        model(x).pow(2).sum().backward()
        assert handle.layers == layers and model.hooked == [(3, 4)]
        want = field(xs["lin"], gs["lin"])[0] if layers else ref.lin.weight.grad
        torch.testing.assert_close(model.lin.weight.grad, want)
        if layers:
            assert not torch.allclose(want, ref.lin.weight.grad)
        handle.remove()


def test_lower_layers_get_exact_backprop():
    """Only the layer's own weight gradient changes: gradients flowing down stay exact."""
    ref, model = mlp(), mlp()
    x = torch.randn(9, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x).pow(2).sum().backward()
    sk.svi.attach(model, x)
    model(x2).pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)


def test_remove_restores_model():
    model = mlp()
    before = [type(m) for m in model]
    handle = sk.svi.attach(model, torch.randn(2, 5))
    assert isinstance(model[1], nn.Identity)
    handle.remove()
    assert [type(m) for m in model] == before and "forward" not in vars(model[0])
    ref = mlp()
    x = torch.randn(3, 5)
    model(x).sum().backward()
    ref(x).sum().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_warns_when_nothing_to_change():
    with pytest.warns(UserWarning, match="no \\(Linear, activation\\)"):
        handle = sk.svi.attach(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), torch.randn(2, 3))
    assert handle.layers == []


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _matmul_model(name):
    if name == "mlp":
        x = torch.randn(8, 5)
        return mlp(), (lambda m: m(x).pow(2).sum())
    model, inputs, loss = hf_model(name, dtype=torch.float32)
    return model, (lambda m: loss(m, inputs))


@pytest.mark.parametrize("name", ["mlp", "gpt2", "roberta", "llama"])
def test_no_extra_matmul(name):
    """Same mm/addmm/bmm count as plain backprop: on the watched first step and on a later step."""
    ref, step = _matmul_model(name)
    model = copy.deepcopy(ref)
    handle = sk.svi.attach(model)
    for _ in range(2):
        counts = []
        for m in (ref, model):
            with CountMatmuls() as c:
                step(m).backward()
            counts.append(c.n)
        assert counts[0] == counts[1] > 0
    assert handle.layers


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_bert_intermediate_and_pooler_get_the_field():
    ref = tiny_bert()
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 60, (3, 7))
    labels = torch.tensor([0, 1, 1])
    pairs = [(f"bert.encoder.layer.{i}.intermediate.dense", ref.bert.encoder.layer[i].intermediate.dense,
              ref.bert.encoder.layer[i].intermediate) for i in range(2)]
    pairs.append(("bert.pooler.dense", ref.bert.pooler.dense, ref.bert.pooler))
    xs, gs, hooks = capture(ref, pairs)
    ref(input_ids=ids, labels=labels).loss.backward()
    handle = sk.svi.attach(model, example_kwargs={"input_ids": ids})
    assert sorted(handle.layers) == sorted(n for n, _, _ in pairs)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    params = dict(model.named_parameters())
    changed = set()
    for name, _, _ in pairs:
        dw, db = field(xs[name], gs[name])
        torch.testing.assert_close(params[name + ".weight"].grad, dw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(params[name + ".bias"].grad, db, rtol=1e-4, atol=1e-6)
        changed |= {name + ".weight", name + ".bias"}
    for name, p in ref.named_parameters():
        if name not in changed:  # everything else keeps its ordinary gradient
            torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["dict", "BatchEncoding", "UserDict"])
def test_attach_with_a_mapping_batch_passes_keyword_arguments(kind):
    """A tokenizer's output (a Mapping) given as the example batch is keyword arguments: the same layers as
    example_kwargs= finds, and the same gradients after."""
    from collections import UserDict
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = {"dict": dict, "BatchEncoding": transformers.BatchEncoding, "UserDict": UserDict}[kind](batch)
    ref, model = tiny_bert(), tiny_bert()
    expected = sk.svi.attach(ref, example_kwargs=dict(batch))
    handle = sk.svi.attach(model, batch)
    assert handle.layers and sorted(handle.layers) == sorted(expected.layers)
    labels = torch.tensor([0, 1, 1])
    for m in (ref, model):
        m(**batch, labels=labels).loss.backward()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("bad", ["input_ids", 3, {1, 2}, (x for x in ())])
def test_attach_refuses_an_example_that_is_no_argument_tuple(bad):
    with pytest.raises(TypeError, match="example_kwargs"):
        sk.svi.attach(mlp(), bad)


def test_attach_refuses_a_keyword_given_twice():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids"):
        sk.svi.attach(mlp(), {"input_ids": ids}, example_kwargs={"input_ids": ids})


def test_svi_optimizer_trains_with_attach():
    model = tiny_bert().train()
    sk.svi.attach(model)
    opt = sk.SVI(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 60, (8, 5))
    labels = torch.randint(0, 2, (8,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def _train(model, x, y, steps, compiled=False):
    fwd = torch.compile(model, backend="aot_eager", fullgraph=compiled == "fullgraph") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # a plain optimizer: only the field is under test
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((fwd(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("name,compiled", [("module-acts", "fullgraph"), ("function-acts", "graph-breaks")])
def test_trains_under_torch_compile_like_eager(name, compiled):
    """attach with example inputs, then torch.compile: same losses and weights as eager over 3 SGD steps.
    Module activations (fused / tapped in the Linear's forward) compile into one graph; activation
    functions tap through a TorchFunctionMode around the calling module."""
    eager, inputs, _ = custom_model(name, dtype=torch.float32)
    comp = copy.deepcopy(eager)
    x = inputs["x"]
    y = torch.randn(x.shape[:-1] + (3,), generator=torch.Generator().manual_seed(5))
    handles = [sk.svi.attach(m, x) for m in (eager, comp)]
    assert handles[0].layers == handles[1].layers == list(CUSTOM[name][1])
    torch.testing.assert_close(_train(comp, x, y, 3, compiled), _train(eager, x, y, 3), rtol=1e-5, atol=1e-6)
    for a, b in zip(comp.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_forward_traced_by_dynamo_raises(monkeypatch):
    """The watched forward needs eager hooks; if Dynamo traced it, attach says to pass example_inputs.
    (Dynamo currently runs the hook eagerly, so this fakes the traced case.)"""
    model = mlp()
    sk.svi.attach(model)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="example_inputs"):
        model(torch.randn(2, 5))


def test_attach_twice_before_first_forward_raises():
    model = mlp()
    sk.svi.attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        sk.svi.attach(model)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bf16_autocast(name):
    """Under CPU bf16 autocast the field is Gᵀ X of the bf16 tensors autocast computes with, and every
    other gradient equals plain autocast backprop."""
    from test_svi_models import EXPECTED, check_grads, reference
    ref, inputs, loss_fn = hf_model(name, dtype=torch.float32)
    model = copy.deepcopy(ref)

    def amp_loss(m, inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(m, inp)
    states = reference(ref, inputs, amp_loss, EXPECTED[name])
    handle = sk.svi.attach(model)
    amp_loss(model, inputs).backward()
    assert sorted(handle.layers) == sorted(EXPECTED[name])
    check_grads(model, ref, states, EXPECTED[name], rtol=1e-6, atol=1e-8)


def test_fused_pairs_use_the_activation_backward_kernel(monkeypatch):
    """Activation modules fused into their Linear take dZ from svi_backward (PyTorch ops on the CPU)."""
    from svi_kernels.triton import svi_backward as tsb
    calls, orig = [], tsb.act_backward_torch
    monkeypatch.setattr(tsb, "act_backward_torch", lambda z, g, kind: calls.append(kind) or orig(z, g, kind))
    model, x = mlp(), torch.randn(4, 5, requires_grad=True)  # dZ of the first layer only feeds dX
    sk.svi.attach(model, x)
    model(x).sum().backward()
    assert calls == ["tanh", "gelu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_act_backward_on_cuda(monkeypatch):
    """On CUDA the fused pairs' dZ comes from the Triton kernel; the gradients match the CPU run."""
    pytest.importorskip("triton")
    from svi_kernels.triton import svi_backward_kernel as kernel
    calls, orig = [], kernel.act_backward_triton
    monkeypatch.setattr(kernel, "act_backward_triton", lambda z, g, kind: calls.append(kind) or orig(z, g, kind))
    cpu, x = mlp(), torch.randn(16, 5)
    gpu = copy.deepcopy(cpu).cuda()
    for m, inp in ((cpu, x.requires_grad_()), (gpu, x.detach().cuda().requires_grad_())):
        sk.svi.attach(m, inp)
        m(inp).pow(2).sum().backward()
    assert calls == ["tanh", "gelu"]
    for a, b in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5)
