"""AdamW against torch.optim.AdamW, and the original BERT Adam without bias correction."""
import copy
import math

import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS, batch, tiny_mlp


def _train(model, opt, steps=5, seed=1):
    x, y = batch(seed)
    for i in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x + 0.1 * i), y)
        loss.backward()
        opt.step()


def _groups(model):
    ps = list(model.parameters())
    return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.1}]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torch_adamw(backend):
    m1 = tiny_mlp()
    m1.extra = torch.nn.Parameter(torch.zeros(0))       # zero-size param
    m1.unused = torch.nn.Parameter(torch.randn(4))      # never gets a grad
    m2 = copy.deepcopy(m1)
    ours = sk.AdamW(_groups(m1), lr=1e-2, weight_decay=0.02, backend=backend)
    ref = torch.optim.AdamW(_groups(m2), lr=1e-2, weight_decay=0.02)
    _train(m1, ours)
    _train(m2, ref)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        s1, s2 = ours.state.get(p1, {}), ref.state.get(p2, {})
        assert set(s1) == set(s2)
        for k in s1:
            torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-7)


def test_bert_adam_without_bias_correction():
    """correct_bias=False: p -= lr * m / (sqrt(v) + eps) after decoupled decay, no bias correction."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(11, dtype=torch.float64))
    opt = sk.AdamW([p], lr=0.05, weight_decay=0.01, eps=1e-6, correct_bias=False, backend="reference")
    w, m, v = p.detach().clone(), torch.zeros(11, dtype=torch.float64), torch.zeros(11, dtype=torch.float64)
    for i in range(4):
        g = torch.randn(11, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        w = w * (1 - 0.05 * 0.01)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 0.05 * m / (v.sqrt() + 1e-6)
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS[1:])
def test_low_precision_params_match_reference_backend(backend):
    """bf16/fp16 params and state: the kernels' fp32 math tracks the reference path in the same dtype."""
    for dtype, tol in ((torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)):
        torch.manual_seed(0)
        w = torch.randn(1001)
        p = torch.nn.Parameter(w.to(dtype))
        q = torch.nn.Parameter(w.to(dtype))
        o = sk.AdamW([p], lr=1e-2, backend=backend)
        o_ref = sk.AdamW([q], lr=1e-2, backend="reference")
        for _ in range(3):
            g = torch.randn(1001).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
            o.step()
            o_ref.step()
        torch.testing.assert_close(p.detach().double(), q.detach().double(), rtol=tol, atol=tol)
        assert p.dtype == dtype and o.state[p]["exp_avg"].dtype == dtype


def test_tensor_lr_and_scheduler():
    m1, m2 = tiny_mlp(), tiny_mlp()
    ours = sk.AdamW(m1.parameters(), lr=torch.tensor(1e-2))
    ref = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for i in range(5):
        _train(m1, ours, steps=1, seed=i)
        _train(m2, ref, steps=1, seed=i)
        s1.step()
        s2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_adamw_checkpoint_round_trip():
    """A torch AdamW state_dict loads into ours and ours into torch's; both then continue identically."""
    m_t, m_o = tiny_mlp(), tiny_mlp()
    t_opt = torch.optim.AdamW(m_t.parameters(), lr=1e-2)
    _train(m_t, t_opt, steps=3)
    m_o.load_state_dict(m_t.state_dict())
    o_opt = sk.AdamW(m_o.parameters(), lr=1e-2)
    o_opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))  # torch shares state tensors otherwise
    _train(m_t, t_opt, steps=2, seed=5)
    _train(m_o, o_opt, steps=2, seed=5)
    for a, b in zip(m_o.parameters(), m_t.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    back = torch.optim.AdamW(tiny_mlp().parameters(), lr=1e-2)
    back.load_state_dict(o_opt.state_dict())
    assert set(back.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
