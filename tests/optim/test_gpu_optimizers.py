"""Every optimizer on CUDA tensors with the GPU backends ("cuda" C++/CUDA kernels, compiled Triton)
against the same optimizer with the plain-PyTorch reference backend on the same GPU.

Skipped without a CUDA device (CI has none; a GPU-lent session runs .ci/gpu_session.sh). The CPU
tests of tests/optim cover the same optimizers on the reference/cpu backends and, under the
Triton interpreter, on Triton; these check the compiled GPU paths end to end: grouping, state,
per-tensor step sizes of the line searches and the PLASLS per-group etas on the device.
"""
import copy

import pytest
import torch

import svi_kernels as sk
from svi_kernels.backends import backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_AV = backends()
GPU_BACKENDS = [pytest.param(b, marks=[] if _AV[b]["available"] else [pytest.mark.skip(reason=_AV[b]["reason"])])
                for b in ("cuda", "triton")]


def mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.GELU(), torch.nn.Linear(33, 17), torch.nn.Tanh(),
                               torch.nn.Linear(17, 5)).to(device="cuda", dtype=dtype)


def data(i, dtype):
    g = torch.Generator().manual_seed(100 + i)
    return (torch.randn(64, 13, generator=g, dtype=dtype).cuda(), torch.randint(0, 5, (64,), generator=g).cuda())


def loss_of(model, i):
    x, y = data(i, next(model.parameters()).dtype)
    return torch.nn.functional.cross_entropy(model(x), y)


def run(model, opt, steps, closure_based):
    for i in range(steps):
        opt.zero_grad()
        if closure_based:
            opt.step(lambda i=i: loss_of(model, i))  # step() calls backward on the first evaluation
        else:
            loss_of(model, i).backward()
            opt.step()


PLAIN = {
    "AdamW": (lambda ps, b: sk.AdamW(ps, lr=1e-2, weight_decay=0.05, backend=b)),
    "AdamW-amsgrad-maximize": (lambda ps, b: sk.AdamW(ps, lr=1e-3, amsgrad=True, maximize=True, backend=b)),
    "SVI-sgd": (lambda ps, b: sk.SVI(ps, lr=0.05, momentum=0.9, weight_decay=0.01, backend=b)),
    "SVI-adam": (lambda ps, b: sk.SVI(ps, lr=1e-2, base="adam", backend=b)),
}
LINE_SEARCH = {
    "ArmijoSGD": (lambda m, b: sk.ArmijoSGD(m.parameters(), n_batches_per_epoch=10, backend=b)),
    "AdamSLS": (lambda m, b: sk.AdamSLS(m.parameters(), n_batches_per_epoch=10, backend=b)),
    "LayerwiseAdamSLS": (lambda m, b: sk.LayerwiseAdamSLS(
        [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters())},
         {"params": list(m[4].parameters())}], n_batches_per_epoch=10, backend=b)),
}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_optimizers_match_reference_on_gpu(name, backend, dtype):
    make = PLAIN[name]
    m1 = mlp(dtype)
    m2 = copy.deepcopy(m1)
    o1, o2 = make(m1.parameters(), backend), make(m2.parameters(), "reference")
    run(m1, o1, 5, False)
    run(m2, o2, 5, False)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert a.device.type == "cuda" and a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)
        for key, value in o2.state[b].items():
            if torch.is_tensor(value) and value.numel() > 1:
                torch.testing.assert_close(o1.state[a][key], value, **tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(LINE_SEARCH))
def test_line_searches_match_reference_on_gpu(name, backend):
    """float64 so that both runs take the same Armijo decisions; then the step sizes agree too."""
    make = LINE_SEARCH[name]
    m1 = mlp(torch.float64)
    m2 = copy.deepcopy(m1)
    o1, o2 = make(m1, backend), make(m2, "reference")
    run(m1, o1, 6, True)
    run(m2, o2, 6, True)
    assert o1.ls_state["n_backtracks"] == o2.ls_state["n_backtracks"]
    assert o1.ls_state["step_sizes"] == pytest.approx(o2.ls_state["step_sizes"], rel=1e-9)
    assert o1.n_forwards == o2.n_forwards
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_svi_field_training_on_gpu(backend):
    """The SVI field (svi.attach, Triton act_backward on CUDA) feeding the fused SGD step."""
    m1 = mlp(torch.float32)
    m2 = copy.deepcopy(m1)
    h1, h2 = sk.svi.attach(m1), sk.svi.attach(m2)
    try:
        o1 = sk.SVI(m1.parameters(), lr=0.05, backend=backend)
        o2 = sk.SVI(m2.parameters(), lr=0.05, backend="reference")
        run(m1, o1, 4, False)
        run(m2, o2, 4, False)
    finally:
        h1.remove()
        h2.remove()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
