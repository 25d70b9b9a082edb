"""bf16 optimizer state (``state_dtype=torch.bfloat16``, issue 24) on 2 gloo processes (CPU):

- FSDP2 with uneven and empty shards: the state is bf16 and keeps the parameters' placement, every rank
  takes the same line-search decisions, and the run stays within a stated tolerance of one process on the
  whole batch (not bit for bit: the stochastic-rounding bits of an element follow its index in the local
  shard, so the sharded run rounds other elements up than the one-process run);
- a DCP checkpoint resumes bit-identically (the seed counter travels in param_groups[0]);
- DDP replicas stay bitwise identical (every rank draws the same seeds);
- int8 state (issue 24 phase 2): DDP replicas bitwise identical (codes and scales); int8 state under FSDP2
  is tested in test_int8_fsdp.py.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import state_dtype_jobs as S
from rank_jobs import ranks as _ranks
from svi_kernels.backends import backends, compiled

BACKENDS = ["reference"] + (["cpu"] if backends()["cpu"]["available"]
                            and "state_seed" in inspect.signature(compiled.adam_step).parameters else [])
BACKENDS_INT8 = S.int8_backends(BACKENDS)  # (the compiled kernels once their ops take int8 state)
# One process vs FSDP2 with bf16 state: each moment is stochastically rounded by other bits (a relative
# 2^-8 at most per store), so AdamW/SVI's steps (lr 3e-2, 4 steps: moves up to 0.12) may differ by a few
# percent of a step (seen: 3e-4); the line searches (step sizes up to 5, seen: 6e-3) by more.
ATOL = {"AdamW": 2e-3, "SVI": 2e-3}
ATOL_LINE_SEARCH = 2e-2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return S.spawn_jobs(2, str(tmp_path_factory.mktemp("state_dtype")), BACKENDS)


@pytest.mark.parametrize("name", S.OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_with_bf16_state(runs, name, backend):
    recs = _ranks(runs, ("run", name, backend))
    ref = S.single_process(name, backend)
    for rec in recs:
        assert rec["state_dtypes"] == ["torch.bfloat16"] and rec["state_placements"] == ["(Shard(dim=0),)"]
        assert rec["calls"] == ref["calls"] == 4
        assert all(torch.equal(a, b) for a, b in zip(rec["params"], recs[0]["params"])), "ranks differ"
        if rec["ls"] is not None:
            assert rec["ls"] == recs[0]["ls"], "line-search state differs across ranks"
    if ref["ls"] is not None:  # the same decisions as one process (on this problem the rounding flips none)
        keys = ("step", "step_sizes", "n_backtracks", "found")
        assert {k: recs[0]["ls"][k] for k in keys} == {k: ref["ls"][k] for k in keys}
    atol = ATOL.get(name, ATOL_LINE_SEARCH)
    for i, (a, b) in enumerate(zip(recs[0]["params"], ref["params"])):
        assert torch.allclose(a, b, rtol=0, atol=atol), f"param {i}: max diff {(a - b).abs().max()}"
    assert any(not torch.equal(a, b) for a, b in zip(recs[0]["params"], ref["params"])), \
        "same bits as one process: the sharded run should round other elements"


@pytest.mark.parametrize("name", S.OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dcp_resume_with_bf16_state_is_bit_identical(runs, name, backend):
    for rec in _ranks(runs, ("dcp", name, backend)):
        assert rec["calls_loaded"] == 2 and rec["calls"] == 4
        assert rec["dtypes_loaded"] == ["torch.bfloat16"]
        assert rec["same_params"] and rec["same_state"]


@pytest.mark.parametrize("name", S.OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_replicas_identical_with_bf16_state(runs, name, backend):
    r0, r1 = _ranks(runs, ("ddp", name, backend))
    assert r0["losses"][0] != r1["losses"][0], "both ranks saw the same data: the test would prove nothing"
    assert r0["state_dtypes"] == r1["state_dtypes"] == ["torch.bfloat16"]
    for i, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        assert torch.equal(a, b), f"param {i} differs across ranks (max diff {(a - b).abs().max()})"
    assert r0["ls"] == r1["ls"]


@pytest.mark.parametrize("name", S.OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS_INT8)
def test_ddp_replicas_identical_with_int8_state(runs, name, backend):
    r0, r1 = _ranks(runs, ("int8-ddp", name, backend))
    assert r0["losses"][0] != r1["losses"][0], "both ranks saw the same data: the test would prove nothing"
    assert r0["state_dtypes"] == r1["state_dtypes"] and set(r0["state_dtypes"]) <= {"torch.int8", "torch.uint8"}
    assert r0["scales"] and all(torch.equal(a, b) for a, b in zip(r0["scales"], r1["scales"]))
    for i, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        assert torch.equal(a, b), f"param {i} differs across ranks (max diff {(a - b).abs().max()})"
    assert r0["ls"] == r1["ls"]
