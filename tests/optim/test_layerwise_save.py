"""LayerwiseAdamSLS "cycle" (after the warm-up, with several groups) searches one group a step, so its save
phase writes no Adam search direction d (4 B/param over every group) and the searched group's trials
recompute d from g and v. The steps keep the bits of steps that save d for every group; the warm-up,
"all" and a single group still save it."""
import math

import pytest
import torch

import svi_kernels as sk
from svi_kernels.optim._line_search import LineSearchOptimizer
from helpers import LS_BACKENDS, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _optimizer(backend, n_groups=3, **kwargs):
    """Groups of fp32 and bf16 tensors (one bucket each, several groups in each; bf16 has no d buffers)
    and a loss whose searches backtrack."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [[torch.bfloat16] * 2, [torch.float32] * 3 + [torch.bfloat16] * 2, [torch.float32] * 2][-n_groups:]
    groups = [[torch.nn.Parameter(torch.randn(5 + i, generator=gen).to(dt)) for i, dt in enumerate(g)] for g in dtypes]
    ps = [p for g in groups for p in g]
    targets = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps]
    weights = (10.0 ** (2 * torch.rand(len(ps), generator=gen) - 1)).tolist()

    def closure():
        return sum(((p.float() - t.float()) ** 2 * w).sum() for p, t, w in zip(ps, targets, weights))
    opt = sk.LayerwiseAdamSLS([{"params": g} for g in groups], init_step_size=10.0, n_batches_per_epoch=3,
                              backend=backend, **kwargs)
    return opt, ps, closure


def _step(opt, ps, closure):
    for p in ps:
        p.grad = None
    with torch.enable_grad():
        closure().backward()
    opt.step(closure)


@pytest.mark.parametrize("backend", LS_BACKENDS)
@pytest.mark.parametrize("kwargs, saves", [({"warmup_steps": 1}, [True, False, False, False]),
                                           ({"warmup_steps": 0, "strategy": "all"}, [True, True]),
                                           ({"warmup_steps": 0, "n_groups": 1}, [True, True])])
def test_which_steps_write_the_direction(backend, kwargs, saves):
    opt, ps, closure = _optimizer(backend, **kwargs)
    for saved in saves:
        for buf in opt._dirs.values():
            buf.fill_(math.nan)
        _step(opt, ps, closure)
        if not saved:  # no step writes d any more: its parameter-sized buffers are freed
            assert not opt._dirs
            continue
        assert opt._dirs  # fp32 parameters have buffers
        for p, buf in opt._dirs.items():
            assert p.dtype == torch.float32 and not torch.isnan(buf).any()


@pytest.mark.parametrize("criterion", ["code", "paper"])
@pytest.mark.parametrize("backend", LS_BACKENDS)
def test_cycle_steps_have_the_bits_of_steps_that_save_every_direction(backend, criterion, monkeypatch):
    results = []
    for every_group in (False, True):
        if every_group:
            monkeypatch.setattr(sk.LayerwiseAdamSLS, "_saves_directions", LineSearchOptimizer._saves_directions)
        opt, ps, closure = _optimizer(backend, warmup_steps=1, criterion=criterion)
        counters = []
        for _ in range(7):
            _step(opt, ps, closure)
            counters.append((list(opt.ls_state["step_sizes"]), list(opt.ls_state["n_backtracks"])))
        results.append((ps, opt, counters))
    (ps, opt, counters), (ps_all, opt_all, counters_all) = results
    assert counters == counters_all
    assert sum(sum(n) for _, n in counters[1:]) > 0  # the cycle steps' searches backtracked
    for p, q in zip(ps, ps_all):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt_all.state[q][key])
