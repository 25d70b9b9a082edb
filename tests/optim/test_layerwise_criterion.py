"""LayerwiseAdamSLS ``criterion``: the authors' code ("code") vs the paper's per-group Armijo condition ("paper").

The paper tests group k at f(w0 + eta * dbar_k) with dbar_k non-zero in group k only, so during group k's
trials every other group must sit at its start-of-step value w0, bit for bit.
"""
import copy

import pytest
import torch

import svi_kernels as sk
from helpers import LS_BACKENDS
from ls_fixtures import coupled_problem  # a least-squares loss that couples the groups

EPS = 1e-8


class Recorder:
    """A closure that also keeps a copy of the params at each forward without grad (the trials)."""

    def __init__(self, ps, f):
        self.ps, self.f, self.trials = ps, f, []

    def __call__(self):
        if not torch.is_grad_enabled():
            self.trials.append([p.detach().clone() for p in self.ps])
        return self.f(self.ps)


def adam_terms(opt, p, t):
    st = opt.state[p]
    denom = (st["exp_avg_sq"] / (1 - 0.999 ** t)).sqrt() + EPS
    return st["exp_avg"] / (1 - 0.9 ** t), denom


@pytest.mark.parametrize("backend", LS_BACKENDS)
def test_paper_cycle_trials_leave_other_groups_at_w0_and_satisfy_armijo(backend):
    ps, f = coupled_problem()
    opt = sk.LayerwiseAdamSLS([{"params": [p]} for p in ps], warmup_steps=1, init_step_size=2.0,
                              criterion="paper", backend=backend)
    c = opt.param_groups[0]["c"]
    searched_with_backtracks = 0
    for step in range(1, 8):
        k = opt.ls_state.get("next_group", 0)
        w0 = [p.detach().clone() for p in ps]
        rec = Recorder(ps, f)
        opt.zero_grad()
        opt.step(rec)
        if step <= 1:
            continue  # warm-up: the global search is unchanged
        f0 = f(w0).item()
        eta = opt.ls_state["step_sizes"][k]
        assert rec.trials, "a searched step runs at least one trial forward"
        for trial in rec.trials:
            for i in range(3):
                if i != k:
                    assert torch.equal(trial[i], w0[i]), f"group {i} moved during group {k}'s trial"
            assert not torch.equal(trial[k], w0[k])
        # the accepted point is the paper's trial point: w0 with only group k moved along g / (sqrt(v_hat) + eps)
        _, denom = adam_terms(opt, ps[k], step)
        g = ps[k].grad
        point = [w.clone() for w in w0]
        point[k] = w0[k] - eta * g / denom
        torch.testing.assert_close(rec.trials[-1][k], point[k], rtol=1e-13, atol=1e-15)
        s_k = (g * g / denom).sum().item()
        assert opt.ls_state["found"][k]
        assert f(point).item() <= f0 - c * eta * s_k + 1e-12
        searched_with_backtracks += opt.ls_state["n_backtracks"][k] > 0
        # then every group moves: the searched one with its accepted eta, the others with their stored ones
        for i, p in enumerate(ps):
            m_hat, denom_i = adam_terms(opt, p, step)
            want = w0[i] - opt.ls_state["step_sizes"][i] * m_hat / denom_i
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    assert searched_with_backtracks > 0  # the Armijo check above was not vacuous


@pytest.mark.parametrize("backend", LS_BACKENDS)
def test_paper_all_searches_each_group_from_w0(backend):
    ps, f = coupled_problem(seed=1)
    opt = sk.LayerwiseAdamSLS([{"params": [p]} for p in ps], warmup_steps=0, init_step_size=2.0,
                              strategy="all", criterion="paper", backend=backend)
    for step in range(1, 4):
        w0 = [p.detach().clone() for p in ps]
        rec = Recorder(ps, f)
        opt.zero_grad()
        opt.step(rec)
        counts = [1 + b for b in opt.ls_state["n_backtracks"]]
        assert len(rec.trials) == sum(counts)
        start = 0
        for k, count in enumerate(counts):
            for trial in rec.trials[start:start + count]:
                # groups searched before k went back to w0 by an in-place move: within a few roundings
                # (docs/kernels.md, "In-place trials"; bit for bit with keep_start_point=True)
                moved = [i for i in range(3) if not torch.allclose(trial[i], w0[i], rtol=1e-13, atol=1e-15)]
                assert moved == [k]
            start += count
        for i, p in enumerate(ps):
            m_hat, denom = adam_terms(opt, p, step)
            want = w0[i] - opt.ls_state["step_sizes"][i] * m_hat / denom
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


def _overshoot_case(criterion, backend):
    """Groups 0 and 1 sit near their minimum with a huge stored step size; group 2 (searched now, as in
    the cycle's third step) is far from its minimum with a sensible one. Moving groups 0 and 1
    unchecked raises the loss far more than any step of group 2 can lower it."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(0.01 * torch.randn(4, dtype=torch.float64)),
          torch.nn.Parameter(0.01 * torch.randn(4, dtype=torch.float64)),
          torch.nn.Parameter(1.0 + torch.rand(4, dtype=torch.float64))]
    groups = [{"params": [ps[0]], "init_step_size": 1.0}, {"params": [ps[1]], "init_step_size": 1.0},
              {"params": [ps[2]], "init_step_size": 0.1}]
    opt = sk.LayerwiseAdamSLS(groups, warmup_steps=0, max_backtracks=30, criterion=criterion, backend=backend)
    opt.ls_state["next_group"] = 2

    def closure():
        return 100.0 * ((ps[0] ** 2).sum() + (ps[1] ** 2).sum()) + (ps[2] ** 2).sum()

    opt.zero_grad()
    opt.step(closure)
    return opt.ls_state


@pytest.mark.parametrize("backend", LS_BACKENDS)
def test_code_collapses_where_paper_does_not(backend):
    code = _overshoot_case("code", backend)
    paper = _overshoot_case("paper", backend)
    grown = 0.1 * 2 ** (1 / 500)
    # code: every trial of group 2 sees groups 0 and 1 already moved, so all fail
    assert code["found"][2] is False and code["n_backtracks"][2] == 30
    assert code["step_sizes"][2] == pytest.approx(grown * 0.9 ** 30, rel=1e-12)
    # paper: group 2 alone from w0 is a plain descent step, accepted at once
    assert paper["found"][2] is True and paper["n_backtracks"][2] == 0
    assert paper["step_sizes"][2] == pytest.approx(grown, rel=1e-12)
    # the unsearched groups move with their stored step size either way
    assert code["step_sizes"][:2] == paper["step_sizes"][:2]


@pytest.mark.parametrize("backend", LS_BACKENDS)
@pytest.mark.parametrize("strategy", ["cycle", "all"])
def test_paper_state_dict_round_trip_is_bit_identical(backend, strategy):
    def make(ps, **kw):
        return sk.LayerwiseAdamSLS([{"params": [p]} for p in ps], warmup_steps=1, init_step_size=2.0,
                                   strategy=strategy, backend=backend, **kw)

    def run(ps, f, opt, n):
        for _ in range(n):
            opt.zero_grad()
            opt.step(lambda: f(ps))

    ps, f = coupled_problem(seed=2)
    opt = make(ps, criterion="paper")
    run(ps, f, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    saved_ps = [p.detach().clone() for p in ps]
    assert saved["layerwise"]["criterion"] == "paper"
    run(ps, f, opt, 4)

    ps2, f2 = coupled_problem(seed=2)
    with torch.no_grad():
        for p, w in zip(ps2, saved_ps):
            p.copy_(w)
    opt2 = make(ps2)  # built with the default "code": the checkpoint's criterion wins
    opt2.load_state_dict(saved)
    assert opt2.criterion == "paper"
    run(ps2, f2, opt2, 4)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    assert opt.ls_state == opt2.ls_state


def test_checkpoint_without_criterion_loads_as_code():
    ps, f = coupled_problem()
    opt = sk.LayerwiseAdamSLS([{"params": [p]} for p in ps], warmup_steps=1, criterion="paper")
    opt.zero_grad()
    opt.step(lambda: f(ps))
    sd = opt.state_dict()
    del sd["layerwise"]["criterion"]  # as written before the option existed
    opt.load_state_dict(sd)
    assert opt.criterion == "code"


def test_code_is_the_default_and_identical_when_explicit():
    results = []
    for kw in ({}, {"criterion": "code"}):
        ps, f = coupled_problem(seed=3)
        opt = sk.LayerwiseAdamSLS([{"params": [p]} for p in ps], warmup_steps=1, init_step_size=2.0, **kw)
        assert opt.criterion == "code"
        for _ in range(5):
            opt.zero_grad()
            opt.step(lambda: f(ps))
        results.append(([p.detach().clone() for p in ps], copy.deepcopy(opt.ls_state)))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert results[0][1] == results[1][1]


def test_invalid_criterion():
    ps, _ = coupled_problem()
    with pytest.raises(ValueError, match="criterion 'Paper'.*'code'.*'paper'"):
        sk.LayerwiseAdamSLS(ps, criterion="Paper")
    opt = sk.LayerwiseAdamSLS(ps)
    sd = opt.state_dict()
    sd["layerwise"]["criterion"] = "both"
    with pytest.raises(ValueError, match="criterion 'both'"):
        opt.load_state_dict(sd)
    assert opt.criterion == "code"
