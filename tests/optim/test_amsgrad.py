"""AMSGrad: sk.AdamW(amsgrad=True) against torch.optim.AdamW(amsgrad=True), sk.SVI(base="adam",
amsgrad=True) against torch.optim.Adam(amsgrad=True), and checkpoints in torch's layout."""
import copy

import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS, batch, tiny_mlp


def _train(model, opt, steps=6, seed=1, scaler=None):
    x, y = batch(seed)
    for i in range(steps):
        opt.zero_grad()
        # Shrinking inputs make later gradients smaller, so max_exp_avg_sq stays above exp_avg_sq.
        loss = torch.nn.functional.cross_entropy(model((x + 0.1 * i) * 0.5 ** i), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def _groups(model):
    ps = list(model.parameters())
    return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.1}]


def _assert_same(m1, m2, o1, o2):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        s1, s2 = o1.state.get(p1, {}), o2.state.get(p2, {})
        assert set(s1) == set(s2)
        for k in s1:
            torch.testing.assert_close(s1[k].cpu(), s2[k].cpu(), rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adamw_matches_torch(backend):
    m1 = tiny_mlp()
    m1.extra = torch.nn.Parameter(torch.zeros(0))  # zero-size param
    m2 = copy.deepcopy(m1)
    ours = sk.AdamW(_groups(m1), lr=1e-2, weight_decay=0.02, amsgrad=True, backend=backend)
    ref = torch.optim.AdamW(_groups(m2), lr=1e-2, weight_decay=0.02, amsgrad=True)
    _train(m1, ours)
    _train(m2, ref)
    _assert_same(m1, m2, ours, ref)
    # AMSGrad did something: somewhere the running max is above the current second moment.
    assert any((s["max_exp_avg_sq"] > s["exp_avg_sq"]).any() for s in ours.state.values() if s)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adamw_capturable_matches_torch(backend):
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    ours = sk.AdamW(m1.parameters(), lr=1e-2, amsgrad=True, capturable=True, backend=backend)
    ref = torch.optim.AdamW(m2.parameters(), lr=1e-2, amsgrad=True)
    _train(m1, ours)
    _train(m2, ref)
    _assert_same(m1, m2, ours, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_svi_adam_matches_torch_adam(backend):
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    ours = sk.SVI(m1.parameters(), lr=1e-2, base="adam", weight_decay=0.01, amsgrad=True, backend=backend)
    ref = torch.optim.Adam(m2.parameters(), lr=1e-2, weight_decay=0.01, amsgrad=True)
    _train(m1, ours)
    _train(m2, ref)
    _assert_same(m1, m2, ours, ref)


def test_svi_amsgrad_needs_adam_base():
    with pytest.raises(ValueError, match="amsgrad"):
        sk.SVI(tiny_mlp().parameters(), base="sgd", amsgrad=True)


def test_torch_checkpoint_round_trip():
    """torch AdamW(amsgrad=True) state loads into ours and back; both then continue identically."""
    m_t, m_o = tiny_mlp(), tiny_mlp()
    t_opt = torch.optim.AdamW(m_t.parameters(), lr=1e-2, amsgrad=True)
    _train(m_t, t_opt, steps=3)
    m_o.load_state_dict(m_t.state_dict())
    o_opt = sk.AdamW(m_o.parameters(), lr=1e-2)  # amsgrad comes from the checkpoint's groups
    o_opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))
    assert o_opt.param_groups[0]["amsgrad"]
    _train(m_t, t_opt, steps=2, seed=5)
    _train(m_o, o_opt, steps=2, seed=5)
    for a, b in zip(m_o.parameters(), m_t.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    back = torch.optim.AdamW(tiny_mlp().parameters(), lr=1e-2, amsgrad=True)
    back.load_state_dict(o_opt.state_dict())
    assert set(back.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def test_amsgrad_switched_on_later_creates_state():
    m = tiny_mlp()
    opt = sk.AdamW(m.parameters(), lr=1e-2, backend="reference")
    _train(m, opt, steps=2)
    opt.param_groups[0]["amsgrad"] = True
    _train(m, opt, steps=1)
    assert all("max_exp_avg_sq" in s for s in opt.state.values())
