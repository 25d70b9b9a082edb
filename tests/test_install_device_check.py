"""A named backend that cannot serve the parameters' device is refused when the optimizer is built
(as torch refuses an unsupported ``fused=True``), not at the first ``step()``."""
import pytest
import torch

import svi_kernels as sk
from svi_kernels import optim

# Every optimizer with a backend= argument, with the smallest valid arguments.
OPTIMIZERS = [
    pytest.param(lambda ps, b: sk.AdamW(ps, backend=b), id="AdamW"),
    pytest.param(lambda ps, b: sk.SVI(ps, backend=b), id="SVI"),
    pytest.param(lambda ps, b: sk.ArmijoSGD(ps, backend=b), id="ArmijoSGD"),
    pytest.param(lambda ps, b: sk.AdamSLS(ps, backend=b), id="AdamSLS"),
    pytest.param(lambda ps, b: sk.LayerwiseAdamSLS(ps, backend=b), id="LayerwiseAdamSLS"),
    pytest.param(lambda ps, b: optim.SaLSA(ps, backend=b), id="SaLSA"),
]


def _params():
    return [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_cuda_backend_on_cpu_params_refused_at_construction(make):
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors, but the parameters are on cpu"):
        make(_params(), "cuda")


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_triton_on_cpu_params_needs_the_interpreter(make, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors .*TRITON_INTERPRET=1"):
        make(_params(), "triton")


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_serving_backends_accepted(make):
    for name in ("reference", "cpu", None):
        if name == "cpu" and not sk.backends()["cpu"]["available"]:
            continue
        make(_params(), name)


def test_every_param_group_checked():
    groups = [{"params": _params()}, {"params": _params(), "backend": "cuda"}]
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        sk.AdamW(groups, backend="reference")


def test_unavailable_backend_refused_at_construction(monkeypatch):
    import importlib
    registry = importlib.import_module("svi_kernels.backends")
    monkeypatch.setattr(registry, "_status", lambda name: (False, "not here for this test"))
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: not here for this test"):
        sk.AdamW(_params(), backend="cpu")
