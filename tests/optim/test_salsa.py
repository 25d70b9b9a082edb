"""SaLSA against the real salsa-optimizer 0.1.0 (installed with --no-deps), and its refusals.

The package reseeds the RNG from the wall clock on every closure call, so the oracle runs use
deterministic models (no dropout); float64 keeps the comparison free of float32 rounding chaos.
"""
import copy
import math

import pytest
import torch

import svi_kernels as sk
from svi_kernels.optim._closure import NonFiniteLossError

from helpers import LS_BACKENDS, one_thread  # noqa: F401


salsa_pkg = pytest.importorskip("salsa.SaLSA", reason="salsa-optimizer==0.1.0 (pip install --no-deps) is the oracle")
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed, hidden=12, d_in=8, d_out=3, depth=1):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(d_in, hidden), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
    layers.append(torch.nn.Linear(hidden, d_out))
    return torch.nn.Sequential(*layers).double()


def _closure(model, x, y, decay=None):
    """The package's closure form; ``decay`` applies the repository's weight decay right after backward."""
    def closure(backwards=False):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if backwards:
            loss.backward()
            if decay is not None:
                decay()
        return loss
    return closure


def _follow(steps, seed, *, fixed, pkg_kw, our_kw, depth=1, weight_decay=0.0, backend="reference"):
    """Run the package and ours side by side; returns (worst parameter rel. error, searched, skipped)."""
    m_pkg = _model(seed, depth=depth)
    m_ours = copy.deepcopy(m_pkg)
    pkg = salsa_pkg.SaLSA(m_pkg.parameters(), **pkg_kw)
    ours = sk.SaLSA(m_ours.parameters(), weight_decay=weight_decay, backend=backend, **our_kw)

    def pkg_decay():  # salsa's current repository: p <- p - wd * step_size * p after the closure
        with torch.no_grad():
            for p in m_pkg.parameters():
                p.add_(p, alpha=-weight_decay * pkg.step_size)

    g = torch.Generator().manual_seed(seed + 100)
    x, y = torch.randn(24, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    worst, searched = 0.0, 0
    for k in range(steps):
        if not fixed:
            x, y = torch.randn(24, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
        pkg.zero_grad()
        pkg.step(_closure(m_pkg, x, y, pkg_decay if weight_decay else None))
        ours.zero_grad()
        ours.step(_closure(m_ours, x, y))
        ls = ours.ls_state
        searched += ls["searched"]
        assert ls["step_sizes"][0] == pytest.approx(pkg.step_size, rel=1e-9), f"step size at step {k + 1}"
        assert ls["n_forwards"] == pkg.state["n_forwards"], f"forward count at step {k + 1}"
        for a, b in zip(m_pkg.parameters(), m_ours.parameters()):
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return worst, searched, steps - searched


@pytest.mark.parametrize("backend", LS_BACKENDS)
@pytest.mark.parametrize("case", [
    dict(seed=0, fixed=False, pkg_kw={}, our_kw={}),
    dict(seed=1, fixed=True, pkg_kw={"use_mv": True}, our_kw={"momentum_direction": True}),
    dict(seed=5, fixed=False, depth=2, pkg_kw={"init_step_size": 0.1, "c": 0.3, "momentum": (0.8, 0.99, 0.7)},
         our_kw={"init_step_size": 0.1, "c": 0.3, "betas": (0.8, 0.99), "smoothing": 0.7}),
], ids=["defaults", "use_mv", "hyper"])
def test_follows_salsa_optimizer(backend, case):
    case = dict(case)
    worst, searched, skipped = _follow(110, case.pop("seed"), backend=backend, **case)
    assert worst < 1e-6  # float64 rounding (1e-16) amplified by the training dynamics; exact step sizes/counts
    assert searched >= 10 and skipped >= 5, (searched, skipped)  # both kinds of step were compared


def test_weight_decay_as_the_repository():
    worst, searched, skipped = _follow(100, 3, fixed=False, pkg_kw={}, our_kw={}, weight_decay=0.05)
    assert worst < 1e-6 and skipped >= 5


def test_schedules_every_and_k():
    model = _model(0)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    for search, expected in (("every", [True] * 7), (3, [True, False, False, True, False, False, True])):
        opt = sk.SaLSA(model.parameters(), search=search)
        got = []
        for _ in range(7):
            opt.zero_grad()
            opt.step(_closure(model, x, y))
            got.append(opt.ls_state["searched"])
        assert got == expected
        # a skipped step spends exactly one forward
        assert opt.ls_state["n_forwards"] - opt.ls_state["n_backwards"] == opt.ls_state["total_backtracks"] + sum(got)


def test_state_dict_round_trip_continues_identically():
    model = _model(4)
    opt = sk.SaLSA(model.parameters())
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(30)]
    for x, y in data[:15]:
        opt.zero_grad()
        opt.step(_closure(model, x, y))
    twin = copy.deepcopy(model)
    opt2 = sk.SaLSA(twin.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's state_dict holds references
    for x, y in data[15:]:
        for m, o in ((model, opt), (twin, opt2)):
            o.zero_grad()
            o.step(_closure(m, x, y))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for key in ("step_sizes", "avg_sufficient", "avg_decrease", "search", "n_forwards"):
        assert opt.ls_state[key] == opt2.ls_state[key]


def test_param_groups_each_keep_a_step_size():
    model = _model(6, depth=2)
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    opt = sk.SaLSA([{"params": layers[0].parameters()}, {"params": layers[1].parameters(), "c": 0.2},
                    {"params": layers[2].parameters(), "init_step_size": 0.01}])
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(12):
        opt.zero_grad()
        opt.step(_closure(model, x, y))
    etas = opt.ls_state["step_sizes"]
    assert len(etas) == 3 and len(set(etas)) == 3 and all(e > 0 for e in etas)


def test_rng_replayed_in_every_call_of_a_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    draws = []

    def closure(backwards=False):
        draws.append(torch.rand(3))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if backwards:
            loss.backward()
        return loss

    opt = sk.SaLSA(model.parameters())
    opt.step(closure)
    assert len(draws) >= 2 and all(torch.equal(d, draws[0]) for d in draws)


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.ls_state), \
        {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items() if isinstance(v, dict) and k != "ls"}


def _assert_untouched(model, opt, snap):
    params, ls, state = snap
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert opt.ls_state == ls
    for k, v in state.items():
        assert all(torch.equal(opt.state[k][n], t) for n, t in v.items())


@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "nan_grad", "no_closure"])
def test_refusals_leave_params_and_state_untouched(bad):
    model = _model(7)
    opt = sk.SaLSA(model.parameters())
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt.step(_closure(model, x, y))  # some state first
    snap = _snapshot(model, opt)

    def closure(backwards=False):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if bad == "nan_grad":  # finite value, NaN gradient (d sqrt(u)/du = inf at u = 0, times 0)
            loss = loss + (model[0].weight * 0.0).abs().sqrt().sum()
        if bad == "nan_loss":
            loss = loss * float("nan")
        if bad == "inf_loss":
            loss = loss * float("inf")
        if backwards:
            loss.backward()
        return loss

    expected = {"nan_loss": NonFiniteLossError, "inf_loss": NonFiniteLossError, "nan_grad": FloatingPointError,
                "no_closure": RuntimeError}[bad]
    opt.zero_grad()
    with pytest.raises(expected):
        opt.step(None if bad == "no_closure" else closure)
    _assert_untouched(model, opt, snap)


@pytest.mark.parametrize("kw", [dict(smoothing=0.0), dict(smoothing=1.0), dict(beta_b=1.0), dict(beta_b=0.0),
                                dict(growth=0.9), dict(growth=math.inf), dict(search="sometimes"), dict(search=0),
                                dict(c=0.0), dict(init_step_size=-1.0), dict(max_backtracks=0), dict(eps=-1.0),
                                dict(weight_decay=-0.1), dict(betas=(0.9, 1.0))])
def test_bad_hyperparameters_refused(kw):
    model = _model(0)
    with pytest.raises(ValueError):
        sk.SaLSA(model.parameters(), **kw)
