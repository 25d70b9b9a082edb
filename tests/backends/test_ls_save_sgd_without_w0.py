"""ls_save_sgd given an empty ``w0`` list: the read-only gradient check of the Adam line searches
(_line_search._grad_norms). It returns only the per-tensor sums of g^2 (4 B/param in fp32 instead
of the save's 12) and writes nothing. Checked on every available backend: the sums against a float64
PyTorch reference; bit for bit the sums of the save with w0 (the optimizers' results must not move);
nothing written; list mismatches and bad gradients refused before anything is written.
"""
from __future__ import annotations

import pytest
import torch

from backend_params import AVAILABLE, device_for
from svi_kernels.backends import get
from tensor_factory import random_lists

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZES = [1, 7, 0, 4099, 65_537, 33, 0]  # odd sizes (one over two CPU chunks), empty tensors mid and last
MANY = [int(n) for n in torch.randint(0, 3000, (300,), generator=torch.Generator().manual_seed(12))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _skip_unsupported(backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton backend has no float64 kernels")


def _inputs(backend, dtype, sizes=SIZES, seed=3):
    return random_lists(sizes, dtype, device_for(backend), seed, ["n", "n"])


def _bits(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True))


def _snapshot(ts):
    return [t.clone() for t in ts], [t._version for t in ts]


@pytest.mark.parametrize("sizes", [SIZES, MANY], ids=["odd", "300-tensors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sums_match_float64_reference(backend, dtype, sizes):
    _skip_unsupported(backend, dtype)
    p, g = _inputs(backend, dtype, sizes)
    sums = get(backend).ls_save_sgd(p, g, [])
    want = torch.stack([x.detach().cpu().double().square().sum() for x in g])
    assert sums.dtype == torch.float32 and sums.shape == (len(sizes),)
    # g^2 in the compute type (exact for fp16/bf16 in float32), double accumulation, one float32 rounding
    rtol = 1e-13 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(sums.cpu().double(), want.to(torch.float32).double(), rtol=rtol, atol=0.0)


@pytest.mark.parametrize("sizes", [SIZES, MANY], ids=["odd", "300-tensors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_sums_bit_for_bit_as_the_save_with_w0(backend, dtype, sizes):
    _skip_unsupported(backend, dtype)
    if backend in ("cuda", "triton") and device_for(backend) == "cuda":
        pytest.skip("GPU sums add block sums atomically: their order is not fixed")
    impl = get(backend)
    p, g = _inputs(backend, dtype, sizes, seed=4)
    with_w0 = impl.ls_save_sgd(p, g, [torch.empty_like(t) for t in p])
    without = impl.ls_save_sgd(p, g, [])
    assert torch.equal(with_w0, without)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nothing_is_written(backend, dtype):
    _skip_unsupported(backend, dtype)
    p, g = _inputs(backend, dtype, seed=5)
    (p_before, p_versions), (g_before, g_versions) = _snapshot(p), _snapshot(g)
    poisoned = [torch.full_like(t, float("nan")) for t in p]  # a scratch w0 that exists but is not passed
    get(backend).ls_save_sgd(p, g, [])
    assert _bits(p, p_before) and _bits(g, g_before)
    assert [t._version for t in p] == p_versions and [t._version for t in g] == g_versions
    assert all(torch.isnan(t).all() for t in poisoned)


def test_non_finite_gradient_gives_a_non_finite_sum_of_its_tensor_only(backend):
    p, g = _inputs(backend, torch.float32, seed=6)
    g[3][100] = float("nan")
    g[4][65_536] = float("inf")  # in the second CPU chunk of that tensor
    finite = get(backend).ls_save_sgd(p, g, []).cpu().isfinite().tolist()
    assert finite == [True, True, True, False, False, True, True]


@pytest.mark.parametrize("bad", ["w0 shorter", "w0 longer", "grads shorter"])
def test_mismatched_list_lengths_are_refused_before_anything_is_written(backend, bad):
    p, g = _inputs(backend, torch.float32, seed=7)
    w0 = [torch.full_like(t, 7.0) for t in p]
    if bad == "w0 shorter":
        w0 = w0[:-2]
    elif bad == "w0 longer":
        w0 = w0 + [torch.full_like(p[0], 7.0)]
    (p_before, _), (g_before, _) = _snapshot(p), _snapshot(g)
    args = (p, g[:-1], []) if bad == "grads shorter" else (p, g, w0)
    # a w0 of another length is named as such (Triton names a short grads list by its position only)
    with pytest.raises((RuntimeError, ValueError), match="" if bad == "grads shorter" else "w0"):
        get(backend).ls_save_sgd(*args)
    assert _bits(p, p_before) and _bits(g, g_before)
    assert all(torch.equal(t, torch.full_like(t, 7.0)) for t in w0)


@pytest.mark.parametrize("bad", ["dtype", "numel", "strided", "sparse"])
def test_compiled_op_refuses_a_bad_gradient_without_w0(bad):
    # The Adam line searches' step plan leaves the gradient checks to this op on the compiled
    # backends (see _line_search._checked_phase): it must refuse what check_params refuses.
    if not AVAILABLE["cpu"]["available"]:
        pytest.skip(AVAILABLE["cpu"]["reason"])
    p, g = _inputs("cpu", torch.float32, seed=8)
    g[5] = {"dtype": lambda t: t.double(), "numel": lambda t: t[:-1], "strided": lambda t: t.repeat(2)[::2],
            "sparse": lambda t: t.to_sparse()}[bad](g[5])
    with pytest.raises(RuntimeError, match=r"grads|gradient|layout|contiguous|dtype|numel"):
        get("cpu").ls_save_sgd(p, g, [])


def test_torch_ops_path_gives_the_direct_call_sums():
    # compiled.py takes the direct call on plain CPU tensors; the dispatcher path (autograd on, a
    # profiler, torch.compile) must accept the empty w0 too and give the same bits.
    if not AVAILABLE["cpu"]["available"]:
        pytest.skip(AVAILABLE["cpu"]["reason"])
    p, g = _inputs("cpu", torch.float32, MANY, seed=9)
    direct = get("cpu").ls_save_sgd(p, g, [])
    assert torch.equal(torch.ops.svi_kernels.ls_save_sgd(p, g, []), direct)
