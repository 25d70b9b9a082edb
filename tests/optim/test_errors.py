"""Bad input gets a clear error naming the problem, and leaves parameters and state untouched."""
import copy

import pytest
import torch

import svi_kernels as sk
from helpers import tiny_mlp

ALL = {
    "AdamW": lambda ps, **kw: sk.AdamW(ps, **kw),
    "SVI": lambda ps, **kw: sk.SVI(ps, **kw),
    "ArmijoSGD": lambda ps, **kw: sk.ArmijoSGD(ps, **kw),
    "AdamSLS": lambda ps, **kw: sk.AdamSLS(ps, **kw),
    "LayerwiseAdamSLS": lambda ps, **kw: sk.LayerwiseAdamSLS(ps, **kw),
}
LS = ["ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS"]


def snapshot(model, opt):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(opt.state_dict())


def assert_untouched(model, opt, snap):
    params, sd = snap
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert set(now["state"]) == set(sd["state"])
    for k, st in sd["state"].items():
        for key, v in (st.items() if isinstance(st, dict) else []):
            w = now["state"][k][key]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v


def step_once(name, model, opt, loss_fn):
    opt.zero_grad()
    if name in LS:
        return opt.step(loss_fn)
    loss_fn().backward()
    return opt.step()


@pytest.mark.parametrize("name", [n for n in ALL if n != "SVI"])  # SVI's SGD base takes them, as torch's SGD
def test_sparse_gradients(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ALL[name](emb.parameters())
    idx = torch.tensor([1, 2, 3])
    snap = snapshot(emb, opt)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        step_once(name, emb, opt, lambda: emb(idx).sum())
    assert_untouched(emb, opt, snap)


@pytest.mark.parametrize("name", LS)  # AdamW and SVI optimise them as torch does (test_torch_optim_info.py)
def test_complex_params(name):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = ALL[name]([p])
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step(lambda: (p.abs() ** 2).sum()) if name in LS else opt.step()


@pytest.mark.parametrize("name", LS)
def test_missing_closure(name):
    opt = ALL[name](tiny_mlp().parameters())
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize("name", LS)
def test_closure_that_calls_backward_returns_a_non_scalar(name):
    """A closure that calls backward itself is torch's convention (accepted: tests/optim/test_closure_forms.py);
    its loss is checked as any other's."""
    model = tiny_mlp()
    opt = ALL[name](model.parameters())
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2)
        loss.mean().backward()
        return loss

    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(closure)
    assert_untouched(model, opt, snap)


@pytest.mark.parametrize("name", LS)
def test_non_scalar_loss(name):
    model = tiny_mlp()
    opt = ALL[name](model.parameters())
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: model(x).pow(2))
    with pytest.raises(TypeError, match="as a tensor"):
        opt.step(lambda: 1.0)


@pytest.mark.parametrize("name", LS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_at_start(name, bad):
    model = tiny_mlp()
    opt = ALL[name](model.parameters())
    x = torch.randn(4, 6)
    step_once(name, model, opt, lambda: model(x).pow(2).mean())  # some state exists
    snap = snapshot(model, opt)
    with pytest.raises(sk.NonFiniteLossError, match="left unchanged"):
        opt.step(lambda: model(x).pow(2).mean() * bad)
    assert_untouched(model, opt, snap)


@pytest.mark.parametrize("name", LS)
def test_non_finite_gradient(name):
    model = tiny_mlp()
    opt = ALL[name](model.parameters())
    x = torch.randn(4, 6)
    step_once(name, model, opt, lambda: model(x).pow(2).mean())
    snap = snapshot(model, opt)
    # finite loss, NaN gradient: sqrt'(0) = inf, times 0 gives NaN
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step(lambda: model(x).pow(2).mean() + (model[0].weight * 0).sqrt().sum() * 0)
    assert_untouched(model, opt, snap)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), "beta"), (dict(betas=(0.9, -0.1)), "beta"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="gpu"), "backend"),
])
def test_invalid_adamw_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.AdamW(tiny_mlp().parameters(), **kwargs)


@pytest.mark.parametrize("name", ["ArmijoSGD", "AdamSLS"])
@pytest.mark.parametrize("kwargs,match", [
    (dict(c=0.0), "c"), (dict(c=1.0), "c"), (dict(beta_b=1.5), "beta_b"), (dict(init_step_size=0.0), "init_step"),
    (dict(n_batches_per_epoch=0), "n_batches"), (dict(max_backtracks=0), "max_backtracks"),
    (dict(reset_option=5), "reset_option"), (dict(gamma=-1.0), "gamma"),
])
def test_invalid_line_search_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALL[name](tiny_mlp().parameters(), **kwargs)


def test_layerwise_invalid_strategy():
    with pytest.raises(ValueError, match="strategy"):
        sk.LayerwiseAdamSLS(tiny_mlp().parameters(), strategy="impact_mag")


def test_cuda_backend_on_cpu_tensors():
    model = tiny_mlp()
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors, but the parameters are on cpu"):
        sk.AdamW(model.parameters(), backend="cuda")  # refused at construction (tests/test_install_device_check.py)
    opt = sk.AdamW(model.parameters())
    opt.param_groups[0]["backend"] = "cuda"  # changed after construction: refused at step(), nothing modified
    model(torch.randn(2, 6)).sum().backward()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="cuda"):
        opt.step()
    for a, b in zip(model.parameters(), snap[0]):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("name", list(ALL))
def test_state_dict_of_another_optimizer(name):
    model = tiny_mlp()
    other = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if name != "SVI" else \
        torch.optim.Adagrad(model.parameters())
    model(torch.randn(2, 6)).sum().backward()
    other.step()
    opt = ALL[name](model.parameters())
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict({"state": {}})
