"""ls_save_adam's ``dirs`` output (an op feature; since in-place trials no optimizer writes it): the Adam search direction d = g / (sqrt(v_hat) + eps) saved for
the trials, which then run ls_trial_sgd(params, w0, dirs) (12 B/param) instead of ls_trial_adam
(16 B/param). Checked on every available backend: d against the float64 reference; and, for the
dtypes the optimizers save d in (fp32, fp64), the trial along the saved d equal bit for bit to
ls_trial_adam, and the save with dirs equal bit for bit to the save without.
"""
from __future__ import annotations

import math

import pytest
import torch

from backend_params import device_for
from svi_kernels.backends import get, reference
EXACT_DIRECTION = (torch.float32, torch.float64)  # the dtypes whose d is stored exactly
from tensor_factory import random_lists

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZES = [1, 7, 0, 4099, 65_537, 33, 0]  # odd sizes, empty tensors in the middle and last
MANY = [int(n) for n in torch.randint(0, 3000, (300,), generator=torch.Generator().manual_seed(9))]
KW = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** 3))
ETAS = [0.3, 0.0, 1e-3, 2.5, 0.07, 1.0, 0.5]
# one rounding to the stored dtype plus a few in the compute dtype
TOL = {torch.float32: (2e-6, 1e-5), torch.float64: (1e-14, 1e-13), torch.float16: (1e-3, 2e-3),
       torch.bfloat16: (8e-3, 1.6e-2)}


def _inputs(dtype, device, seed=3, sizes=SIZES):
    p, g, m, v = random_lists(sizes, dtype, device, seed, ["n", "n", "small", "pos"])
    return p, g, m, v


def _clone(ts):
    return [t.clone() for t in ts]


def _bits(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_saved_direction_matches_float64_reference(backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton backend has no float64 kernels")
    p, g, m, v = _inputs(dtype, device_for(backend))
    w0, dirs = [torch.empty_like(t) for t in p], [torch.full_like(t, 7.0) for t in p]
    want = [[t.detach().cpu().double().clone() for t in x] for x in (p, g, m, v, w0, dirs)]
    sums = get(backend).ls_save_adam(p, g, m, v, w0, dirs, **KW)
    want_sums = reference.ls_save_adam(*want, **KW)
    rtol, atol = TOL[dtype]
    for i, (got, ref) in enumerate(zip(dirs, want[5])):
        torch.testing.assert_close(got.cpu().double(), ref.to(dtype).double(), rtol=rtol, atol=atol,
                                   msg=lambda msg: f"dirs[{i}]: {msg}")
    torch.testing.assert_close(sums.cpu().double(), want_sums.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sizes", [SIZES, MANY], ids=["odd", "300-tensors"])
@pytest.mark.parametrize("dtype", EXACT_DIRECTION, ids=str)
def test_trial_along_saved_direction_is_ls_trial_adam_bit_for_bit(backend, dtype, sizes):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton backend has no float64 kernels")
    impl = get(backend)
    p, g, m, v = _inputs(dtype, device_for(backend), seed=4, sizes=sizes)
    w0, dirs = [torch.empty_like(t) for t in p], [torch.empty_like(t) for t in p]
    # the same save with and without dirs: the same moments, w0 and sums, bit for bit
    p2, g2, m2, v2 = (_clone(x) for x in (p, g, m, v))
    w02 = [torch.empty_like(t) for t in p]
    sums = impl.ls_save_adam(p, g, m, v, w0, dirs, **KW)
    sums2 = impl.ls_save_adam(p2, g2, m2, v2, w02, [], **KW)
    assert torch.equal(sums, sums2)
    assert _bits(m, m2) and _bits(v, v2) and _bits(w0, w02)
    # every trial of the step: along the saved direction == recomputed from g and v
    for scale in (1.0, 0.5 ** 7):
        etas = [ETAS[i % len(ETAS)] * scale for i in range(len(sizes))]
        impl.ls_trial_sgd(p, w0, dirs, etas)
        impl.ls_trial_adam(p2, w02, g2, v2, etas, eps=KW["eps"], bias_correction2_sqrt=KW["bias_correction2_sqrt"])
        assert _bits(p, p2), f"trial at scale {scale} differs"
    assert not _bits(p, w0)  # the trials moved


def test_dirs_of_another_length_is_refused_before_anything_changes(backend):
    impl = get(backend)
    p, g, m, v = _inputs(torch.float32, device_for(backend), seed=5)
    before = [_clone(x) for x in (m, v)]
    w0 = [torch.full_like(t, 7.0) for t in p]
    with pytest.raises((RuntimeError, ValueError), match="dirs"):
        impl.ls_save_adam(p, g, m, v, w0, [torch.empty_like(t) for t in p[:-1]], **KW)
    assert _bits(m, before[0]) and _bits(v, before[1])
    assert all(torch.equal(t, torch.full_like(t, 7.0)) for t in w0)


def test_old_call_without_dirs_fails_loudly(backend):
    p, g, m, v = _inputs(torch.float32, device_for(backend), seed=6)
    with pytest.raises(TypeError):
        get(backend).ls_save_adam(p, g, m, v, _clone(p), **KW)  # the 5-list call of before dirs existed
