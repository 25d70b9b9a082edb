"""AdamSLS against Kenneweg et al.'s ADAMSLS, and LayerwiseAdamSLS (PLASLS) behaviour."""
import math

import pytest
import torch

import svi_kernels as sk
from helpers import LS_BACKENDS
from oracles import AdamSlsOracle, quadratic
from test_armijo_sgd import closure_for, problem


@pytest.mark.parametrize("backend", LS_BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(init_step_size=2.0, c=0.3, beta_b=0.7, n_batches_per_epoch=5),
                                dict(betas=(0.5, 0.9), eps=1e-6, init_step_size=0.5)])
def test_matches_adamsls_step_for_step(backend, kw):
    A, b, w = problem(seed=3)
    param = torch.nn.Parameter(w.clone())
    opt = sk.AdamSLS([param], backend=backend, **kw)
    oracle = AdamSlsOracle(**kw)
    f, grad = quadratic(A, b)
    w_ref = w.clone()
    for _ in range(10):
        opt.zero_grad()
        opt.step(closure_for(param, A, b))
        w_ref, _ = oracle.step(w_ref, f, grad)
        torch.testing.assert_close(param.detach(), w_ref, rtol=1e-9, atol=1e-12)
        assert opt.ls_state["step_sizes"][0] == pytest.approx(oracle.step_size, rel=1e-12)
        assert opt.ls_state["n_backtracks"][0] == oracle.last_backtracks
        torch.testing.assert_close(opt.state[param]["exp_avg"], oracle.m, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[param]["exp_avg_sq"], oracle.v, rtol=1e-12, atol=1e-15)
    assert opt.n_forwards == oracle.n_forwards


def test_never_satisfied_ends_within_max_backtracks():
    """A loss that never decreases: the search stops after max_backtracks and records found=False."""
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    calls = []

    def closure():
        calls.append(1)
        return (param ** 2).sum() if torch.is_grad_enabled() else (param ** 2).sum() * 0 + 1e9

    opt = sk.AdamSLS([param], max_backtracks=5, backend="reference")
    opt.zero_grad()
    opt.step(closure)
    st = opt.ls_state
    assert st["found"] == [False] and st["n_backtracks"] == [5] and len(calls) == 6
    assert st["step_sizes"][0] == pytest.approx(0.1 * 2 ** (1 / 500) * 0.9 ** 5)


def _groups(seed=0):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in (5, 3, 4)]
    return ps, [{"params": [p]} for p in ps]


def _loss(ps, scales=(1.0, 30.0, 0.2)):
    return sum(s * (p ** 2).sum() for s, p in zip(scales, ps))


def test_layerwise_warmup_then_cycle():
    ps, groups = _groups()
    opt = sk.LayerwiseAdamSLS(groups, warmup_steps=2, init_step_size=1.0, backend="reference")
    sizes = []
    for _ in range(6):
        opt.zero_grad()
        before = opt.n_forwards
        opt.step(lambda: _loss(ps))
        sizes.append(list(opt.ls_state["step_sizes"]))
        # one search per step: 1 forward+backward, then 1 + backtracks forwards
        assert opt.n_forwards - before == 2 + sum(opt.ls_state["n_backtracks"])
    assert len(set(sizes[0])) == 1 and len(set(sizes[1])) == 1  # warm-up: one common step size
    grow = 2 ** (1 / 500)
    for step, k in zip(range(2, 6), [0, 1, 2, 0]):  # cycle: group k searched, the others only grow
        for i in range(3):
            if i != k:
                assert sizes[step][i] == pytest.approx(sizes[step - 1][i] * grow, rel=1e-12)
    assert opt.ls_state["next_group"] == 1


def test_layerwise_cycle_moves_every_group_with_its_own_step():
    """After warm-up, a cycle step moves each group by w0 - eta_i * m_hat / (sqrt(v_hat) + eps)."""
    ps, groups = _groups(1)
    opt = sk.LayerwiseAdamSLS(groups, warmup_steps=1, init_step_size=0.5, backend="reference")
    opt.zero_grad()
    opt.step(lambda: _loss(ps))
    w0 = [p.detach().clone() for p in ps]
    opt.zero_grad()
    opt.step(lambda: _loss(ps))
    for i, p in enumerate(ps):
        st = opt.state[p]
        m_hat = st["exp_avg"] / (1 - 0.9 ** 2)
        v_hat = st["exp_avg_sq"] / (1 - 0.999 ** 2)
        want = w0[i] - opt.ls_state["step_sizes"][i] * m_hat / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


def test_layerwise_merging():
    ps, groups = _groups(2)
    opt = sk.LayerwiseAdamSLS(groups, warmup_steps=0, init_step_size=1.0, merge_threshold=10.0,
                              backend="reference")
    opt.zero_grad()
    opt.step(lambda: _loss(ps))
    assert len(opt.param_groups) == 2 and len(opt.ls_state["step_sizes"]) == 2
    assert sum(len(g["params"]) for g in opt.param_groups) == 3
    opt.zero_grad()
    opt.step(lambda: _loss(ps))  # still works after the merge


def test_layer_groups_of_a_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
                                  intermediate_size=20, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    groups = sk.layer_groups(model, n_groups=10)
    names = [g["name"] for g in groups]
    assert names == ["bert.embeddings", "layers 0-1", "layers 2-2", "layers 3-4", "layers 5-5", "layers 6-7",
                     "layers 8-8", "layers 9-10", "layers 11-11", "head"]
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    head = {id(p) for p in groups[-1]["params"]}
    assert id(model.classifier.weight) in head and id(model.bert.pooler.dense.weight) in head
