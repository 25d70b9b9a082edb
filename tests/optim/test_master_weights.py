"""fp32 master weights of fp16/bf16 parameters (``master_weights=True``, AdamW and SVI).

The master run must compute exactly what an fp32 run computes from the same (rounded) start and the
same gradients: the gradients are set by hand, fp32 values that the low-precision dtype represents
exactly, so both runs see identical inputs and only the storage of the parameter differs.
"""
import copy
import io

import pytest
import torch

import svi_kernels as sk
from svi_kernels.optim import master_weights
from helpers import CPU_BACKENDS

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
SHAPES = [(7, 5), (13,), (3, 4, 2), (0, 3), (1,)]

CASES = {
    "AdamW": lambda ps, **k: sk.AdamW(ps, **{"lr": 1e-2, "weight_decay": 0.05, **k}),
    "AdamW-amsgrad-nobc": lambda ps, **k: sk.AdamW(ps, **{"lr": 1e-2, "amsgrad": True, "correct_bias": False, **k}),
    "SVI-sgd": lambda ps, **k: sk.SVI(ps, **{"lr": 5e-2, "momentum": 0.9, "weight_decay": 1e-3, **k}),
    "SVI-adam": lambda ps, **k: sk.SVI(ps, **{"lr": 1e-2, "base": "adam", "amsgrad": True, "weight_decay": 1e-3, **k}),
}


def make_params(dtype, seed=0, shapes=SHAPES):
    """Parameters of ``dtype`` and the float32 parameters holding the same (rounded) values."""
    g = torch.Generator().manual_seed(seed)
    low = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return ([torch.nn.Parameter(t) for t in low], [torch.nn.Parameter(t.float()) for t in low])


def set_grads(params, step, scale=1.0):
    """The same gradients for every run: float32 values rounded to bf16 (exact in fp16 too at this
    range), cast to each parameter's dtype; times ``scale`` (a power of two: still exact)."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        value = (torch.randn(p.shape, generator=g) * 0.3).to(torch.bfloat16).float()
        p.grad = (value * scale).to(p.dtype)


def run(params, opt, steps, start=0):
    for i in range(start, start + steps):
        set_grads(params, i)
        opt.step()


def masters(opt, params):
    return [opt.state[p]["master_param"] for p in params]


def assert_state_equal(opt_a, params_a, opt_b, params_b, keys=None):
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for k in keys if keys is not None else sb:
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k


def assert_rounded(opt, params):
    """The parameter is its master rounded to nearest, and the state is float32."""
    for p in params:
        st = opt.state[p]
        assert torch.equal(p, st["master_param"].to(p.dtype))
        for k, v in st.items():
            if k != "step":
                assert v.dtype == torch.float32, k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(CASES))
def test_master_equals_the_fp32_run(backend, dtype, case):
    low, ref = make_params(dtype)
    extra = torch.nn.Parameter(torch.randn(6))  # an fp32 param in the same group: updated directly
    low.append(extra)
    ref.append(torch.nn.Parameter(extra.detach().clone()))
    storage = [p.data_ptr() for p in low]
    opt = CASES[case](low, master_weights=True, backend=backend)
    opt_ref = CASES[case](ref, backend=backend)
    for i in range(5):
        set_grads(low, i)
        set_grads(ref, i)
        opt.step()
        opt_ref.step()
        # same fp32 math on the same inputs: bit for bit
        for p, m, r in zip(low[:-1], masters(opt, low[:-1]), ref):
            assert torch.equal(m, r)
            assert torch.equal(p, r.detach().to(dtype))
        assert torch.equal(low[-1], ref[-1])
    assert_rounded(opt, low[:-1])
    assert_state_equal(opt, low[:-1], opt_ref, ref[:-1])
    assert "master_param" not in opt.state[low[-1]]
    assert [p.data_ptr() for p in low] == storage  # updated in place, never rebound


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", ["AdamW", "SVI-sgd", "SVI-adam"])
def test_small_updates_accumulate_only_with_master_weights(dtype, case):
    """An update below half an ulp of the parameter rounds away every step without a master copy."""
    make = {
        "AdamW": lambda ps, mw: sk.AdamW(ps, lr=1e-4, weight_decay=0.0, master_weights=mw),
        "SVI-sgd": lambda ps, mw: sk.SVI(ps, lr=1e-4, momentum=0.0, nesterov=False, master_weights=mw),
        "SVI-adam": lambda ps, mw: sk.SVI(ps, lr=1e-4, base="adam", master_weights=mw),
    }[case]
    half_ulp = torch.finfo(dtype).eps / 4  # at 1.0, on the side we move to (below 1 the spacing halves)
    results = {}
    for mw in (False, True):
        p = torch.nn.Parameter(torch.ones(8, dtype=dtype))
        opt = make([p], mw)
        for _ in range(200):
            p.grad = torch.ones_like(p)  # each update is 1e-4 (Adam: lr * m_hat / sqrt(v_hat) = lr)
            opt.step()
        results[mw] = p.detach().float()
    assert 1e-4 < half_ulp
    assert torch.equal(results[False], torch.ones(8))
    expected = torch.full((8,), 1.0 - 200 * 1e-4)
    torch.testing.assert_close(results[True], expected, rtol=0, atol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_is_bit_identical(backend, case):
    low, _ = make_params(torch.bfloat16)
    opt = CASES[case](low, master_weights=True, backend=backend)
    run(low, opt, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in low]
    run(low, opt, 3, start=3)

    opt2 = CASES[case](resumed, master_weights=True, backend=backend)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert_rounded(opt2, resumed)  # not cast to bf16 by Optimizer.load_state_dict
    run(resumed, opt2, 3, start=3)
    for a, b in zip(low, resumed):
        assert torch.equal(a, b)
    assert_state_equal(opt, low, opt2, resumed)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_without_masters_resumes_with_them(case):
    """The master is created at the first step after the load, from the parameter; the moments
    become float32. Expected: an fp32 run from the same values (torch casts the moments to fp32)."""
    low, ref = make_params(torch.bfloat16)
    opt = CASES[case](low)
    run(low, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_ref = CASES[case](ref)
    opt_ref.load_state_dict(copy.deepcopy(saved))

    opt2 = CASES[case](low, master_weights=True)
    opt2.load_state_dict(saved)
    assert all(g["master_weights"] for g in opt2.param_groups)  # the optimizer's setting, not the checkpoint's
    run(low, opt2, 3, start=2)
    run(ref, opt_ref, 3, start=2)
    for m, r in zip(masters(opt2, low), ref):
        assert torch.equal(m, r)
    assert_rounded(opt2, low)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_with_masters_into_optimizer_without(case):
    low, _ = make_params(torch.bfloat16)
    opt = CASES[case](low, master_weights=True)
    run(low, opt, 2)
    opt2 = CASES[case](low)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not any(g["master_weights"] for g in opt2.param_groups)
    run(low, opt2, 2, start=2)
    for p in low:
        st = opt2.state[p]
        assert "master_param" not in st
        assert all(v.dtype == torch.bfloat16 for k, v in st.items() if k != "step")


def test_switching_master_weights_on_mid_run():
    """Set in the param group after some steps: masters and fp32 moments from that step on."""
    low, ref = make_params(torch.bfloat16)
    opt = sk.AdamW(low, lr=1e-2)
    run(low, opt, 2)
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_ref = sk.AdamW(ref, lr=1e-2)
    for p, r in zip(low, ref):
        opt_ref.state[r] = {k: v.clone() if k == "step" else v.float() for k, v in opt.state[p].items()}
    opt.param_groups[0]["master_weights"] = True
    run(low, opt, 2, start=2)
    run(ref, opt_ref, 2, start=2)
    for m, r in zip(masters(opt, low), ref):
        assert torch.equal(m, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", list(CASES))
def test_grad_scale_and_found_inf(backend, dtype, case):
    """The tensor path as GradScaler drives it: grads scaled by a power of two are unscaled in the
    kernel (same result as unscaled grads, p.grad ends unscaled), and found_inf skips the step:
    params, masters, moments and steps unchanged."""
    scale = 2.0 ** 10
    low, _ = make_params(dtype)
    plain = [torch.nn.Parameter(p.detach().clone()) for p in low]
    opt = CASES[case](low, master_weights=True, backend=backend)
    opt_plain = CASES[case](plain, master_weights=True, backend=backend)
    for i in range(3):
        set_grads(low, i, scale=scale)
        set_grads(plain, i)
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        opt_plain.step()
        for a, b in zip(low, plain):
            assert torch.equal(a.grad, b.grad)
    tol = dict(rtol=0, atol=0) if backend == "cpu" else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(masters(opt, low), masters(opt_plain, plain)):
        torch.testing.assert_close(a, b, **tol)
    assert_rounded(opt, low)

    before = [p.detach().clone() for p in low]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in low]
    set_grads(low, 9, scale=scale)
    low[0].grad.view(-1)[2] = float("inf")
    scaled = [p.grad.clone() for p in low]
    opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, b, st, g in zip(low, before, state, scaled):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, g)
        assert set(opt.state[p]) == set(st)
        for k, v in opt.state[p].items():
            assert torch.equal(v, st[k]), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_skips_an_overflowing_step(backend):
    low, _ = make_params(torch.float16)
    opt = sk.AdamW(low, lr=1e-2, master_weights=True, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(torch.ones(()))  # creates the scale; the grads below stand for those of a scaled loss
    for i in range(2):
        set_grads(low, i, scale=scaler.get_scale())
        scaler.step(opt)
        scaler.update()
    before = [p.detach().clone() for p in low]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in low]
    set_grads(low, 5, scale=scaler.get_scale())
    low[1].grad[0] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 7
    for p, b, st in zip(low, before, state):
        assert torch.equal(p, b)
        for k, v in opt.state[p].items():
            assert torch.equal(v, st[k]), k
    assert_rounded(opt, low)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_capturable_matches_float_path(backend, case):
    a, _ = make_params(torch.bfloat16)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = CASES[case](a, lr=torch.tensor(1e-2), master_weights=True, capturable=True, backend=backend)
    opt_b = CASES[case](b, lr=torch.tensor(1e-2), master_weights=True, backend=backend)
    run(a, opt_a, 4)
    run(b, opt_b, 4)
    tol = dict(rtol=0, atol=0) if backend == "cpu" else dict(rtol=1e-6, atol=1e-7)
    for ma, mb in zip(masters(opt_a, a), masters(opt_b, b)):
        torch.testing.assert_close(ma, mb, **tol)
    assert_rounded(opt_a, a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_params_ignore_the_flag(dtype, case):
    a, _ = make_params(dtype)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = CASES[case](a, master_weights=True), CASES[case](b)
    run(a, opt_a, 3)
    run(b, opt_b, 3)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        assert "master_param" not in opt_a.state[pa]
    assert_state_equal(opt_a, a, opt_b, b)


@pytest.mark.parametrize("case", ["AdamW", "SVI-sgd"])
def test_chunked_master_update_is_the_same(case, monkeypatch):
    """The fp32 grad copies are made a bounded chunk at a time; chunking changes nothing."""
    a, _ = make_params(torch.bfloat16, shapes=[(40,), (7, 9), (100,), (3,), (64,)])
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = CASES[case](a, master_weights=True), CASES[case](b, master_weights=True)
    run(b, opt_b, 3)
    monkeypatch.setattr(master_weights, "MASTER_CHUNK_NUMEL", 64)
    calls = []
    original = master_weights._chunks
    monkeypatch.setattr(master_weights, "_chunks", lambda *args: calls.append(1) or original(*args))
    chunks = list(original(list(range(5)), a))
    assert len(chunks) >= 4 and sorted(i for c in chunks for i in c) == list(range(5))
    run(a, opt_a, 3)
    assert calls
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    assert_state_equal(opt_a, a, opt_b, b)


def test_non_contiguous_low_precision_param():
    """A transposed bf16 parameter: the master keeps its strides (reference path), same result."""
    base = torch.randn(6, 4).to(torch.bfloat16)
    a = torch.nn.Parameter(base.t())
    b = torch.nn.Parameter(base.t().contiguous())
    opt_a, opt_b = sk.AdamW([a], lr=1e-2, master_weights=True), sk.AdamW([b], lr=1e-2, master_weights=True)
    for i in range(3):
        set_grads([a, b], i)
        b.grad = a.grad.contiguous()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    assert opt_a.state[a]["master_param"].stride() == a.stride()


@pytest.mark.parametrize("make", [sk.AdamW, sk.SVI], ids=["AdamW", "SVI"])
@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_master_weights_must_be_a_mode(make, bad):
    # (issue 24: the modes False, True, "kahan", "8bit", "stochastic"; tests/optim/test_master_modes.py)
    with pytest.raises(ValueError, match=r"Invalid master_weights .*allowed values are False, True, 'kahan'"):
        make([torch.nn.Parameter(torch.zeros(2))], master_weights=bad)


def test_torch_adamw_checkpoint_defaults_to_no_master():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    t = torch.optim.AdamW([p], lr=1e-2)
    p.grad = torch.ones_like(p)
    t.step()
    opt = sk.AdamW([p], lr=1e-2)
    opt.load_state_dict(t.state_dict())
    assert opt.param_groups[0]["master_weights"] is False
    opt.step()
    assert "master_param" not in opt.state[p]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_capturable_master_step_reads_nothing_back(backend, case, monkeypatch):
    """The grad conversion and the copy back add no host read (CUDA graphs need none)."""
    low, _ = make_params(torch.bfloat16)
    opt = CASES[case](low, lr=torch.tensor(1e-2), master_weights=True, capturable=True, backend=backend)
    run(low, opt, 1)  # creates the masters and moments
    reads = []
    for name in ("tolist", "item", "__float__", "__bool__", "__int__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, **k: reads.append(1) or _o(self, *a, **k))
    set_grads(low, 1)
    opt.step()
    monkeypatch.undo()
    assert not reads
    assert_rounded(opt, low)
