"""Every optimizer resumes bit-identically from a checkpoint (line-search step sizes and counters too)."""
import copy

import pytest
import torch

import svi_kernels as sk
from helpers import batch, tiny_mlp

LINE_SEARCH = {"ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS"}

FACTORIES = {
    "AdamW": lambda ps: sk.AdamW(ps, lr=1e-2),
    "AdamW-nobc": lambda ps: sk.AdamW(ps, lr=1e-2, correct_bias=False),
    "SVI-sgd": lambda ps: sk.SVI(ps, lr=1e-2),
    "SVI-adam": lambda ps: sk.SVI(ps, lr=1e-2, base="adam"),
    "ArmijoSGD": lambda ps: sk.ArmijoSGD(ps, n_batches_per_epoch=3),
    "AdamSLS": lambda ps: sk.AdamSLS(ps, n_batches_per_epoch=3),
    "LayerwiseAdamSLS": lambda ps: sk.LayerwiseAdamSLS(
        [{"params": ps[:2]}, {"params": ps[2:4]}, {"params": ps[4:]}], warmup_steps=2),
}


def run(model, opt, name, steps, start):
    for i in range(start, start + steps):
        x, y = batch(seed=i)
        opt.zero_grad()
        closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        if type(opt).__name__ in LINE_SEARCH:
            opt.step(closure)
        else:
            closure().backward()
            opt.step()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_is_bit_identical(name):
    model = tiny_mlp()
    opt = FACTORIES[name](list(model.parameters()))
    run(model, opt, name, 4, 0)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, name, 4, 4)

    model2 = tiny_mlp(seed=123)
    model2.load_state_dict(saved_model)
    opt2 = FACTORIES[name](list(model2.parameters()))
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, name, 4, 4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    if type(opt).__name__ in LINE_SEARCH:
        assert opt.ls_state == opt2.ls_state and opt2.ls_state["step"] == 8
        # stepping after a load never mutates the checkpoint's line-search state
        assert saved_opt["param_groups"][0]["ls"][0]["step"] == 4 and "ls" not in saved_opt["state"]


def test_ls_state_survives_torch_save(tmp_path):
    model = tiny_mlp()
    opt = FACTORIES["AdamSLS"](list(model.parameters()))
    run(model, opt, "AdamSLS", 3, 0)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt2 = FACTORIES["AdamSLS"](list(tiny_mlp().parameters()))
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt2.ls_state == opt.ls_state and opt2.n_forwards == opt.n_forwards


def test_ls_state_in_the_older_layout_loads():
    # Checkpoints written before the counters moved to param_groups[0] kept them in state["ls"].
    model = tiny_mlp()
    opt = FACTORIES["AdamSLS"](list(model.parameters()))
    run(model, opt, "AdamSLS", 2, 0)
    sd = opt.state_dict()
    sd["state"]["ls"] = sd["param_groups"][0].pop("ls")[0]
    opt2 = FACTORIES["AdamSLS"](list(tiny_mlp().parameters()))
    opt2.load_state_dict(sd)
    assert opt2.ls_state == opt.ls_state and opt2.ls_state["step"] == 2


def test_state_dtype_preserved_on_load():
    model = tiny_mlp().to(torch.bfloat16)
    opt = sk.AdamW(model.parameters(), lr=1e-2)
    x, y = batch()
    torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
    opt.step()
    opt2 = sk.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.bfloat16
        assert opt2.state[p]["step"].dtype == torch.float32
