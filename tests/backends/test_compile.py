"""The compiled ops are visible to torch.compile (fake kernels registered), and a compiled training
step that calls our non-line-search optimizers matches eager."""
import copy

import pytest
import torch

import svi_kernels as sk
from svi_kernels.backends import backends

pytestmark = pytest.mark.skipif(not backends()["cpu"]["available"], reason="needs the compiled CPU extension")


def test_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p = [torch.empty(5), torch.empty(3)]
        sums = torch.ops.svi_kernels.ls_save_sgd(p, p, [torch.empty(5), torch.empty(3)])
        assert sums.shape == (2,) and sums.dtype == torch.float32
        torch.ops.svi_kernels.adam_step(p, p, p, p, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, 1.0, 1.0, False)


def test_fullgraph_compile_of_a_fused_op():
    def trial(params, w0, grads):
        torch.ops.svi_kernels.ls_trial_sgd(params, w0, grads, [0.5, 0.25])
        return params[0] * 2

    p = [torch.randn(7), torch.randn(3)]
    w0 = [t.clone() for t in p]
    g = [torch.randn(7), torch.randn(3)]
    out = torch.compile(trial, backend="aot_eager", fullgraph=True)(p, w0, g)
    torch.testing.assert_close(p[0], w0[0] - 0.5 * g[0])
    torch.testing.assert_close(p[1], w0[1] - 0.25 * g[1])
    torch.testing.assert_close(out, p[0] * 2)


@pytest.mark.parametrize("make", [lambda ps: sk.AdamW(ps, lr=1e-2), lambda ps: sk.SVI(ps, lr=1e-2)],
                         ids=["AdamW", "SVI"])
def test_compiled_training_step_matches_eager(make):
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    m2 = copy.deepcopy(m1)
    o1, o2 = make(list(m1.parameters())), make(list(m2.parameters()))
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def train_step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(3):
        compiled(m1, o1)
        train_step(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)
