"""``master_weights`` (issue 24) with bf16 parameters under FSDP2 on 2 gloo processes (CPU), uneven and
empty shards (master_fsdp_jobs.py):

- True, "kahan" and "8bit" are elementwise on each local shard: with every rank on the full batch, the bf16
  parameters and the master state (the float32 copy, the kahan compensation, the 8bit code) equal one
  process's bit for bit, for AdamW, SVI and the Adam line searches (same decisions), though each rank's
  segments end elsewhere (the kernels' tails run the vector code: tests/backends/test_cpu_kernels.py); the
  master state is a DTensor with its parameter's placements (DCP saves it sharded);
- "stochastic" draws each local element's rounding bits by its index in the shard (as int8 state's blocks
  are per shard): the ranks agree and the run stays within bf16 rounding of one process's;
- a DCP checkpoint resumes bit-identically with every mode (the line searches' state_dict template holds the
  master state: DCP loads only what the template has, and a master left out was lost on resume).
"""
from __future__ import annotations

import pytest
import torch

import master_fsdp_jobs as M
from rank_jobs import ranks as _ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return M.spawn_jobs(2, str(tmp_path_factory.mktemp("master_fsdp")))


@pytest.mark.parametrize("mode", M.MODES, ids=str)
@pytest.mark.parametrize("name", M.OPTIMIZERS)
def test_sharded_masters_equal_one_process(runs, name, mode):
    one = _ranks(runs, ("single", name, mode))[0]
    recs = _ranks(runs, ("sharded", name, mode))
    assert recs[1]["local_numel"][4:] == [0, 0], "rank 1 should hold the empty shards"
    for r in recs:
        assert all(torch.equal(a, b) for a, b in zip(r["params"], recs[0]["params"])), "ranks disagree"
    if mode == "stochastic":
        for a, b in zip(recs[0]["params"], one["params"]):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)  # a few bf16 roundings
        assert all(not m for m in recs[0]["master"].values()), "stochastic keeps no master state"
    else:
        for i, (a, b) in enumerate(zip(recs[0]["params"], one["params"])):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b), f"param {i}: max diff {(a - b).abs().max()}"
        key = "master_param" if mode is True else "master_correction"
        for i, entries in one["master"].items():
            assert key in entries, f"param {i}: no {key} in one process"
            got, placements = recs[0]["master"][i][key]
            assert got.dtype == entries[key][0].dtype and torch.equal(got, entries[key][0]), \
                f"param {i}: {key} differs from one process"
            assert (got.abs() > 0).any() or mode is True, f"param {i}: an all-zero {key} (the comparison sees nothing)"
            assert placements == recs[0]["param_placements"][i], (placements, recs[0]["param_placements"][i])
    if name in M.LINE_SEARCH:
        keys = ("step", "n_forwards", "step_sizes", "n_backtracks")
        assert recs[0]["ls"] == recs[1]["ls"]
        if mode != "stochastic":
            assert {k: recs[0]["ls"][k] for k in keys} == {k: one["ls"][k] for k in keys}


@pytest.mark.parametrize("mode", M.MODES, ids=str)
@pytest.mark.parametrize("name", ["AdamW", "AdamSLS"])
def test_dcp_resume_with_masters_is_bit_identical(runs, name, mode):
    for rec in _ranks(runs, ("dcp", name, mode)):
        assert rec["same_params"] and rec["same_state"], rec
        want = {True: ["master_param"], "kahan": ["master_correction"], "8bit": ["master_correction"],
                "stochastic": []}[mode]
        assert rec["master_keys"] == want
