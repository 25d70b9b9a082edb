"""In-place trials on fp32, bf16 and fp16 parameters, on every backend that runs on CPU tensors here
(Triton through its interpreter), mixed dtypes in one optimizer included: each step, taken from the
same point and state as a keep_start_point=True twin (the release's trials from a kept w0), makes the
same Armijo decisions and lands within a few roundings of the stored dtype (docs/kernels.md's bound);
bf16 and fp16 parameters keep their start point (trial_points.KEEP_DTYPES), so theirs are the twin's bits."""
import copy

import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS, batch, one_thread, tiny_mlp  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
MAKERS = {
    "ArmijoSGD": lambda ps, scale=1.0, **kw: sk.ArmijoSGD(ps, init_step_size=20.0 * scale, **kw),
    "AdamSLS": lambda ps, scale=1.0, **kw: sk.AdamSLS(ps, init_step_size=10.0 * scale, **kw),
    "SaLSA": lambda ps, scale=1.0, **kw: sk.SaLSA(ps, init_step_size=10.0 * scale, search="every", **kw),
    "LayerwiseAdamSLS": lambda ps, scale=1.0, **kw: sk.LayerwiseAdamSLS(
        [{"params": ps[:2]}, {"params": ps[2:]}], warmup_steps=1, init_step_size=10.0 * scale, **kw),
}


class Mixed(torch.nn.Module):
    """fp32 and bf16 tensors in one optimizer (two buckets, one kept, one in place) under a weighted
    quadratic loss computed in fp32."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float32]
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(5 + 3 * i, generator=gen).to(dt))
                                          for i, dt in enumerate(dtypes)])
        self.targets = [torch.randn(p.shape, generator=gen) for p in self.ps]
        self.weights = (10.0 ** (2 * torch.rand(len(dtypes), generator=gen) - 1)).tolist()

    def loss(self, shift):
        return sum(((p.float() - t - shift) ** 2 * w).sum() for p, t, w in zip(self.ps, self.targets, self.weights))


def _model(dtype):
    if dtype == "mixed":
        return Mixed()
    return tiny_mlp(dtype=torch.float32).to(dtype)


def _largest_direction(opt, p):
    """max |d| over the directions a step moves p along (g; g / denom and m_hat / denom for Adam)."""
    g = p.grad.detach().float().abs()
    st = opt.state.get(p, {})
    if "exp_avg_sq" not in st:
        return float(g.max())
    denom = st["exp_avg_sq"].float().sqrt() + 1e-8  # (bias corrections only shrink the denominator's share)
    return float(torch.maximum(g, st["exp_avg"].float().abs() * 10).div(denom).max())


def _closure(model, x, y):
    if isinstance(model, Mixed):
        return lambda: model.loss(0.1 * float(x[0, 0]))
    return lambda: torch.nn.functional.cross_entropy(model(x.to(model[2].weight.dtype)).float(), y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "mixed"], ids=str)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_in_place_steps_are_the_kept_start_point_steps_within_the_bound(name, dtype, backend):
    model = _model(dtype)
    scale = 1.0
    opt = MAKERS[name](list(model.parameters()), scale=scale, backend=backend)
    backtracked = 0
    for i in range(4):
        x, y = batch(seed=i)
        etas_before = list(opt.ls_state["step_sizes"])
        twin = copy.deepcopy(model)
        twin_opt = MAKERS[name](list(twin.parameters()), scale=scale, backend=backend, keep_start_point=True)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            o.step(_closure(m, x, y))
        assert opt.ls_state["n_backtracks"] == twin_opt.ls_state["n_backtracks"], f"step {i + 1}"
        backtracked += sum(opt.ls_state["n_backtracks"])
        k = sum(opt.ls_state["n_backtracks"]) + len(opt.param_groups) + 3  # moves of the step, loosely
        eta_max = 2 * max(etas_before + list(opt.ls_state["step_sizes"]))
        for a, b in zip(model.parameters(), twin.parameters()):
            if a.dtype in (torch.bfloat16, torch.float16):
                assert torch.equal(a, b)
            u = UNIT[a.dtype]
            scale = torch.maximum(a.detach().float().abs(), b.detach().float().abs()).max()
            err = (a.detach().float() - b.detach().float()).abs().max()
            bound = k * 4 * u * float(scale) + 8 * 2.0 ** -24 * eta_max * _largest_direction(twin_opt, b)
            assert float(err) <= bound, f"step {i + 1}: {float(err)} ({a.dtype})"
    assert backtracked > 0 or name == "SaLSA"  # several trials moved the parameters in place
