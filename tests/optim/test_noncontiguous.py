"""Non-contiguous parameters take the documented reference path and give the same result."""
import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS

MAKERS = {
    "AdamW": lambda ps, b: sk.AdamW(ps, lr=1e-2, backend=b),
    "SVI": lambda ps, b: sk.SVI(ps, lr=1e-2, backend=b),
    "ArmijoSGD": lambda ps, b: sk.ArmijoSGD(ps, backend=b),
    "AdamSLS": lambda ps, b: sk.AdamSLS(ps, backend=b),
}


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    strided = torch.nn.Parameter(torch.randn(5, 7, generator=g).t())  # a non-contiguous leaf
    plain = torch.nn.Parameter(torch.randn(9, generator=g))
    assert not strided.is_contiguous()
    return [strided, plain]


@pytest.mark.parametrize("backend", CPU_BACKENDS[1:])
@pytest.mark.parametrize("name", list(MAKERS))
def test_matches_reference(name, backend):
    ours, ref = params(), params()
    o1, o2 = MAKERS[name](ours, backend), MAKERS[name](ref, "reference")
    target = torch.arange(35.0).reshape(7, 5) / 10
    for i in range(3):
        for ps, opt in ((ours, o1), (ref, o2)):
            opt.zero_grad()
            closure = lambda ps=ps: ((ps[0] - target) ** 2).sum() + (ps[1] ** 2).sum() * (1 + i)  # noqa: E731
            if name in ("ArmijoSGD", "AdamSLS"):
                opt.step(closure)
            else:
                closure().backward()
                opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not ours[0].is_contiguous()
