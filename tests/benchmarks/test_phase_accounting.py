"""svi-bench counts a line-search row's bytes from its phases (benchmarks/traffic.py): they must be
the fused ops one step of the optimizer really runs, in the form it runs them (in place, or from a
kept start point w0), each weighed by the share of the parameters it covers (recorded here on the
reference backend)."""
import importlib
from collections import Counter

import pytest
import torch

from svi_kernels._entry import load
from svi_kernels.optim import trial_points

# Through svi_kernels._entry: benchmarks/ ships as svi_kernels._benchmarks in the wheel.
rows_mod = importlib.import_module(load("microbench").__package__ + ".rows")
traffic = importlib.import_module(load("microbench").__package__ + ".traffic")

OPS = ("ls_save_sgd", "ls_save_adam", "ls_trial_sgd", "ls_trial_adam", "ls_final_adam", "ls_final_adam_from_trial",
       "adam_step")
ROWS = ("armijo_sgd_bookkeeping", "adam_sls_bookkeeping", "salsa_search_bookkeeping", "salsa_skipped_step",
        "layerwise_adam_sls_bookkeeping", "ls_trial_sgd", "ls_trial_adam")
SIZES = (5, 7, 3)  # unequal: a LayerwiseAdamSLS group's share is its numel, 1/n only over a whole cycle


def _label(name, args):
    """The op and the form of the call: a save given an empty w0 (``_no_w0``; the Adam save must not
    be given directions), a move given w0 = p (``_in_place``)."""
    if name == "ls_save_sgd":
        return name if len(args[2]) else name + "_no_w0"
    if name == "ls_save_adam":
        if len(args[5]):
            return name + "_with_dirs"  # (saved directions: none of the optimizers' forms)
        return name if len(args[4]) else name + "_no_w0"
    if name in ("ls_trial_sgd", "ls_trial_adam", "ls_final_adam"):
        same = [a.data_ptr() == b.data_ptr() for a, b in zip(args[0], args[1])]
        assert all(same) or not any(same)
        return name + "_in_place" if all(same) else name
    return name


def _recorded_shares(monkeypatch, row_name, dtype):
    """(each op's share of the parameters over one LayerwiseAdamSLS cycle of steps, per step; the row's phases)."""
    from svi_kernels.backends import get
    impl = get("reference")
    params = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64).to(dtype)) for n in SIZES]
    grads = [torch.randn(n, dtype=torch.float64).to(dtype) for n in SIZES]
    for p, g in zip(params, grads):
        p.grad = g
    total = sum(SIZES)
    ctx = rows_mod.Context(params, grads, torch.device("cpu"), dtype,
                           rows_mod.TrivialClosure(torch.device("cpu"), params))
    row = next(r for r in rows_mod.build_rows(["reference"]) if r.name == row_name)
    step, _opt = row.build(ctx)
    step()  # warm-up (SaLSA's skipped-step row: the first step searches)
    covered, recording = Counter(), True

    def recorder(name, original):
        def record(*args, **kwargs):
            if recording:
                covered[_label(name, args)] += sum(p.numel() for p in args[0]) / total
            return original(*args, **kwargs)
        return record

    for name in OPS:
        monkeypatch.setattr(impl, name, recorder(name, getattr(impl, name)))
    n_steps = len(ctx.layer_groups())
    for _ in range(n_steps):
        step()
    recording = False
    want = Counter()
    for op, count in row.phases(ctx):
        want[op] += count
    return {op: c / n_steps for op, c in covered.items()}, {op: c for op, c in want.items() if c}


def _assert_same_shares(got, want):
    assert set(got) == set(want)
    for op in want:
        assert got[op] == pytest.approx(want[op]), op


@pytest.mark.parametrize("row_name", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_phases_are_the_ops_a_step_runs_weighed_by_the_parameters_they_cover(monkeypatch, row_name, dtype):
    got, want = _recorded_shares(monkeypatch, row_name, dtype)
    _assert_same_shares(got, want)


BF16_STATE_ROWS = ("adam_sls_bookkeeping_bf16_state", "salsa_search_bookkeeping_bf16_state",
                   "layerwise_adam_sls_bookkeeping_bf16_state")
INT8_STATE_ROWS = tuple(name.replace("_bf16_", "_int8_") for name in BF16_STATE_ROWS)


@pytest.mark.parametrize("row_name", BF16_STATE_ROWS + INT8_STATE_ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bf16_state_rows_run_the_ops_of_their_fp32_state_rows(monkeypatch, row_name, dtype):
    """issue 24: the same ops (their bytes counted with 2-byte state, or 1 + 4/256 for int8 codes and their
    scales, Row.state_itemsize)."""
    try:
        got, want = _recorded_shares(monkeypatch, row_name, dtype)
    except rows_mod.RowUnavailable as exc:  # an svi_kernels without state_dtype
        pytest.skip(str(exc))
    _assert_same_shares(got, want)


@pytest.mark.parametrize("row_name", ["armijo_sgd_bookkeeping", "adam_sls_bookkeeping", "layerwise_adam_sls_bookkeeping"])
def test_the_model_follows_the_code_s_choice_of_keeping_w0(monkeypatch, row_name):
    """The rows read which dtypes keep their start point from trial_points.KEEP_DTYPES, as the optimizers do:
    with fp32 added there both switch to saves with w0 and moves from it."""
    monkeypatch.setattr(trial_points, "KEEP_DTYPES", trial_points.KEEP_DTYPES + (torch.float32,))
    got, want = _recorded_shares(monkeypatch, row_name, torch.float32)
    assert {"ls_save_sgd", "ls_trial_sgd"} <= set(want) or {"ls_save_adam", "ls_final_adam"} <= set(want)
    _assert_same_shares(got, want)


def test_in_place_steps_move_the_bytes_docs_kernels_md_states():
    """fp32, one accepted trial (K = 1), docs/kernels.md "In-place trials": ArmijoSGD 4 + 12K, the Adam
    searches 44 + 16K, SaLSA's searched step 24 + 16K; LayerwiseAdamSLS over n groups: save 20, the trial
    16 and the final step 20 for the searched group, 16 for the others."""
    ctx = rows_mod.Context([torch.nn.Parameter(torch.zeros(3)) for _ in range(20)], [torch.zeros(3)] * 20,
                           torch.device("cpu"), torch.float32)
    rows = {r.name: r for r in rows_mod.build_rows(["reference"])}
    n = len(ctx.layer_groups())
    expected = {"armijo_sgd_bookkeeping": 4 + 12, "adam_sls_bookkeeping": 44 + 16, "salsa_search_bookkeeping": 24 + 16,
                "layerwise_adam_sls_bookkeeping": 4 + 20 + (16 + 20) / n + 16 * (n - 1) / n,
                "ls_trial_sgd": 12, "ls_trial_adam": 16}
    for name, b in expected.items():
        assert traffic.bytes_per_param(rows[name].phases(ctx), 4) == pytest.approx(b), name
