"""The ops of in-place trials (issue 23, svi_kernels/optim/trial_points.py) on every available backend:

- ls_save_adam without w0: the moments and sums of the save with w0, bit for bit, p neither read nor written;
- ls_final_adam_from_trial against the float64 reference (odd sizes, many tensors, four dtypes), and equal
  bit for bit to ls_final_adam from w0 when the trial step size is 0;
- the rounding bound of docs/kernels.md ("In-place trials"): after K in-place moves (ls_trial_sgd /
  ls_trial_adam / ls_final_adam with w0 = params) and the final step from the trial point, every element is
  within (K + 2) * (u_s + u_c) * M + 8 * u_c * eta_1 * |d| of the same ops run from a kept w0 (u_s, u_c:
  unit roundoffs of the stored and the compute dtype; M: the largest |p| along the way).
"""
from __future__ import annotations

import math

import pytest
import torch

from backend_params import device_for
from svi_kernels.backends import get, reference
from tensor_factory import random_lists

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZES = [1, 7, 0, 4099, 65_537, 33, 0]  # odd sizes, empty tensors in the middle and last
MANY = [int(n) for n in torch.randint(0, 3000, (300,), generator=torch.Generator().manual_seed(19))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STEP = 3
SAVE = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** STEP))
FINAL = dict(eps=1e-8, bias_correction1=1 - 0.9 ** STEP, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** STEP))
# unit roundoff of a dtype (half an ulp at 1.0)
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TOL = {torch.float32: (2e-6, 1e-5), torch.float64: (1e-14, 1e-13), torch.float16: (1e-3, 2e-3),
       torch.bfloat16: (8e-3, 1.6e-2)}


def _skip_fp64_triton(backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton backend has no float64 kernels")


def _inputs(dtype, device, seed, sizes=SIZES):
    return random_lists(sizes, dtype, device, seed, ["n", "n", "small", "pos"])


def _clone(ts):
    return [t.clone() for t in ts]


def _bits(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def _f64(ts):
    return [t.detach().to(device="cpu", dtype=torch.float64).clone() for t in ts]


@pytest.mark.parametrize("sizes", [SIZES, MANY], ids=["odd", "300-tensors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_save_adam_without_w0_is_the_save_with_w0(backend, dtype, sizes):
    _skip_fp64_triton(backend, dtype)
    impl = get(backend)
    p, g, m, v = _inputs(dtype, device_for(backend), seed=1, sizes=sizes)
    want = [_f64(x) for x in (p, g, m, v)]
    p_before = _clone(p)
    m2, v2 = _clone(m), _clone(v)
    sums = impl.ls_save_adam(p, g, m, v, [], [], **SAVE)
    sums2 = impl.ls_save_adam(p, g, m2, v2, [torch.empty_like(t) for t in p], [], **SAVE)
    assert torch.equal(sums, sums2)
    assert _bits(m, m2) and _bits(v, v2) and _bits(p, p_before)
    want_sums = reference.ls_save_adam(*want, [], [], **SAVE)
    torch.testing.assert_close(sums.cpu().double(), want_sums.double(), rtol=1e-4, atol=1e-6)


def test_save_adam_dirs_without_w0_is_refused(backend):
    impl = get(backend)
    p, g, m, v = _inputs(torch.float32, device_for(backend), seed=2)
    before = _clone(m)
    with pytest.raises((RuntimeError, ValueError), match="dirs needs w0"):
        impl.ls_save_adam(p, g, m, v, [], [torch.empty_like(t) for t in p], **SAVE)
    assert _bits(m, before)


@pytest.mark.parametrize("sizes", [SIZES, MANY], ids=["odd", "300-tensors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_final_from_trial_matches_float64_reference(backend, dtype, sizes):
    _skip_fp64_triton(backend, dtype)
    p, g, m, v = _inputs(dtype, device_for(backend), seed=3, sizes=sizes)
    etas = [0.3 + 0.1 * (i % 5) for i in range(len(sizes))]
    want = [_f64(x) for x in (p, g, m, v)]
    get(backend).ls_final_adam_from_trial(p, g, m, v, etas, trial_eta=0.45, **FINAL)
    reference.ls_final_adam_from_trial(*want, etas, trial_eta=0.45, **FINAL)
    rtol, atol = TOL[dtype]
    for i, (got, ref) in enumerate(zip(p, want[0])):
        torch.testing.assert_close(got.cpu().double(), ref.to(dtype).double(), rtol=rtol, atol=atol,
                                   msg=lambda msg: f"params[{i}]: {msg}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_final_from_trial_at_trial_eta_zero_is_ls_final_adam(backend, dtype):
    _skip_fp64_triton(backend, dtype)
    impl = get(backend)
    p, g, m, v = _inputs(dtype, device_for(backend), seed=4)
    p2 = _clone(p)
    etas = [0.2] * len(p)
    impl.ls_final_adam_from_trial(p, g, m, v, etas, trial_eta=0.0, **FINAL)
    impl.ls_final_adam(p2, _clone(p2), m, v, etas, **FINAL)
    assert _bits(p, p2)


def test_final_from_trial_refuses_a_short_list_before_writing(backend):
    impl = get(backend)
    p, g, m, v = _inputs(torch.float32, device_for(backend), seed=5)
    before = _clone(p)
    with pytest.raises((RuntimeError, ValueError)):
        impl.ls_final_adam_from_trial(p, g[:-1], m, v, [0.1] * len(p), trial_eta=0.1, **FINAL)
    assert _bits(p, before)


# ------------------------------------------------------------------------------- the rounding bound
def _bound(dtype, k, m_abs, eta_1, d_abs):
    u_s = UNIT[dtype]
    u_c = UNIT[torch.float64 if dtype == torch.float64 else torch.float32]
    return (k + 2) * (u_s + u_c) * m_abs + 8 * u_c * eta_1 * d_abs


ETA_SEQUENCES = {  # backtracking from eta_1 by 0.9 (the defaults), by 0.5, and a long one (30 trials)
    "0.9": [2.0 * 0.9 ** k for k in range(6)],
    "0.5": [0.7 * 0.5 ** k for k in range(4)],
    "30-trials": [5.0 * 0.9 ** k for k in range(30)],
}


@pytest.mark.parametrize("etas", list(ETA_SEQUENCES), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_in_place_trials_and_final_stay_within_the_bound(backend, dtype, direction, etas):
    _skip_fp64_triton(backend, dtype)
    impl = get(backend)
    seq = ETA_SEQUENCES[etas]
    p, g, m, v = _inputs(dtype, device_for(backend), seed=6, sizes=[1, 7, 4099, 33])
    w0 = _clone(p)
    kept = _clone(p)  # the release: every trial from w0
    n = len(p)
    biggest = [t.detach().abs().double().cpu() for t in p]
    last = 0.0

    def trial(params, base, eta):
        if direction == "sgd":
            impl.ls_trial_sgd(params, base, g, [eta] * n)
        else:
            impl.ls_trial_adam(params, base, g, v, [eta] * n, eps=FINAL["eps"],
                               bias_correction2_sqrt=FINAL["bias_correction2_sqrt"])

    if direction == "sgd":
        d = [t.double().cpu().abs() for t in g]
    else:
        d = [(t.double().cpu() / (s.double().cpu().sqrt() / FINAL["bias_correction2_sqrt"] + FINAL["eps"])).abs()
             for t, s in zip(g, v)]
    for k, eta in enumerate(seq, start=1):
        trial(p, p, eta - last)  # in place: by the change of step size
        trial(kept, w0, eta)
        last = eta
        biggest = [torch.maximum(b, t.detach().abs().double().cpu()) for b, t in zip(biggest, p)]
        for i, (a, b) in enumerate(zip(p, kept)):
            err = (a.double().cpu() - b.double().cpu()).abs()
            bound = _bound(dtype, k, biggest[i], seq[0], d[i])
            assert bool((err <= bound).all()), f"trial {k}, tensor {i}: {float((err - bound).max())} over the bound"
    if direction == "adam":  # the final step from the last trial point vs from w0
        final = [0.8] * n
        impl.ls_final_adam_from_trial(p, g, m, v, final, trial_eta=last, **FINAL)
        impl.ls_final_adam(kept, w0, m, v, final, **FINAL)
        k = len(seq) + 1
    else:  # SGD's restore: back to w0
        trial(p, p, -last)
        kept = w0
        k = len(seq) + 1
    for i, (a, b) in enumerate(zip(p, kept)):
        big = torch.maximum(biggest[i], b.detach().abs().double().cpu())
        err = (a.double().cpu() - b.double().cpu()).abs()
        bound = _bound(dtype, k, big, seq[0], d[i])
        assert bool((err <= bound).all()), f"end, tensor {i}: {float((err - bound).max())} over the bound"


def test_the_bound_is_not_vacuous():
    """In fp32 the in-place points do differ from the kept-w0 ones, by far less than the bound allows
    for a single rounding of the largest term: the test above can fail."""
    impl = get("reference")
    p, g, _m, _v = _inputs(torch.float32, "cpu", seed=7, sizes=[4099])
    w0, kept = _clone(p), _clone(p)
    last = 0.0
    for eta in ETA_SEQUENCES["30-trials"]:
        impl.ls_trial_sgd(p, p, g, [eta - last])
        impl.ls_trial_sgd(kept, w0, g, [eta])
        last = eta
    err = (p[0].double() - kept[0].double()).abs()
    assert float(err.max()) > 0.0
    assert float(err.max()) < 31 * 2 * 2.0 ** -24 * float(torch.maximum(p[0].abs(), w0[0].abs()).max()) \
        + 8 * 2.0 ** -24 * 5.0 * float(g[0].abs().max())
