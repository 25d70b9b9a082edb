"""The CUDA kernels (csrc/cuda) against the plain PyTorch reference run on float64 copies.

Skipped without a CUDA device (the CI machine has none: there .ci/cuda_build_check.sh proves the
kernels compile for sm_90 and register, and test_cuda_launch_plan.py checks the launch packing).
On a GPU this covers what the generic tests/backends/test_ops_parity.py does not: float64 on
device, the vector and unaligned paths, tensors spanning launches, 300+ tensors with a zero-size
last one, per-tensor sums, the current stream, CUDA-graph capture, argument checks and the number
of launches. SVI_KERNELS_TEST_HUGE=1 adds a tensor of more than 2**31 elements (~13 GB).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from svi_kernels.backends import compiled, reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Final stored values: a couple of units in the last place of the dtype.
TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 2e-4), torch.bfloat16: (1.6e-2, 1e-3),
       torch.float64: (1e-12, 1e-14)}
SIZES = [0, 1, 7, 4099, 278011, 64, 0]  # odd sizes (tails), zero-size first and last
# Max tensors per launch for the 4 KB metadata (csrc/cuda/launch_plan.h), by (lists, per-tensor scalar).
MAX_TENSORS = {(3, False): 61, (3, True): 50, (4, False): 50, (4, True): 42, (5, False): 42, (6, False): 37}
CHUNK, MAX_BLOCKS = 65536, 320


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    ok, why = compiled.load()
    if not ok:
        pytest.skip(why)
    if not compiled.has_cuda_kernels():
        pytest.skip("svi_kernels._C was built without its CUDA kernels")


def rand(sizes, dtype, seed, kind="n", offset=0):
    """Random CUDA tensors; 'pos' is strictly positive (second moments), 'small' scaled by 0.1.
    offset > 0 makes each tensor a view that starts `offset` elements into its storage, so its
    address is not 16-byte aligned and the kernel takes the element-wise path."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        t = torch.randn(n + offset, generator=gen, dtype=torch.float64)
        if kind == "pos":
            t = t.abs() * 0.01 + 1e-3
        elif kind == "small":
            t = t * 0.1
        out.append(t.to(dtype=dtype, device="cuda")[offset:])
    return out


def f64(ts):
    return [t.detach().to(device="cpu", dtype=torch.float64).clone() for t in ts]


def close(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.numel() == b.numel()
        torch.testing.assert_close(a.cpu().double(), b.to(dtype).double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}[{i}] (numel {b.numel()}): {m}")


def sum_close(got, want, dtype):
    assert got.dtype == torch.float32 and got.device.type == "cuda" and got.shape == want.shape
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=1e-6 if dtype == torch.float64 else 2e-6,
                               atol=1e-6)


ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decoupled,wd,maximize", [(True, 0.01, False), (False, 0.1, True), (True, 0.0, False)])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_adam_step_three_steps(dtype, decoupled, wd, maximize, offset):
    p, g, m, v = (rand(SIZES, dtype, s, k, offset) for s, k in ((1, "n"), (2, "n"), (3, "small"), (4, "pos")))
    g_before = [t.clone() for t in g]
    for step in (1, 2, 3):
        kw = dict(ADAM, weight_decay=wd, decoupled=decoupled, maximize=maximize,
                  bias_correction1=1 - 0.9 ** step, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** step))
        want = [f64(x) for x in (p, g, m, v)]  # the oracle restarts from the kernel's state each step
        compiled.adam_step(p, g, m, v, **kw)
        reference.adam_step(*want, **kw)
        for got, ref, name in ((p, want[0], "param"), (m, want[2], "exp_avg"), (v, want[3], "exp_avg_sq")):
            close(got, ref, dtype, f"step {step} {name}")
    assert all(torch.equal(a, b) for a, b in zip(g, g_before))  # grads are read, never written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nesterov,wd,maximize,dampening", [(True, 0.0, False, 0.0), (False, 0.05, True, 0.0),
                                                            (False, 0.0, False, 0.3)])
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "unaligned"])
def test_sgd_momentum_step(dtype, nesterov, wd, maximize, dampening, offset):
    p, g, b = rand(SIZES, dtype, 5, offset=offset), rand(SIZES, dtype, 6, offset=offset), \
        rand(SIZES, dtype, 7, "small", offset)
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=wd, maximize=maximize, dampening=dampening)
    for _ in range(2):
        want = [f64(x) for x in (p, g, b)]
        compiled.sgd_momentum_step(p, g, b, **kw)
        reference.sgd_momentum_step(*want, **kw)
        close(p, want[0], dtype, "param")
        close(b, want[2], dtype, "momentum_buffer")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ls_save_sgd(dtype):
    p, g = rand(SIZES, dtype, 8), rand(SIZES, dtype, 9)
    w0 = [torch.full_like(t, float("nan")) for t in p]
    want = reference.ls_save_sgd(f64(p), f64(g), f64(w0))
    sums = compiled.ls_save_sgd(p, g, w0)
    sum_close(sums, want, dtype)
    for a, b in zip(w0, p):
        assert torch.equal(a, b)  # an exact copy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("with_dirs", [False, True], ids=["no-dirs", "dirs"])
def test_ls_save_adam(dtype, offset, with_dirs):
    p, g, m, v = (rand(SIZES, dtype, s, k, offset) for s, k in ((10, "n"), (11, "n"), (12, "small"), (13, "pos")))
    w0 = [torch.zeros_like(t) for t in p]
    dirs = [torch.zeros_like(t) for t in p] if with_dirs else []
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** 4))
    want = [f64(x) for x in (p, g, m, v, w0, dirs)]
    want_sums = reference.ls_save_adam(*want, **kw)
    sums = compiled.ls_save_adam(p, g, m, v, w0, dirs, **kw)
    close(dirs, want[5], dtype, "dirs")
    # Sums of float32-rounded terms vs float64 terms: relative 1e-6 is generous for fp32 opmath.
    torch.testing.assert_close(sums.cpu().double(), want_sums.double(), rtol=1e-5, atol=1e-6)
    close(m, want[2], dtype, "exp_avg")
    close(v, want[3], dtype, "exp_avg_sq")
    for a, b in zip(w0, p):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_ls_trials_and_final(dtype, offset):
    p, w0, g, m, v = (rand(SIZES, dtype, s, k, offset)
                      for s, k in ((20, "n"), (21, "n"), (22, "n"), (23, "small"), (24, "pos")))
    etas = [0.3, 0.7, 0.0, 1e-3, 2.5, 0.07, 1.0]  # one eta per tensor; tensor 2 (7 elements) gets 0
    bc1, bc2s = 1 - 0.9 ** 5, math.sqrt(1 - 0.999 ** 5)

    want = [f64(x) for x in (p, w0, g)]
    compiled.ls_trial_sgd(p, w0, g, etas)
    reference.ls_trial_sgd(*want, etas)
    close(p, want[0], dtype, "ls_trial_sgd")
    assert torch.equal(p[2], w0[2])  # eta = 0 gives w0 back exactly

    want = [f64(x) for x in (p, w0, g, v)]
    compiled.ls_trial_adam(p, w0, g, v, etas, eps=1e-8, bias_correction2_sqrt=bc2s)
    reference.ls_trial_adam(*want, etas, eps=1e-8, bias_correction2_sqrt=bc2s)
    close(p, want[0], dtype, "ls_trial_adam")

    want = [f64(x) for x in (p, w0, m, v)]
    compiled.ls_final_adam(p, w0, m, v, etas, eps=1e-8, bias_correction1=bc1, bias_correction2_sqrt=bc2s)
    reference.ls_final_adam(*want, etas, eps=1e-8, bias_correction1=bc1, bias_correction2_sqrt=bc2s)
    close(p, want[0], dtype, "ls_final_adam")


def mixed_sizes(n, seed):
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, 5, (n,), generator=gen).tolist()
    raw = torch.randint(0, 3 * CHUNK, (n,), generator=gen).tolist()
    sizes = [[0, 1 + r % 8, 1 + r % 5000, 768 * 3 + r % 4, 1 + r][k] for k, r in zip(pick, raw)]
    return sizes + [0]  # zero-size last


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_many_tensors_zero_size_last(dtype):
    """333 tensors (several launches, tensors carried across launch boundaries), then a zero-size one."""
    sizes = mixed_sizes(333, 99)
    p, g, m, v = (rand(sizes, dtype, s, k) for s, k in ((30, "n"), (31, "n"), (32, "small"), (33, "pos")))
    kw = dict(ADAM, weight_decay=0.01, decoupled=True, maximize=False, bias_correction1=0.1,
              bias_correction2_sqrt=math.sqrt(0.001))
    want = [f64(x) for x in (p, g, m, v)]
    compiled.adam_step(p, g, m, v, **kw)
    reference.adam_step(*want, **kw)
    close(p, want[0], dtype, "param")
    close(v, want[3], dtype, "exp_avg_sq")
    w0 = [torch.empty_like(t) for t in p]
    sum_close(compiled.ls_save_sgd(p, g, w0), reference.ls_save_sgd(f64(p), f64(g), f64(w0)), dtype)
    etas = [0.01 * (i % 7) for i in range(len(sizes))]
    want = [f64(x) for x in (p, w0, g)]
    compiled.ls_trial_sgd(p, w0, g, etas)
    reference.ls_trial_sgd(*want, etas)
    close(p, want[0], dtype, "ls_trial_sgd")


def test_tensor_spanning_launches():
    """One tensor of more than kMaxBlocks chunks, between small ones: continued in slot 0 of the next launch."""
    sizes = [5, MAX_BLOCKS * CHUNK + 12345, 3, 0]
    p, g, b = rand(sizes, torch.float32, 40), rand(sizes, torch.float32, 41), rand(sizes, torch.float32, 42, "small")
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0, maximize=False)
    want = [f64(x) for x in (p, g, b)]
    compiled.sgd_momentum_step(p, g, b, **kw)
    reference.sgd_momentum_step(*want, **kw)
    close(p, want[0], torch.float32, "param")
    w0 = [torch.empty_like(t) for t in p]
    sum_close(compiled.ls_save_sgd(p, g, w0), reference.ls_save_sgd(f64(p), f64(g), f64(w0)), torch.float32)


def test_uses_current_stream():
    """The kernels run on the caller's current stream: results are ordered after work queued there."""
    p, g, b = rand([278011], torch.float32, 50), rand([278011], torch.float32, 51), rand([278011], torch.float32, 52)
    want = [f64(x) for x in (p, g, b)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(10_000_000)  # keep the stream busy so a wrong-stream kernel would race ahead
        g[0].mul_(2.0)
        compiled.sgd_momentum_step(p, g, b, lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0)
        sums = compiled.ls_save_sgd(p, g, [torch.empty_like(p[0])])
    torch.cuda.synchronize()
    want[1][0].mul_(2.0)
    reference.sgd_momentum_step(*want, lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0)
    close(p, want[0], torch.float32, "param")
    sum_close(sums, reference.ls_save_sgd(want[0], want[1], f64(p)), torch.float32)


def test_cuda_graph_capture():
    """No host sync inside the ops: adam_step and ls_save_sgd capture into a CUDA graph and replay."""
    sizes = [4099, 7, 0, 1000]
    p, g, m, v = (rand(sizes, torch.float32, s, k) for s, k in ((60, "n"), (61, "n"), (62, "small"), (63, "pos")))
    w0 = [torch.empty_like(t) for t in p]
    kw = dict(ADAM, weight_decay=0.01, decoupled=True, maximize=False, bias_correction1=0.1,
              bias_correction2_sqrt=0.03)
    start = [f64(x) for x in (p, g, m, v)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (allocator) outside the graph
        compiled.adam_step(p, g, m, v, **kw)
    torch.cuda.current_stream().wait_stream(s)
    for dst, src in zip(p + m + v, start[0] + start[2] + start[3]):
        dst.copy_(src)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compiled.adam_step(p, g, m, v, **kw)
        sums = compiled.ls_save_sgd(p, g, w0)
    for dst, src in zip(p + m + v, start[0] + start[2] + start[3]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    reference.adam_step(*start, **kw)
    close(p, start[0], torch.float32, "param after replay")
    sum_close(sums, reference.ls_save_sgd(start[0], start[1], f64(w0)), torch.float32)


def _count_launches(fn):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if "multi_tensor_kernel" in e.key)


def test_launch_count():
    """One launch per MAX_TENSORS tensors (or per 320 chunks), never one per tensor."""
    n = 300
    sizes = [1000] * n + [0]
    p, g, m, v = (rand(sizes, torch.float32, s, k) for s, k in ((70, "n"), (71, "n"), (72, "small"), (73, "pos")))
    kw = dict(ADAM, weight_decay=0.0, decoupled=True, maximize=False, bias_correction1=1.0,
              bias_correction2_sqrt=1.0)
    assert _count_launches(lambda: compiled.adam_step(p, g, m, v, **kw)) == math.ceil(n / MAX_TENSORS[(4, False)])
    etas = [0.1] * len(sizes)
    assert _count_launches(lambda: compiled.ls_trial_adam(p, m, g, v, etas, eps=1e-8, bias_correction2_sqrt=1.0)) \
        == math.ceil(n / MAX_TENSORS[(4, True)])
    w0, dirs = [t.clone() for t in p], [t.clone() for t in p]
    assert _count_launches(lambda: compiled.ls_save_adam(p, g, m, v, w0, dirs, beta1=0.9, beta2=0.999, eps=1e-8,
                                                         bias_correction2_sqrt=1.0)) \
        == math.ceil(n / MAX_TENSORS[(6, False)])
    big = rand([3 * MAX_BLOCKS * CHUNK], torch.float16, 74)
    assert _count_launches(lambda: compiled.ls_trial_sgd(big, big, big, [0.0])) == 3


def test_argument_checks():
    p, g, b = rand([10, 20], torch.float32, 80), rand([10, 20], torch.float32, 81), rand([10, 20], torch.float32, 82)
    kw = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="tensors"):
        compiled.sgd_momentum_step(p, g[:1], b, **kw)
    with pytest.raises(RuntimeError, match="dtype"):
        compiled.sgd_momentum_step(p, [g[0].half(), g[1]], b, **kw)
    with pytest.raises(RuntimeError, match="elements"):
        compiled.sgd_momentum_step(p, [g[0], g[0]], b, **kw)
    with pytest.raises(RuntimeError):  # a CPU tensor among CUDA ones
        compiled.sgd_momentum_step(p, [g[0].cpu(), g[1]], b, **kw)
    with pytest.raises(RuntimeError, match="contiguous"):
        compiled.sgd_momentum_step([torch.zeros(4, 5, device="cuda").t()], [torch.zeros(5, 4, device="cuda")],
                                   [torch.zeros(5, 4, device="cuda")], **kw)
    with pytest.raises(RuntimeError, match="etas"):
        compiled.ls_trial_sgd(p, g, b, [0.1])
    with pytest.raises(RuntimeError, match="dtypes"):
        x = [torch.zeros(3, device="cuda", dtype=torch.int32)]
        compiled.ls_trial_sgd(x, x, x, [0.1])


@pytest.mark.skipif(os.environ.get("SVI_KERNELS_TEST_HUGE") != "1", reason="set SVI_KERNELS_TEST_HUGE=1 (~13 GB)")
def test_more_than_2_31_elements():
    n = 2 ** 31 + 4099
    w0 = torch.ones(n, dtype=torch.float16, device="cuda")
    g = torch.full((n,), 2.0, dtype=torch.float16, device="cuda")
    g[-5:] = 4.0
    p = torch.empty_like(w0)
    compiled.ls_trial_sgd([p], [w0], [g], [0.25])
    assert p[0].item() == 0.5 and p[2 ** 31].item() == 0.5 and p[-1].item() == 0.0
    assert int((p == 0.5).sum()) == n - 5
    sums = compiled.ls_save_sgd([p], [g], [w0])
    assert math.isclose(sums.item(), 4.0 * (n - 5) + 16.0 * 5, rel_tol=1e-6)
