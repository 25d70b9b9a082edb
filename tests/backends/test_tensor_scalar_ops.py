"""The AMP / capturable ops (adam_step_tensor, sgd_momentum_step_tensor) of every available backend
against the plain PyTorch reference run on float64 copies.

lr may be a number or a tensor; the step counts, the loss scale (grad_scale) and the skip flag
(found_inf) are tensors that the kernels read in place. Odd and zero sizes, many tensors, each
tensor with its own step count; found_inf = 1 leaves every tensor (grads included) untouched;
grad_scale unscales the gradients in place.
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


def scalar(value, device, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, device=device)


def steps_for(n, device, first=1):
    """A different step count per tensor (the bias corrections are per parameter)."""
    return [scalar(float(first + 3 * i), device) for i in range(n)]


def cpu_copy(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


ADAM_CASES = [
    # lr as tensor, AMP (grad_scale + found_inf = 0), correct_bias, decoupled, weight decay, maximize
    dict(lr_tensor=True, amp=True, correct_bias=True, decoupled=True, weight_decay=0.01, maximize=False),
    dict(lr_tensor=False, amp=True, correct_bias=True, decoupled=False, weight_decay=0.1, maximize=True),
    dict(lr_tensor=True, amp=False, correct_bias=True, decoupled=True, weight_decay=0.0, maximize=False),
    dict(lr_tensor=True, amp=True, correct_bias=False, decoupled=True, weight_decay=0.01, maximize=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
def test_adam_step_tensor(backend, dtype, case):
    c = ADAM_CASES[case]
    dev = _device_for(backend)
    p, g, m, v = lists_for(SIZES, dtype, dev, 110 + case, ["n", "scaled" if c["amp"] else "n", "small", "pos"])
    steps = steps_for(len(SIZES), dev)
    want = [f64(x) for x in (p, g, m, v)]
    lr = scalar(3e-3, dev) if c["lr_tensor"] else 3e-3
    amp = dict(grad_scale=scalar(1024.0, dev), found_inf=scalar(0.0, dev)) if c["amp"] else {}
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=c["weight_decay"], decoupled=c["decoupled"],
              correct_bias=c["correct_bias"], maximize=c["maximize"])
    get(backend).adam_step_tensor(p, g, m, v, steps, lr=lr, **kw, **amp)
    reference.adam_step_tensor(*want, [s.cpu() for s in steps], lr=cpu_copy(lr), **kw,
                               **{k: t.cpu() for k, t in amp.items()})
    for got, ref, name in zip((p, g, m, v), want, ("param", "grad", "exp_avg", "exp_avg_sq")):
        assert_close(got, ref, dtype, name)
    assert [float(s) for s in steps] == [float(1 + 3 * i) for i in range(len(SIZES))], "the op reads steps only"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nesterov,wd,maximize,lr_tensor,amp", [
    (True, 0.0, False, True, True), (False, 0.05, True, False, True), (True, 0.01, False, True, False)])
def test_sgd_momentum_step_tensor(backend, dtype, nesterov, wd, maximize, lr_tensor, amp):
    dev = _device_for(backend)
    p, g, b = lists_for(SIZES, dtype, dev, 120, ["n", "scaled" if amp else "n", "small"])
    want = [f64(x) for x in (p, g, b)]
    lr = scalar(0.05, dev) if lr_tensor else 0.05
    scaling = dict(grad_scale=scalar(1024.0, dev), found_inf=scalar(0.0, dev)) if amp else {}
    kw = dict(momentum=0.9, nesterov=nesterov, weight_decay=wd, maximize=maximize)
    get(backend).sgd_momentum_step_tensor(p, g, b, lr=lr, **kw, **scaling)
    reference.sgd_momentum_step_tensor(*want, lr=cpu_copy(lr), **kw, **{k: t.cpu() for k, t in scaling.items()})
    for got, ref, name in zip((p, g, b), want, ("param", "grad", "momentum_buffer")):
        assert_close(got, ref, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_found_inf_leaves_everything_untouched(backend, dtype):
    dev = _device_for(backend)
    p, g, m, v = lists_for(SIZES, dtype, dev, 130, ["n", "scaled", "small", "pos"])
    g[3][5] = float("inf")
    steps = steps_for(len(SIZES), dev)
    before = [[t.clone() for t in lst] for lst in (p, g, m, v)]
    amp = dict(grad_scale=scalar(1024.0, dev), found_inf=scalar(1.0, dev))
    impl = get(backend)
    impl.adam_step_tensor(p, g, m, v, steps, lr=scalar(1e-2, dev), beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.01, decoupled=True, correct_bias=True, **amp)
    impl.sgd_momentum_step_tensor(p, g, m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, **amp)
    for lst, old, name in zip((p, g, m, v), before, ("param", "grad", "exp_avg/buffer", "exp_avg_sq")):
        for i, (a, b) in enumerate(zip(lst, old)):
            assert torch.equal(a, b), f"{name}[{i}] changed although found_inf = 1"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_grad_scale_unscales_in_place(backend, dtype):
    dev = _device_for(backend)
    p, g, m, v = lists_for([5, 0, 3001], dtype, dev, 140, ["n", "scaled", "small", "pos"])
    scaled = [t.clone() for t in g]
    get(backend).adam_step_tensor(p, g, m, v, steps_for(3, dev), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                  weight_decay=0.0, decoupled=True, correct_bias=True,
                                  grad_scale=scalar(1024.0, dev), found_inf=None)
    for a, b in zip(g, scaled):  # a power-of-two scale divides exactly
        assert torch.equal(a, b / 1024.0)
    b = [torch.zeros_like(t) for t in p]
    scaled = [t * 8 for t in g]
    g = [t.clone() for t in scaled]
    get(backend).sgd_momentum_step_tensor(p, g, b, lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0,
                                          grad_scale=scalar(8.0, dev))
    for a, s in zip(g, scaled):
        assert torch.equal(a, s / 8.0)


def test_tensor_op_matches_float_op(backend):
    """No AMP, one step count for all: the tensor op is the float op with in-kernel bias corrections."""
    dev = _device_for(backend)
    p, g, m, v = lists_for(SIZES, torch.float32, dev, 150, ["n", "n", "small", "pos"])
    q, h, mq, vq = [[t.clone() for t in lst] for lst in (p, g, m, v)]
    step, lr = 7, 1e-2
    impl = get(backend)
    impl.adam_step_tensor(p, g, m, v, [scalar(float(step), dev) for _ in SIZES], lr=scalar(lr, dev), beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, correct_bias=True)
    lr32 = float(torch.tensor(lr, dtype=torch.float32))  # the float path reads a float32 tensor lr like this
    impl.adam_step(q, h, mq, vq, lr=lr32, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
                   bias_correction1=1 - 0.9 ** step, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** step))
    exact = backend in ("cpu", "cuda")  # same double arithmetic; Triton's interpreter has no exact pow
    for a, b in zip(p + m + v, q + mq + vq):
        if exact and dev == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_many_tensors_one_call(backend):
    dev = _device_for(backend)
    gen = torch.Generator().manual_seed(17)
    sizes = [int(x) for x in torch.randint(0, 700, (317,), generator=gen)]
    p, g, m, v = lists_for(sizes, torch.float32, dev, 160, ["n", "scaled", "small", "pos"])
    steps = steps_for(len(sizes), dev)
    want = [f64(x) for x in (p, g, m, v)]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, correct_bias=True)
    get(backend).adam_step_tensor(p, g, m, v, steps, lr=scalar(1e-2, dev), grad_scale=scalar(1024.0, dev),
                                  found_inf=scalar(0.0, dev), **kw)
    reference.adam_step_tensor(*want, [s.cpu() for s in steps], lr=torch.tensor(1e-2),
                               grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0), **kw)
    assert_close(p, want[0], torch.float32, "param")
    assert_close(v, want[3], torch.float32, "exp_avg_sq")


def test_empty_lists(backend):
    dev = _device_for(backend)
    impl = get(backend)
    impl.adam_step_tensor([], [], [], [], [], lr=scalar(1e-3, dev), beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, decoupled=True, correct_bias=True, grad_scale=scalar(2.0, dev),
                          found_inf=scalar(0.0, dev))
    impl.sgd_momentum_step_tensor([], [], [], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)
    z = [torch.zeros(0, device=dev)]
    impl.adam_step_tensor(z, z, z, z, [scalar(1.0, dev)], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, decoupled=True, correct_bias=True)


def test_compiled_op_argument_checks():
    if not AVAILABLE["cpu"]["available"]:
        pytest.skip(AVAILABLE["cpu"]["reason"])
    p = [torch.randn(5)]
    ops = torch.ops.svi_kernels
    args = (1e-3, None, 0.9, 0.999, 1e-8, 0.0, True, True, False, None, None)
    with pytest.raises(RuntimeError, match="state_steps has 0 values"):
        ops.adam_step_tensor(p, p, [torch.zeros(5)], [torch.ones(5)], [], *args)
    with pytest.raises(RuntimeError, match="one element"):
        ops.adam_step_tensor(p, p, [torch.zeros(5)], [torch.ones(5)], [torch.ones(2)], *args)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.sgd_momentum_step_tensor(p, p, [torch.zeros(5)], 0.1, torch.tensor(1), 0.9, True, 0.0, False, None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_cuda_graph_capture_and_replay(name):
    """No host read inside the ops: captured once, replayed with new lr / scale / skip values."""
    if not AVAILABLE[name]["available"]:
        pytest.skip(AVAILABLE[name]["reason"])
    impl = get(name)
    p, g, m, v = lists_for([5, 70001, 0, 33], torch.float32, "cuda", 170, ["n", "scaled", "small", "pos"])
    steps = steps_for(4, "cuda")
    lr, scale, found = scalar(1e-2, "cuda"), scalar(1024.0, "cuda"), scalar(0.0, "cuda")
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, correct_bias=True)
    g_saved = [t.clone() for t in g]

    def step():
        impl.adam_step_tensor(p, g, m, v, steps, lr=lr, grad_scale=scale, found_inf=found, **kw)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (Triton compiles, tables are cached)
    torch.cuda.current_stream().wait_stream(s)
    for t, saved in zip(g, g_saved):
        t.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lr, skip in ((1e-2, 0.0), (5e-3, 1.0), (2e-3, 0.0)):
        lr.fill_(new_lr)
        found.fill_(skip)
        for t, saved in zip(g, g_saved):
            t.copy_(saved)
        want = [f64(x) for x in (p, g, m, v)]
        graph.replay()
        torch.cuda.synchronize()
        reference.adam_step_tensor(*want, [st.cpu() for st in steps], lr=new_lr, grad_scale=torch.tensor(1024.0),
                                   found_inf=torch.tensor(skip), **kw)
        assert_close(p, want[0], torch.float32, f"param (lr={new_lr}, skip={skip})")
        assert_close(g, want[1], torch.float32, "grad")


def test_ops_trace_with_fake_tensors():
    """Fake kernels are registered, so torch.compile can trace the tensor ops."""
    if not AVAILABLE["cpu"]["available"]:
        pytest.skip(AVAILABLE["cpu"]["reason"])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p = [torch.empty(5), torch.empty(3)]
        one = torch.empty(())
        torch.ops.svi_kernels.adam_step_tensor(p, p, p, p, [one, one], 0.0, one, 0.9, 0.999, 1e-8, 0.0, True, True,
                                               False, one, one)
        torch.ops.svi_kernels.sgd_momentum_step_tensor(p, p, p, 0.1, None, 0.9, True, 0.0, False, None, one)
