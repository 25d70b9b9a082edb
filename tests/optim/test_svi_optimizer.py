"""SVI's base steps against torch.optim.SGD (Nesterov momentum) and torch.optim.Adam."""
import copy

import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS, tiny_mlp
from test_adamw import _train


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.01)])
def test_sgd_base_matches_torch_sgd(backend, nesterov, wd):
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    ours = sk.SVI(m1.parameters(), lr=0.05, momentum=0.95, nesterov=nesterov, weight_decay=wd, backend=backend)
    ref = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.95, nesterov=nesterov, weight_decay=wd)
    _train(m1, ours, steps=6)
    _train(m2, ref, steps=6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adam_base_matches_torch_adam(backend):
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    ours = sk.SVI(m1.parameters(), lr=1e-2, base="adam", weight_decay=0.01, backend=backend)
    ref = torch.optim.Adam(m2.parameters(), lr=1e-2, weight_decay=0.01)
    _train(m1, ours, steps=6)
    _train(m2, ref, steps=6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_invalid_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="base"):
        sk.SVI(p, base="rmsprop")
    with pytest.raises(ValueError, match="Nesterov"):
        sk.SVI(p, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        sk.SVI(p, lr=-1.0)
