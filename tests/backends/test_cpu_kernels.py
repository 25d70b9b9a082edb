"""CPU-specific checks of the compiled kernels (csrc/cpu): input validation, deterministic
reductions, chunk boundaries, float64 math and the instruction-set builds.

Numerical parity of every op against the float64 reference lives in test_ops_parity.py.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from svi_kernels.backends import backends, reference

CPU = backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU["available"], reason=f"cpu backend: {CPU['reason']}")

CHUNK = 32768  # kChunkElems in csrc/cpu/multi_tensor.h
ADAM_KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
               bias_correction1=1 - 0.9 ** 3, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** 3), maximize=False)


def rand(sizes, dtype=torch.float32, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        t = torch.randn(n, generator=gen, dtype=torch.float64)
        out.append((t.abs() * 0.01 + 1e-3 if positive else t).to(dtype))
    return out


def adam_lists(sizes, dtype=torch.float32, seed=0):
    return (rand(sizes, dtype, seed), rand(sizes, dtype, seed + 1), rand(sizes, dtype, seed + 2),
            rand(sizes, dtype, seed + 3, positive=True))


def f64(ts):
    return [t.double().clone() for t in ts]


# ------------------------------------------------------------------ input validation
def test_mismatched_list_lengths(cpu):
    p, g, m, v = adam_lists([3, 4])
    with pytest.raises(RuntimeError, match=r"params has 2 tensors but grads has 1"):
        cpu.adam_step(p, g[:1], m, v, **ADAM_KW)


def test_mismatched_numel(cpu):
    p, g, w0 = rand([3, 4]), rand([3, 5]), rand([3, 4])
    with pytest.raises(RuntimeError, match=r"grads\[1\] has 5 elements but params\[1\] has 4"):
        cpu.ls_save_sgd(p, g, w0)


def test_non_contiguous(cpu):
    p, g, w0 = rand([8]), [torch.randn(16)[::2]], rand([8])
    with pytest.raises(RuntimeError, match=r"grads\[0\] is not contiguous"):
        cpu.ls_save_sgd(p, g, w0)
    t = torch.randn(4, 6).t()
    with pytest.raises(RuntimeError, match=r"params\[0\] is not contiguous"):
        cpu.sgd_momentum_step([t], [torch.randn(6, 4)], [torch.zeros(6, 4)], lr=0.1, momentum=0.9,
                              nesterov=False, weight_decay=0.0)


def test_mixed_dtypes(cpu):
    p, g, m, v = adam_lists([5, 6])
    m[1] = m[1].half()
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has dtype Half but params\[0\] has Float"):
        cpu.adam_step(p, g, m, v, **ADAM_KW)


def test_complex_rejected(cpu):
    c = [torch.randn(4, dtype=torch.complex64)]
    with pytest.raises(RuntimeError, match=r"complex"):
        cpu.ls_trial_sgd(c, [x.clone() for x in c], [x.clone() for x in c], [0.1])


def test_integer_rejected(cpu):
    i = [torch.arange(4)]
    with pytest.raises(RuntimeError, match=r"supported dtypes are float32, float64, float16 and bfloat16"):
        cpu.ls_save_sgd(i, [x.clone() for x in i], [x.clone() for x in i])


def test_sparse_rejected(cpu):
    p = rand([5])
    g = [torch.randn(5).to_sparse()]
    with pytest.raises(RuntimeError, match=r"grads\[0\] has layout Sparse.*dense"):
        cpu.sgd_momentum_step(p, g, [torch.zeros(5)], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)


def test_eta_count(cpu):
    p, w0, g = rand([3, 4]), rand([3, 4]), rand([3, 4])
    with pytest.raises(RuntimeError, match=r"etas has 1 values but there are 2 tensors"):
        cpu.ls_trial_sgd(p, w0, g, [0.1])


def test_empty_lists_return_float32(cpu):
    out = cpu.ls_save_adam([], [], [], [], [], [], beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=1.0)
    assert out.dtype == torch.float32 and out.shape == (0,)
    cpu.ls_final_adam([], [], [], [], [], eps=1e-8, bias_correction1=1.0, bias_correction2_sqrt=1.0)


# ------------------------------------------------------------------ determinism of the reductions
@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reductions_independent_of_thread_count(cpu, restore_threads, dtype):
    sizes = [5 * CHUNK + 123, 7, 0, 100_003, 3 * CHUNK]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        p, g, m, v = adam_lists(sizes, dtype, seed=5)
        w0 = [torch.empty_like(t) for t in p]
        s_sgd = cpu.ls_save_sgd(p, g, w0)
        s_adam = cpu.ls_save_adam(p, g, m, v, w0, [], beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=0.05)
        results.append((s_sgd, s_adam, m, v))
    for s_sgd, s_adam, m, v in results[1:]:
        assert torch.equal(s_sgd, results[0][0])
        assert torch.equal(s_adam, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(m, results[0][2]))
        assert all(torch.equal(a, b) for a, b in zip(v, results[0][3]))


# ------------------------------------------------------------------ chunk boundaries and alignment
def _offset_views(sizes, dtype, seed, offset):
    """Contiguous tensors whose data starts `offset` elements into a buffer (unaligned loads)."""
    return [t[offset:] for t in rand([n + offset for n in sizes], dtype, seed)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [0, 3])
def test_chunk_boundaries(cpu, dtype, offset):
    # Sizes just below/at/above one and two chunks, small tensors packed before a large one,
    # and odd tails that exercise the scalar loop after the vector body.
    sizes = [CHUNK - 1, CHUNK, CHUNK + 1, 5, 11, 2 * CHUNK + 17, 1, CHUNK // 2 + 3, 3 * CHUNK - 5]
    p = _offset_views(sizes, dtype, 1, offset)
    g = _offset_views(sizes, dtype, 2, offset)
    m = _offset_views(sizes, dtype, 3, offset)
    v = [t.abs() * 0.01 + 1e-3 for t in _offset_views(sizes, dtype, 4, offset)]
    want = [f64(x) for x in (p, g, m, v)]
    cpu.adam_step(p, g, m, v, **ADAM_KW)
    reference.adam_step(*want, **ADAM_KW)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    for got, ref in zip(p + m + v, want[0] + want[2] + want[3]):
        torch.testing.assert_close(got.double(), ref.to(dtype).double(), rtol=tol, atol=tol)

    w0 = [torch.empty_like(t) for t in p]
    sums = cpu.ls_save_sgd(p, g, w0)
    ref_sums = torch.tensor([float((x.to(dtype).float().double() ** 2).sum()) for x in want[1]],
                            dtype=torch.float64)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(w0, p))


def test_many_tiny_tensors_then_a_large_one(cpu):
    sizes = [1] * 500 + [3 * CHUNK + 1] + [2] * 50
    p, g, m, v = adam_lists(sizes, seed=11)
    want = [f64(x) for x in (p, g, m, v)]
    cpu.adam_step(p, g, m, v, **ADAM_KW)
    reference.adam_step(*want, **ADAM_KW)
    for got, ref in zip(p, want[0]):
        torch.testing.assert_close(got.double(), ref.float().double(), rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------ float64 uses double math
SPLITS = [[517, 483], [1, 15, 17, 967], [999, 1], [1000]]  # segment ends inside and between vectors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("op", ["adam", "adam_amsgrad", "sgd_momentum", "ls_trial_adam"])
def test_element_bits_do_not_depend_on_where_a_segment_ends(cpu, dtype, op):
    """The same 1000 values as one tensor or as several (a shard's or a chunk's split): the same bits.
    The tail of a segment runs through the vector code on a zero-padded copy (vec_helpers.h), so where a
    tensor ends cannot change an element's operations; the AVX builds contract to FMA in vector code,
    and a scalar tail gave another last bit (7 elements of AdamW's 1000 after 30 steps, issue 24)."""
    gen = torch.Generator().manual_seed(3)
    base = {k: torch.randn(1000, generator=gen, dtype=torch.float64) for k in ("p", "g", "m")}
    base["v"] = torch.rand(1000, generator=gen, dtype=torch.float64) + 0.1
    state_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    results = []
    for sizes in SPLITS:
        L = {k: [t.to(dtype if k in ("p", "g") else state_dtype).clone() for t in v.split(sizes)]
             for k, v in base.items()}
        vmax = [t.clone() for t in L["v"]]
        for step in range(1, 6):
            kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
                      bias_correction1=1 - 0.9 ** step, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** step),
                      maximize=False)
            if op == "adam":
                cpu.adam_step(L["p"], L["g"], L["m"], L["v"], lr=3e-2, **kw)
            elif op == "adam_amsgrad":
                cpu.adam_step(L["p"], L["g"], L["m"], L["v"], lr=3e-2, max_exp_avg_sqs=vmax, **kw)
            elif op == "sgd_momentum":
                cpu.sgd_momentum_step(L["p"], L["g"], L["m"], lr=3e-2, momentum=0.9, weight_decay=0.01,
                                      dampening=0.0, nesterov=True, maximize=False)
            else:
                cpu.ls_trial_adam(L["p"], L["p"], L["g"], L["v"], [0.3] * len(sizes), eps=1e-8,
                                  bias_correction2_sqrt=0.5)
        results.append({k: torch.cat(v) for k, v in L.items()})
    for sizes, r in zip(SPLITS[1:], results[1:]):
        for k in r:
            diff = (r[k] != results[0][k]).nonzero().flatten().tolist()
            assert not diff, f"{k} split {sizes}: elements {diff[:8]} differ from the split {SPLITS[0]}"


def test_float64_all_ops(cpu):
    sizes = [1, 7, 4099, CHUNK + 9]
    tol = dict(rtol=1e-12, atol=1e-12)
    p, g, m, v = adam_lists(sizes, torch.float64, seed=21)
    w0, dirs = [torch.empty_like(t) for t in p], [torch.empty_like(t) for t in p]
    want = [f64(x) for x in (p, g, m, v, w0, dirs)]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=0.05)
    torch.testing.assert_close(cpu.ls_save_adam(p, g, m, v, w0, dirs, **kw), reference.ls_save_adam(*want, **kw))
    for got, ref in zip(dirs, want[5]):
        torch.testing.assert_close(got, ref, **tol)
    etas = [0.5, 0.1, 1e-3, 2.0]
    cpu.ls_trial_adam(p, w0, g, v, etas, eps=1e-8, bias_correction2_sqrt=0.05)
    reference.ls_trial_adam(want[0], want[4], want[1], want[3], etas, eps=1e-8, bias_correction2_sqrt=0.05)
    cpu.ls_final_adam(p, w0, m, v, etas, eps=1e-8, bias_correction1=0.27, bias_correction2_sqrt=0.05)
    reference.ls_final_adam(want[0], want[4], want[2], want[3], etas, eps=1e-8, bias_correction1=0.27,
                            bias_correction2_sqrt=0.05)
    cpu.sgd_momentum_step(p, g, m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    reference.sgd_momentum_step(want[0], want[1], want[2], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for got, ref in zip(p + m + v, want[0] + want[2] + want[3]):
        torch.testing.assert_close(got, ref, **tol)


# ------------------------------------------------------------------ instruction-set builds
def test_isa_is_reported():
    import svi_kernels._C as C
    assert C.cpu_isa() in ("default", "avx2", "avx512")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux",
                    reason="the AVX builds exist for x86-64 Linux (GCC)")
def test_simd_build_used_when_torch_uses_one():
    import svi_kernels._C as C
    torch_isa = torch.backends.cpu.get_cpu_capability()
    if torch_isa not in ("AVX2", "AVX512"):
        pytest.skip(f"torch runs its {torch_isa} kernels here")
    assert C.cpu_isa() == torch_isa.lower(), (
        f"torch uses {torch_isa} but the CPU kernels run the {C.cpu_isa()!r} build; "
        "was svi_kernels._C compiled by a compiler without GCC target pragmas (see docs/kernels.md)?")


_BASELINE_SCRIPT = textwrap.dedent("""
    import math, torch
    import svi_kernels._C as C
    from svi_kernels.backends import get, reference
    assert C.cpu_isa() == "default", C.cpu_isa()
    cpu = get("cpu")
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)):
        sizes = [7, 4099, 40000]
        p, g, m = ([torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes] for _ in range(3))
        v = [torch.rand(n, generator=gen, dtype=torch.float64).to(dtype) * 0.01 + 1e-3 for n in sizes]
        want = [[t.double().clone() for t in x] for x in (p, g, m, v)]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
                  bias_correction1=0.1, bias_correction2_sqrt=0.05, maximize=False)
        cpu.adam_step(p, g, m, v, **kw)
        reference.adam_step(*want, **kw)
        for a, b in zip(p + v, want[0] + want[3]):
            torch.testing.assert_close(a.double(), b.to(dtype).double(), rtol=tol, atol=tol)
        w0 = [torch.empty_like(t) for t in p]
        s = cpu.ls_save_sgd(p, g, w0)
        r = torch.tensor([float((t.to(dtype).float().double() ** 2).sum()) for t in want[1]],
                         dtype=torch.float64)
        torch.testing.assert_close(s.double(), r, rtol=1e-5, atol=1e-6)
    print("ok")
""")


def test_baseline_build_matches_reference():
    """ATEN_CPU_CAPABILITY=default selects the baseline (non-AVX) build; it must agree too."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# ------------------------------------------------------------------ step counters
def test_increment_steps_matches_foreach_add():
    from svi_kernels.backends import compiled
    from svi_kernels.optim import step_counters
    ours = [torch.tensor(float(k), dtype=dt) for k, dt in zip(range(7), [torch.float32, torch.float64] * 4)]
    ours.append(torch.tensor(16777216.0))  # 2**24: float32 rounds 2**24 + 1 back down, as torch's add_ does
    theirs = [t.clone() for t in ours]
    versions = [t._version for t in ours]
    values = compiled.increment_steps(ours)
    torch._foreach_add_(theirs, 1)
    assert values == [t.item() for t in theirs] and values[-1] == 16777216.0
    for a, b, v in zip(ours, theirs, versions):
        assert a.dtype == b.dtype and torch.equal(a, b) and a._version > v  # in place, version bumped
    assert step_counters.next_step_values(ours) == [v + 1 for v in values[:-1]] + [16777216.0]
    assert compiled.increment_steps([]) == []


@pytest.mark.parametrize("bad,match", [(torch.tensor([1.0, 2.0]), "one-element"),
                                       (torch.tensor(3, dtype=torch.int64), "float32 or float64")])
def test_increment_steps_refuses_bad_counters_before_changing_any(bad, match):
    from svi_kernels.backends import compiled
    good = torch.tensor(5.0)
    with pytest.raises(RuntimeError, match=match):
        compiled.increment_steps([good, bad])
    assert good.item() == 5.0
