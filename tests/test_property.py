"""Property-based parity: every available backend's 7 fused ops against the reference run in float64.

Hypothesis draws the tensor list (0 to 5 tensors of random shapes, zero and odd sizes included), the
dtype and the hyperparameters; the tensor values come from a drawn seed. The backend runs on the
low-precision tensors, the oracle on float64 copies of the same values. Tolerances are those of
tests/backends/test_ops_parity.py, measured against the size of the terms that were added (an update
much larger than the parameter it moves keeps the relative error of its own size).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend_params import AVAILABLE, BACKEND_PARAMS
from backend_params import device_for as _device_for
from svi_kernels.backends import get, reference
from tensor_factory import random_lists

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SUM_RTOL = 1e-4
SETTINGS = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


backend_param = pytest.mark.parametrize("backend", BACKEND_PARAMS)

# ------------------------------------------------------------------ strategies
shape = st.one_of(
    st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),  # small n-d, zero dims included
    st.sampled_from([(0,), (1,), (7,), (15,), (17,), (31,), (33,), (127,), (129,), (1023,), (1025,), (4097,)]),
)
shapes = st.lists(shape, min_size=1, max_size=5)  # empty lists: test_empty_lists
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
seeds = st.integers(0, 2**31 - 1)
lrs = st.floats(1e-5, 0.1)
beta1s = st.floats(0.0, 0.99)
beta2s = st.floats(0.5, 0.9999)
epss = st.floats(1e-8, 1e-2)
nonneg = lambda lo, hi: st.floats(lo, hi).map(lambda x: max(x, 0.0))  # noqa: E731 (exact 0 now and then)
decays = nonneg(-0.1, 0.5)
steps = st.one_of(st.none(), st.integers(1, 100))  # None: no bias correction


def f64(ts):
    return [t.detach().to(device="cpu", dtype=torch.float64).clone() for t in ts]


def assert_close(got, want, start, dtype, what):
    """|got - want| <= rtol * max(|want|, |start|, |want - start|) + atol, element-wise."""
    rtol, atol = TOL[dtype]
    for i, (g, w, s) in enumerate(zip(got, want, start)):
        g = g.detach().cpu().double()
        w_stored = w.to(dtype).double()  # the oracle rounded to the stored dtype
        scale = torch.maximum(torch.maximum(w.abs(), s.abs()), (w - s).abs())
        bad = (g - w_stored).abs() > rtol * scale + atol
        assert not bad.any(), (f"{what}[{i}] shape {tuple(g.shape)} {dtype}: max error "
                               f"{float((g - w_stored).abs().max())} at {bad.nonzero()[0].tolist()}")


def assert_unchanged(got, before, what):
    for i, (g, b) in enumerate(zip(got, before)):
        assert torch.equal(g.detach().cpu().double(), b), f"{what}[{i}] was modified"


def assert_sums(sums, want, n, what):
    assert sums.dtype == torch.float32 and tuple(sums.shape) == (n,), f"{what}: {sums.dtype} {tuple(sums.shape)}"
    torch.testing.assert_close(sums.cpu().double(), want.double(), rtol=SUM_RTOL, atol=1e-6, msg=what)


def bias_corrections(step, beta1, beta2):
    return (1.0, 1.0) if step is None else (1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step))


# ------------------------------------------------------------------------ ops
@backend_param
@SETTINGS
@given(shp=shapes, dtype=dtypes, seed=seeds, lr=lrs, beta1=beta1s, beta2=beta2s, eps=epss, wd=decays,
       decoupled=st.booleans(), maximize=st.booleans(), step=steps)
def test_adam_step(backend, shp, dtype, seed, lr, beta1, beta2, eps, wd, decoupled, maximize, step):
    p, g, m, v = random_lists(shp, dtype, _device_for(backend), seed, ["n", "n", "small", "pos"])
    want = [f64(x) for x in (p, g, m, v)]
    start = [f64(x) for x in (p, m, v)]
    bc1, bc2s = bias_corrections(step, beta1, beta2)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, decoupled=decoupled,
              bias_correction1=bc1, bias_correction2_sqrt=bc2s, maximize=maximize)
    get(backend).adam_step(p, g, m, v, **kw)
    reference.adam_step(*want, **kw)
    assert_close(p, want[0], start[0], dtype, "param")
    assert_close(m, want[2], start[1], dtype, "exp_avg")
    assert_close(v, want[3], start[2], dtype, "exp_avg_sq")
    assert_unchanged(g, want[1], "grad")


@backend_param
@SETTINGS
@given(shp=shapes, dtype=dtypes, seed=seeds, lr=st.floats(1e-5, 1.0), momentum=st.floats(0.0, 0.99),
       nesterov=st.booleans(), wd=decays, maximize=st.booleans(), dampening=st.sampled_from([0.0, 0.25, 0.9]))
def test_sgd_momentum_step(backend, shp, dtype, seed, lr, momentum, nesterov, wd, maximize, dampening):
    p, g, b = random_lists(shp, dtype, _device_for(backend), seed, ["n", "n", "small"])
    want = [f64(x) for x in (p, g, b)]
    start = [f64(x) for x in (p, b)]
    kw = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd, maximize=maximize, dampening=dampening)
    get(backend).sgd_momentum_step(p, g, b, **kw)
    reference.sgd_momentum_step(*want, **kw)
    assert_close(p, want[0], start[0], dtype, "param")
    assert_close(b, want[2], start[1], dtype, "momentum_buffer")
    assert_unchanged(g, want[1], "grad")


@backend_param
@SETTINGS
@given(shp=shapes, dtype=dtypes, seed=seeds)
def test_ls_save_sgd(backend, shp, dtype, seed):
    p, g, w0 = random_lists(shp, dtype, _device_for(backend), seed, ["n", "n", "n"])
    want_p, want_g = f64(p), f64(g)
    sums = get(backend).ls_save_sgd(p, g, w0)
    ref = reference.ls_save_sgd(want_p, want_g, [torch.empty_like(x) for x in want_p])
    assert_sums(sums, ref, len(shp), "sum(g^2)")
    assert_unchanged(w0, want_p, "w0 == p")  # exact copy
    assert_unchanged(p, want_p, "param")
    assert_unchanged(g, want_g, "grad")


@backend_param
@SETTINGS
@given(shp=shapes, dtype=dtypes, seed=seeds, beta1=beta1s, beta2=beta2s, eps=epss, step=st.integers(1, 100))
def test_ls_save_adam(backend, shp, dtype, seed, beta1, beta2, eps, step):
    p, g, m, v, w0 = random_lists(shp, dtype, _device_for(backend), seed, ["n", "n", "small", "pos", "n"])
    want = [f64(x) for x in (p, g, m, v, w0)]
    start = [f64(x) for x in (m, v)]
    kw = dict(beta1=beta1, beta2=beta2, eps=eps, bias_correction2_sqrt=bias_corrections(step, beta1, beta2)[1])
    dirs = [torch.empty_like(x) for x in p]  # the search direction, as the optimizers save it
    want_dirs = [torch.empty_like(x) for x in want[0]]
    sums = get(backend).ls_save_adam(p, g, m, v, w0, dirs, **kw)
    ref = reference.ls_save_adam(*want, want_dirs, **kw)
    assert_sums(sums, ref, len(shp), "sum(g^2 / (sqrt(v_hat) + eps))")
    assert_close(dirs, want_dirs, [torch.zeros_like(x) for x in want_dirs], dtype, "dirs")
    assert_unchanged(w0, want[0], "w0 == p")
    assert_unchanged(p, want[0], "param")
    assert_close(m, want[2], start[0], dtype, "exp_avg")
    assert_close(v, want[3], start[1], dtype, "exp_avg_sq")


etas_for = st.lists(nonneg(-0.5, 3.0), min_size=5, max_size=5)


@backend_param
@SETTINGS
@given(shp=shapes, dtype=dtypes, seed=seeds, etas=etas_for)
def test_ls_trial_sgd(backend, shp, dtype, seed, etas):
    p, w0, g = random_lists(shp, dtype, _device_for(backend), seed, ["n", "n", "n"])
    etas = etas[:len(shp)]
    want = [f64(x) for x in (p, w0, g)]
    get(backend).ls_trial_sgd(p, w0, g, etas)
    reference.ls_trial_sgd(*want, etas)
    assert_close(p, want[0], want[1], dtype, "trial point")
    assert_unchanged(w0, want[1], "w0")
    assert_unchanged(g, want[2], "grad")
    for i, e in enumerate(etas):
        if e == 0.0:
            assert torch.equal(p[i], w0[i]), "eta = 0 must restore w0 exactly"


@backend_param
@SETTINGS
@given(shp=shapes, dtype=dtypes, seed=seeds, etas=etas_for, eps=epss, beta2=beta2s, step=st.integers(1, 100))
def test_ls_trial_adam(backend, shp, dtype, seed, etas, eps, beta2, step):
    p, w0, g, v = random_lists(shp, dtype, _device_for(backend), seed, ["n", "n", "n", "pos"])
    etas = etas[:len(shp)]
    want = [f64(x) for x in (p, w0, g, v)]
    kw = dict(eps=eps, bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step))
    get(backend).ls_trial_adam(p, w0, g, v, etas, **kw)
    reference.ls_trial_adam(*want, etas, **kw)
    assert_close(p, want[0], want[1], dtype, "trial point")
    for got, ref, name in zip((w0, g, v), want[1:], ("w0", "grad", "exp_avg_sq")):
        assert_unchanged(got, ref, name)
    for i, e in enumerate(etas):
        if e == 0.0:
            assert torch.equal(p[i], w0[i]), "eta = 0 must restore w0 exactly"


@backend_param
@SETTINGS
@given(shp=shapes, dtype=dtypes, seed=seeds, etas=etas_for, eps=epss, beta1=beta1s, beta2=beta2s,
       step=st.integers(1, 100))
def test_ls_final_adam(backend, shp, dtype, seed, etas, eps, beta1, beta2, step):
    p, w0, m, v = random_lists(shp, dtype, _device_for(backend), seed, ["n", "n", "small", "pos"])
    etas = etas[:len(shp)]
    want = [f64(x) for x in (p, w0, m, v)]
    bc1, bc2s = bias_corrections(step, beta1, beta2)
    kw = dict(eps=eps, bias_correction1=bc1, bias_correction2_sqrt=bc2s)
    get(backend).ls_final_adam(p, w0, m, v, etas, **kw)
    reference.ls_final_adam(*want, etas, **kw)
    assert_close(p, want[0], want[1], dtype, "final step")
    for got, ref, name in zip((w0, m, v), want[1:], ("w0", "exp_avg", "exp_avg_sq")):
        assert_unchanged(got, ref, name)


@backend_param
def test_empty_lists(backend):
    impl = get(backend)
    impl.adam_step([], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True,
                   bias_correction1=0.1, bias_correction2_sqrt=0.1, maximize=False)
    impl.sgd_momentum_step([], [], [], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, maximize=False)
    assert tuple(impl.ls_save_sgd([], [], []).shape) == (0,)
    assert tuple(impl.ls_save_adam([], [], [], [], [], [], beta1=0.9, beta2=0.999, eps=1e-8,
                                   bias_correction2_sqrt=0.1).shape) == (0,)
    impl.ls_trial_sgd([], [], [], [])
    impl.ls_trial_adam([], [], [], [], [], eps=1e-8, bias_correction2_sqrt=0.1)
    impl.ls_final_adam([], [], [], [], [], eps=1e-8, bias_correction1=0.1, bias_correction2_sqrt=0.1)
