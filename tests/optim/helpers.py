"""Which backends the optimizer tests run on here (CPU tensors)."""
import os

import pytest
import torch

from svi_kernels.backends import backends

_AV = backends()


def _param(name):
    ok, why = _AV[name]["available"], _AV[name]["reason"]
    if ok and name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        # With a GPU the Triton kernels are compiled and take CUDA tensors only;
        # tests/optim/test_gpu_optimizers.py runs the optimizers on them there.
        ok, why = False, "Triton compiles for the GPU here (not interpreted): see test_gpu_optimizers.py"
    return pytest.param(name, id=name, marks=[] if ok else [pytest.mark.skip(reason=why)])


# float64 problems: the reference and the C++ CPU kernels (double math).
LS_BACKENDS = [_param("reference"), _param("cpu")]
# float32 models: every backend that runs on CPU tensors here (Triton through its interpreter).
CPU_BACKENDS = [_param("reference"), _param("cpu"), _param("triton")]


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only contend on a loaded 2-core machine (10x slower there).
    Import it into a test module with autouse via ``pytestmark`` or by name."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_mlp(seed=0, d_in=6, hidden=9, d_out=3, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)).to(dtype)


def batch(seed=1, n=16, d_in=6, d_out=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, d_out, (n,), generator=g)
