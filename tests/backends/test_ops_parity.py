"""Every available backend's fused ops against the plain PyTorch reference run in float64.

Inputs are random (never zeros), with odd and zero sizes, many tensors, several dtypes. The
backend runs on the low-precision tensors; the oracle runs on float64 copies of the same values.
"""
from __future__ import annotations

import math

import pytest
import torch

from backend_params import AVAILABLE
from backend_params import device_for as _device_for
from svi_kernels.backends import get, reference
from tensor_factory import random_lists as lists_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances for the final stored values: a couple of units in the last place of the dtype.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
       torch.float64: (1e-12, 1e-12)}
SIZES = [1, 7, 0, 4099, 278011, 33, 0]  # zero-size tensors in the middle and last


def f64(ts):
    return [t.detach().to(device="cpu", dtype=torch.float64).clone() for t in ts]


def assert_close(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.detach().cpu().double(), b.to(a.dtype).double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}[{i}] (numel {b.numel()}): {m}")


def sizes_for(backend_name):
    # The Triton interpreter runs ~1 s per 1M elements: keep one big odd tensor, not several.
    return SIZES


ADAM_CASES = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, step=1, maximize=False),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=False, step=7, maximize=True),
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, step=None, maximize=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
def test_adam_step(backend, dtype, case):
    c = dict(ADAM_CASES[case])
    step = c.pop("step")
    bc1, bc2s = (1.0, 1.0) if step is None else (1 - c["beta1"] ** step, math.sqrt(1 - c["beta2"] ** step))
    dev = _device_for(backend)
    p, g, m, v = lists_for(SIZES, dtype, dev, 10 + case, ["n", "n", "small", "pos"])
    want = [f64(x) for x in (p, g, m, v)]
    get(backend).adam_step(p, g, m, v, bias_correction1=bc1, bias_correction2_sqrt=bc2s, **c)
    reference.adam_step(*want, bias_correction1=bc1, bias_correction2_sqrt=bc2s, **c)
    for got, ref, name in zip((p, m, v), (want[0], want[2], want[3]), ("param", "exp_avg", "exp_avg_sq")):
        assert_close(got, ref, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nesterov,wd,maximize,dampening", [(True, 0.0, False, 0.0), (False, 0.05, True, 0.0),
                                                            (True, 0.01, False, 0.0), (False, 0.05, False, 0.3)])
def test_sgd_momentum_step(backend, dtype, nesterov, wd, maximize, dampening):
    dev = _device_for(backend)
    p, g, b = lists_for(SIZES, dtype, dev, 20, ["n", "n", "small"])
    want = [f64(x) for x in (p, g, b)]
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=wd, maximize=maximize, dampening=dampening)
    get(backend).sgd_momentum_step(p, g, b, **kw)
    reference.sgd_momentum_step(*want, **kw)
    assert_close(p, want[0], dtype, "param")
    assert_close(b, want[2], dtype, "momentum_buffer")


def _sum_tol(dtype):
    return 1e-5 if dtype == torch.float64 else 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ls_save_sgd(backend, dtype):
    dev = _device_for(backend)
    p, g, w0 = lists_for(SIZES, dtype, dev, 30, ["n", "n", "n"])
    want_p, want_g = f64(p), f64(g)
    sums = get(backend).ls_save_sgd(p, g, w0)
    assert sums.dtype == torch.float32 and sums.shape == (len(SIZES),)
    ref = torch.tensor([float((x * x).sum()) for x in want_g], dtype=torch.float64)
    torch.testing.assert_close(sums.cpu().double(), ref, rtol=_sum_tol(dtype), atol=1e-6)
    assert_close(w0, want_p, dtype, "w0")
    assert_close(p, want_p, dtype, "param unchanged")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_dirs", [False, True], ids=["no-dirs", "dirs"])
def test_ls_save_adam(backend, dtype, with_dirs):
    dev = _device_for(backend)
    p, g, m, v, w0 = lists_for(SIZES, dtype, dev, 40, ["n", "n", "small", "pos", "n"])
    dirs = [torch.empty_like(t) for t in p] if with_dirs else []
    want = [f64(x) for x in (p, g, m, v, w0, dirs)]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** 3))
    sums = get(backend).ls_save_adam(p, g, m, v, w0, dirs, **kw)
    ref = reference.ls_save_adam(*want, **kw)
    assert_close(dirs, want[5], dtype, "dirs")
    # The float64 oracle sums the float64 terms exactly enough; compare per tensor.
    torch.testing.assert_close(sums.cpu().double(), ref.double(), rtol=_sum_tol(dtype), atol=1e-6)
    assert_close(w0, want[0], dtype, "w0")
    assert_close(m, want[2], dtype, "exp_avg")
    assert_close(v, want[3], dtype, "exp_avg_sq")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ls_trials_and_final(backend, dtype):
    dev = _device_for(backend)
    p, w0, g, m, v = lists_for(SIZES, dtype, dev, 50, ["n", "n", "n", "small", "pos"])
    etas = [0.3, 0.0, 1e-3, 2.5, 0.07, 1.0, 0.5]  # tensor 1 (7 elements) gets eta = 0
    impl = get(backend)
    # SGD trial
    want = [f64(x) for x in (p, w0, g)]
    impl.ls_trial_sgd(p, w0, g, etas)
    reference.ls_trial_sgd(*want, etas)
    assert_close(p, want[0], dtype, "trial_sgd")
    # Adam trial
    bc2s = math.sqrt(1 - 0.999 ** 5)
    want = [f64(x) for x in (p, w0, g, v)]
    impl.ls_trial_adam(p, w0, g, v, etas, eps=1e-8, bias_correction2_sqrt=bc2s)
    reference.ls_trial_adam(*want, etas, eps=1e-8, bias_correction2_sqrt=bc2s)
    assert_close(p, want[0], dtype, "trial_adam")
    # eta = 0 restores w0 exactly
    zero = [t.numel() for t in p].index(0) - 1
    assert torch.equal(p[zero], w0[zero])
    # final Adam step
    bc1 = 1 - 0.9 ** 5
    want = [f64(x) for x in (p, w0, m, v)]
    impl.ls_final_adam(p, w0, m, v, etas, eps=1e-8, bias_correction1=bc1, bias_correction2_sqrt=bc2s)
    reference.ls_final_adam(*want, etas, eps=1e-8, bias_correction1=bc1, bias_correction2_sqrt=bc2s)
    assert_close(p, want[0], dtype, "final_adam")


def test_many_tensors_one_call(backend):
    """300+ tensors of assorted odd sizes in one fused call."""
    dev = _device_for(backend)
    gen = torch.Generator().manual_seed(7)
    sizes = [int(x) for x in torch.randint(0, 700, (317,), generator=gen)]
    p, g, m, v = lists_for(sizes, torch.float32, dev, 60, ["n", "n", "small", "pos"])
    want = [f64(x) for x in (p, g, m, v)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
              bias_correction1=0.1, bias_correction2_sqrt=math.sqrt(0.001), maximize=False)
    get(backend).adam_step(p, g, m, v, **kw)
    reference.adam_step(*want, **kw)
    assert_close(p, want[0], torch.float32, "param")
    assert_close(v, want[3], torch.float32, "exp_avg_sq")
    w0 = [torch.empty_like(t) for t in p]
    sums = get(backend).ls_save_sgd(p, g, w0)
    ref = torch.tensor([float((x * x).sum()) for x in want[1]], dtype=torch.float64)
    torch.testing.assert_close(sums.cpu().double(), ref, rtol=1e-4, atol=1e-6)


def test_empty_lists(backend):
    impl = get(backend)
    impl.adam_step([], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                   bias_correction1=1.0, bias_correction2_sqrt=1.0)
    assert impl.ls_save_sgd([], [], []).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float64], ids=str)
def test_float64_params(dtype):
    """The compiled CPU backend also takes float64 params (double math)."""
    if not AVAILABLE["cpu"]["available"]:
        pytest.skip(AVAILABLE["cpu"]["reason"])
    p, g, m, v = lists_for([5, 4099], dtype, "cpu", 70, ["n", "n", "small", "pos"])
    want = [f64(x) for x in (p, g, m, v)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
              bias_correction1=0.1, bias_correction2_sqrt=0.03, maximize=False)
    get("cpu").adam_step(p, g, m, v, **kw)
    reference.adam_step(*want, **kw)
    assert_close(p, want[0], dtype, "param")
