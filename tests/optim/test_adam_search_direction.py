"""The Adam line searches' saved direction (StepTensors.dirs): with it, every trial is
ls_trial_sgd along d = g / (sqrt(v_hat) + eps) written by the save phase. The steps must be the
same bits as with the direction recomputed in each trial (EXACT_DIRECTION emptied), and only
fp32/fp64 parameters get a direction buffer."""
import pytest
import torch

import svi_kernels as sk
from svi_kernels.optim import _line_search
from helpers import CPU_BACKENDS, batch, one_thread, tiny_mlp  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

MAKERS = {
    "AdamSLS": lambda ps, b: sk.AdamSLS(ps, init_step_size=10.0, backend=b),  # large: several backtracks
    "SaLSA": lambda ps, b: sk.SaLSA(ps, backend=b),
    # "all": every step searches every group along the saved direction ("cycle" saves none after its warm-up:
    # test_layerwise_save.py)
    "LayerwiseAdamSLS": lambda ps, b: sk.LayerwiseAdamSLS([{"params": [p]} for p in ps], warmup_steps=1,
                                                          strategy="all", init_step_size=10.0, backend=b),
}


def _run(name, backend, dtype, steps=4):
    model = tiny_mlp(dtype=dtype)
    x, y = batch(dtype=dtype)
    opt = MAKERS[name](list(model.parameters()), backend)

    def closure():
        opt.zero_grad()
        return torch.nn.functional.cross_entropy(model(x).float(), y)

    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    return [p.detach().clone() for p in model.parameters()], losses, opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_steps_along_saved_direction_are_the_recomputed_bits(monkeypatch, name, backend):
    saved, losses, opt = _run(name, backend, torch.float32)
    assert len(opt._dirs) == len(saved)  # one direction buffer per parameter
    assert opt.ls_state["total_backtracks"] > 0 or name == "SaLSA"  # several trials per step were run
    monkeypatch.setattr(_line_search, "EXACT_DIRECTION", ())
    recomputed, losses2, opt2 = _run(name, backend, torch.float32)
    assert not opt2._dirs
    assert losses == losses2
    for a, b in zip(saved, recomputed):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert opt.ls_state["step_sizes"] == opt2.ls_state["step_sizes"]


def test_bf16_parameters_get_no_direction_buffer():
    _params, losses, opt = _run("AdamSLS", "cpu", torch.bfloat16, steps=2)
    assert not opt._dirs and len(opt._w0) == 6
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
