"""LayerwiseAdamSLS "cycle": the save phase writes the Adam search direction d only for the group the step
searches (the only one whose trials read it), in launches of its own. Everything else it computes (moments,
w0, each group's preconditioned norm, summed in the same order) has the bits of the save that writes d for
every group, and so has every step."""
import math

import pytest
import torch

import svi_kernels as sk
from svi_kernels.optim._line_search import LineSearchOptimizer, StepTensors
from helpers import LS_BACKENDS, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

SEARCHED = 1  # the group the second step searches (one step of the cycle done)


def _optimizer(backend, criterion="code", seed=0, decades=1.0, init_step_size=1.0):
    """Group 0 all bf16 (so bf16 is the first bucket), group 1 fp32 then bf16 (its norm is summed over two
    buckets: their order matters for its bits), group 2 fp32; each tensor's loss weighted by 10^(+-decades)
    (spread out, per-tensor norms that a different summation order rounds differently)."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [[torch.bfloat16] * 3, [torch.float32] * 6 + [torch.bfloat16] * 6, [torch.float32] * 4]
    groups = [[torch.nn.Parameter(torch.randn(5 + i, generator=gen).to(dt)) for i, dt in enumerate(g)] for g in dtypes]
    ps = [p for g in groups for p in g]
    targets = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps]
    weights = (10.0 ** (decades * (2 * torch.rand(len(ps), generator=gen) - 1))).tolist()

    def closure():
        return sum(((p.float() - t.float()) ** 2 * w).sum() for p, t, w in zip(ps, targets, weights))
    opt = sk.LayerwiseAdamSLS([{"params": g} for g in groups], warmup_steps=0, criterion=criterion,
                              init_step_size=init_step_size, n_batches_per_epoch=3, backend=backend)
    return opt, ps, closure


def _grads(ps, closure):
    for p in ps:
        p.grad = None
    with torch.enable_grad():
        closure().backward()


def _load(sums):
    sums.load([v for x in sums.tensors() for v in x.tolist()])
    return sums


@pytest.mark.parametrize("backend", LS_BACKENDS)
def test_cycle_save_writes_d_for_the_searched_group_only_with_the_same_bits(backend):
    runs = []
    for every_group in (False, True):
        opt, ps, closure = _optimizer(backend, decades=8.0)
        _grads(ps, closure)
        opt.step(closure)  # searches group 0; the next step searches group 1
        assert opt._searched_groups() == [SEARCHED]
        _grads(ps, closure)
        for buf in opt._dirs.values():
            buf.fill_(math.nan)
        t = StepTensors(opt, True)
        step = opt.ls_state["step"] + 1
        save = LineSearchOptimizer._save_adam if every_group else type(opt)._save_adam
        runs.append((opt, ps, t, _load(save(opt, t, step))))
    (opt, ps, t, sums), (opt_all, ps_all, t_all, sums_all) = runs
    assert len(sums.parts) > len(sums_all.parts)  # d written in launches of its own
    assert sums.per_group == sums_all.per_group  # Python floats: the same bits
    # Summed in another order (its tensors' positions: fp32 before bf16), group 1's norm has other bits.
    values = dict(zip((i for pos, _ in sums_all.parts for i in pos), sums_all.values))
    in_position_order = sum((values[i] for i, g in enumerate(t.gid) if g == SEARCHED), 0.0)
    assert in_position_order != sums_all.per_group[SEARCHED]
    for i in range(len(t.params)):
        assert torch.equal(t.w0[i], t_all.w0[i])
        assert torch.equal(t.exp_avgs[i], t_all.exp_avgs[i]) and torch.equal(t.exp_avg_sqs[i], t_all.exp_avg_sqs[i])
        if t.dirs[i] is None:
            continue
        assert not torch.isnan(t_all.dirs[i]).any()
        if t.gid[i] == SEARCHED:
            assert torch.equal(t.dirs[i], t_all.dirs[i])
        else:
            assert torch.isnan(t.dirs[i]).all(), f"d of tensor {i} (group {t.gid[i]}, not searched) was written"


@pytest.mark.parametrize("criterion", ["code", "paper"])
@pytest.mark.parametrize("backend", LS_BACKENDS)
def test_cycle_steps_have_the_bits_of_steps_that_save_every_direction(backend, criterion, monkeypatch):
    results = []
    for every_group in (False, True):
        if every_group:
            monkeypatch.setattr(sk.LayerwiseAdamSLS, "_save_adam", LineSearchOptimizer._save_adam)
        opt, ps, closure = _optimizer(backend, criterion, seed=1, init_step_size=10.0)
        counters = []
        for _ in range(7):
            _grads(ps, closure)
            opt.step(closure)
            counters.append((list(opt.ls_state["step_sizes"]), opt.ls_state["total_backtracks"]))
        results.append((ps, opt, counters))
    (ps, opt, counters), (ps_all, opt_all, counters_all) = results
    assert counters == counters_all
    assert counters[-1][1] > 0  # the searches backtracked
    for p, q in zip(ps, ps_all):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt_all.state[q][key])
