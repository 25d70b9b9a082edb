"""Against what the release before in-place trials recorded (tests/data/ls_release_0.1.0.pt.gz, written by
tests/optim/ls_fixtures.py at commit b03c53f):

- its checkpoints load into the current optimizers and resume: the steps after the load are the release's
  (within float32 rounding of the in-place trials; bit for bit with keep_start_point=True);
- every line search's trial points (PLASLS: each criterion and strategy) are the release's, bit for bit with
  keep_start_point=True, and within a few float64 roundings (compounded over 5 steps) by default.
"""
import copy

import pytest
import torch

import ls_fixtures
from helpers import one_thread, tiny_mlp  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

RELEASE = ls_fixtures.load()


@pytest.mark.parametrize("keep", [False, True], ids=["in-place", "keep_start_point"])
@pytest.mark.parametrize("name", sorted(ls_fixtures.CHECKPOINTED))
def test_release_checkpoint_loads_and_resumes(name, keep):
    saved = RELEASE["checkpoints"][name]
    model = tiny_mlp(seed=99, hidden=ls_fixtures.HIDDEN)  # other weights: the checkpoint must set them
    model.load_state_dict(saved["model"])
    opt = ls_fixtures.CHECKPOINTED[name](list(model.parameters()))
    opt.keep_start_point = keep
    opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    assert opt.ls_state["step"] == ls_fixtures.CHECKPOINT_AT
    ls_fixtures.mlp_steps(model, opt, ls_fixtures.CHECKPOINT_AT, ls_fixtures.STEPS_AFTER)
    assert opt.ls_state["step"] == ls_fixtures.CHECKPOINT_AT + ls_fixtures.STEPS_AFTER
    want = saved["ls_state_after"]
    assert opt.ls_state["n_backtracks"] == want["n_backtracks"]
    assert opt.ls_state["total_backtracks"] == want["total_backtracks"]
    for a, b in zip(model.parameters(), saved["after"]):
        if keep:
            assert torch.equal(a.detach(), b)
        else:
            torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(opt.ls_state["step_sizes"]), torch.tensor(want["step_sizes"]),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("keep", [False, True], ids=["in-place", "keep_start_point"])
@pytest.mark.parametrize("name", sorted(ls_fixtures.TRIALED))
def test_trial_points_are_the_releases(name, keep):
    got = ls_fixtures.record_trials(name, keep_start_point=keep)
    want = RELEASE["trials"][name]
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert a["trials"].shape == b["trials"].shape, f"step {step}: another number of trials"
        for x, y in ((a["trials"], b["trials"]), (a["after"], b["after"])):
            if keep:
                assert torch.equal(x, y), f"step {step}"
            else:
                torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-13, msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(torch.tensor(a["step_sizes"]), torch.tensor(b["step_sizes"]), rtol=1e-12, atol=0)
