"""FSDP2 (``fully_shard``) on 2 gloo processes, and HSDP on a 2x2 mesh (4 processes), on CPU.

Each rank sees a slice of the batch; the sharded run must equal one process on the whole batch
(parameters within float32 rounding: FSDP sums the gradient in another order), take the same
line-search decisions on every rank and as the single process, resume bit-identically from a
torch.distributed.checkpoint (DCP) checkpoint, and refuse unsupported placements before anything
changes. The ranks start once per mesh and run every job (fsdp_jobs.py); the tests read what they saw.
"""
from __future__ import annotations

import pytest
import torch

import fsdp_jobs as J
from rank_jobs import ranks as _ranks

# Adam's update divides by sqrt(v): a gradient that differs in its last bit moves the parameter by a few ulps.
ATOL = 1e-6
# The Adam line searches' trials move the parameters in place (docs/kernels.md, "In-place trials"): the final
# step recovers w0 from a trial point |w0 - eta d| ~ 5 here (init_step_size=5), whose rounding (half an ulp of 5,
# 2.4e-7 per step) differs between the sharded and the one-process run once their gradients differ in the last
# bit. The decisions (step sizes, backtracks) must still be the same, and the ranks identical, exactly.
ATOL_IN_PLACE = 1e-5
IN_PLACE_ADAM = ("AdamSLS", "LayerwiseAdamSLS", "SaLSA")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return J.spawn_jobs("two", 2, str(tmp_path_factory.mktemp("fsdp2")))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return J.spawn_jobs("four", 4, str(tmp_path_factory.mktemp("hsdp")))


def _decisions(ls):
    """What every rank must agree on exactly (SaLSA's running averages are floats summed in another order)."""
    keys = ("step", "n_forwards", "n_backwards", "total_backtracks", "step_sizes", "n_backtracks", "found")
    return {k: ls[k] for k in keys}


def _assert_matches_single_process(recs, ref, name):
    atol = ATOL_IN_PLACE if name in IN_PLACE_ADAM else ATOL
    for r, rec in enumerate(recs):
        for i, (a, b) in enumerate(zip(rec["params"], ref["params"])):
            assert torch.allclose(a, b, rtol=0, atol=atol), f"rank {r} param {i}: max diff {(a - b).abs().max()}"
        assert all(torch.equal(a, b) for a, b in zip(rec["params"], recs[0]["params"])), "ranks differ"
        if name in J.LINE_SEARCH:
            assert rec["ls"] == recs[0]["ls"], "line-search state differs across ranks"
            assert _decisions(rec["ls"]) == _decisions(ref["ls"]), (rec["ls"], ref["ls"])
    if name in J.LINE_SEARCH:
        ls = ref["ls"]
        assert ls["total_backtracks"] > 0 and ls["n_forwards"] > ls["step"], "the searches did not backtrack"


@pytest.mark.parametrize("name", J.OPTIMIZERS)
@pytest.mark.parametrize("backend", J.BACKENDS)
def test_sharded_equals_one_process(two, name, backend):
    recs = _ranks(two, ("run", name, backend))
    ref = J.single_process(name, backend)
    _assert_matches_single_process(recs, ref, name)
    r0, r1 = recs
    assert r0["losses"][0] != r1["losses"][0], "both ranks saw the same data: the test would prove nothing"
    # Uneven shards (4/3 and 3/2 rows) and an empty local shard (the last layer on rank 1).
    assert r0["local_shapes"] == [(4, 6), (4,), (3, 7), (3,), (1, 5), (1,)]
    assert r1["local_shapes"] == [(3, 6), (3,), (2, 7), (2,), (0, 5), (0,)]
    if name != "ArmijoSGD":  # the optimizer state keeps the parameters' placement (ArmijoSGD has none)
        assert r0["state_placements"] == ["(Shard(dim=0),)"]
    if name == "SVI":  # svi.attach on the sharded model, detected on the first forward
        _assert_svi_field(recs, ref)


def _assert_svi_field(recs, ref):
    """The layers found on the sharded model are the unsharded model's, and FSDP reduce-scatters the SVI
    field of the first step: each rank's gradient shard (gathered here) is one process's on the full batch."""
    assert ref["svi_layers"] == ["0", "2"]
    for rec in recs:
        assert rec["svi_layers"] == ref["svi_layers"]
        for a, b in zip(rec["grads"], ref["grads"]):
            assert torch.allclose(a, b, rtol=0, atol=ATOL)
    plain = J.make_model()
    x, y = J.make_batch(0)
    torch.nn.functional.mse_loss(plain(x), y).backward()
    assert not torch.allclose(plain[0].weight.grad, ref["grads"][0]), "the field equals the ordinary gradient"


@pytest.mark.parametrize("when", ["before", "example"])
def test_svi_attach_on_fsdp2(two, when):
    # "before": attach(model) then fully_shard, detected on the first forward. "example": attach(model,
    # example_inputs) after fully_shard; its forward without backward must not leave the root (which owns
    # the last layer) holding a gathered copy that training would use instead of the updated shards.
    recs = _ranks(two, ("svi", when))
    ref = J.single_process("SVI", J.BACKENDS[-1])
    _assert_matches_single_process(recs, ref, "SVI")
    _assert_svi_field(recs, ref)


@pytest.mark.parametrize("name", J.OPTIMIZERS)
def test_dcp_resume_is_bit_identical(two, name):
    for rec in _ranks(two, ("dcp", name)):
        assert rec["same_params"], "parameters after resuming differ from the uninterrupted run"
        assert rec["same_state"], "optimizer state after resuming differs from the uninterrupted run"
        assert rec["rolled_back"], "rolling the trained model and optimizer back to the checkpoint gave other bits"
        if name in J.LINE_SEARCH:
            uninterrupted, resumed = rec["ls"]
            assert rec["ls_loaded_step"] == 2 and uninterrupted == resumed


@pytest.mark.parametrize("name", ["AdamW", "AdamSLS", "LayerwiseAdamSLS"])
def test_sharded_and_plain_parameters_in_one_optimizer(two, name):
    recs = _ranks(two, ("mixed", name))
    ref = J.single_process(name, J.BACKENDS[-1])
    _assert_matches_single_process(recs, ref, name)
    for rec in recs:
        assert rec["plain_head"] == [True, True]
        assert rec["unused_unchanged"]


@pytest.mark.parametrize("name", J.LINE_SEARCH)
def test_collectives_per_step(two, name):
    # One all_reduce per evaluated loss, plus one per reduction phase (ArmijoSGD: ||g||^2; the Adam
    # variants: the gradient norms, then the preconditioned sums), whatever the number of tensors.
    phases = 1 if name == "ArmijoSGD" else 2
    for rec in _ranks(two, ("collectives", name)):
        for calls, forwards in rec["per_step"]:
            assert calls == forwards + phases


def test_unsupported_placement_refused_before_any_change(two):
    for rec in _ranks(two, ("bad",)):
        for name in ("AdamW", "AdamSLS"):
            assert rec[name] is not None and "Shard(dim=1)" in rec[name] and "mesh dimension 0" in rec[name]
            assert rec[name + "_unchanged"]
        assert "process_group=False" in rec["no_group"]


@pytest.mark.parametrize("name", ["LayerwiseAdamSLS", "AdamW"])
def test_hsdp_2x2(four, name):
    recs = _ranks(four, ("hsdp", name))
    ref = J.single_process(name, J.BACKENDS[-1])
    _assert_matches_single_process(recs, ref, name)
    assert len({rec["losses"][0] for rec in recs}) == 4, "every rank must see its own quarter of the batch"
    assert recs[0]["state_placements"] == ["(Replicate(), Shard(dim=0))"]
