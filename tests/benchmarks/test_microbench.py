"""svi-bench: a smoke run on a tiny workload (schema of the JSON, the plot), and the bytes/param
accounting. No timing assertions: the numbers depend on the machine and its load."""
import importlib
import json

import pytest
import torch

from svi_kernels import bench  # noqa: F401  (the entry point itself must import)
from svi_kernels._entry import load

microbench = load("microbench")  # benchmarks/ from a checkout, svi_kernels._benchmarks when installed
_pkg = microbench.__package__
traffic = importlib.import_module(_pkg + ".traffic")
rows_mod = importlib.import_module(_pkg + ".rows")
targets = importlib.import_module(_pkg + ".targets")
workloads = importlib.import_module(_pkg + ".workloads")

REQUIRED = {"name": str, "backend": str, "workload": str, "ms": float, "ratio_to_torch_fused_adamw": float,
            "bytes_per_param": float, "gbps": float, "fraction_of_stream": float}


def test_smoke_run_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = microbench.main(["--workload", "tiny", "--backend", "reference", "--repeats", "1", "--warmup", "1",
                          "--stream-numel", "100000", "--json", str(out_json), "--plot", str(out_png),
                          "--no-progress", "--no-peers"])  # the peers: test_state_dtype_rows.py
    assert rc == 0
    printed = capsys.readouterr().out
    assert "torch_adamw_fused" in printed and "streaming bandwidth" in printed

    rows = json.loads(out_json.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        for key, typ in REQUIRED.items():
            assert isinstance(row[key], typ), (key, row)
        assert row["workload"] == "tiny" and row["ms"] > 0 and row["bytes_per_param"] > 0
        assert "status" in row and isinstance(row["targets"], list)
        # memory, counted from the live tensors (none for the bare ops); the peak only with --peak-memory
        if row["name"].startswith("ls_trial"):
            assert row["state_bytes_per_param"] is None
        else:
            assert isinstance(row["state_bytes_per_param"], float) and row["state_bytes_per_param"] >= 0.0
        assert row["peak_bytes_per_param"] is None
    names = {(r["name"], r["backend"]) for r in rows}
    assert ("torch_adamw_fused", "torch") in names and ("torch_adamw_foreach", "torch") in names
    assert ("reference_style_adam_sls_bookkeeping", "reference-style") in names
    fused = next(r for r in rows if r["name"] == "torch_adamw_fused")
    assert fused["ratio_to_torch_fused_adamw"] == pytest.approx(1.0)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Adam moments (+ one 4-byte step count per tensor on the 4.3 K parameters of tiny)
    state = {(r["name"], r["backend"]): r["state_bytes_per_param"] for r in rows}
    assert 8.0 <= state[("torch_adamw_fused", "torch")] <= 8.01 and 8.0 <= state[("adamw", "reference")] <= 8.1
    assert state[("reference_style_armijo_sgd_bookkeeping", "reference-style")] == 0.0


@pytest.mark.parametrize("op,fp32,bf16", [
    ("adam_step", 28, 14), ("sgd_momentum_step", 20, 10), ("ls_trial_sgd", 12, 6), ("ls_trial_adam", 16, 8),
    ("ls_save_sgd", 12, 6), ("ls_save_adam", 28, 14), ("ls_final_adam", 16, 8),
    ("ls_final_adam_from_trial", 20, 10),
    # without a kept start point: saves given an empty w0, moves given w0 = p (docs/kernels.md's table)
    ("ls_save_sgd_no_w0", 4, 2), ("ls_save_adam_no_w0", 20, 10), ("ls_trial_sgd_in_place", 12, 6),
    ("ls_trial_adam_in_place", 16, 8), ("ls_final_adam_in_place", 16, 8),
])
def test_op_bytes_from_reads_and_writes(op, fp32, bf16):
    assert traffic.op_bytes(op, 4) == fp32
    assert traffic.op_bytes(op, 2) == bf16


def test_fp32_state_with_bf16_params():
    # bf16 p and g (2+2 read, 2 written) with fp32 m, v (8 read, 8 written)
    assert traffic.op_bytes("adam_step", 2, state_itemsize=4) == 22
    assert traffic.op_bytes("sgd_momentum_step", 2, state_itemsize=4) == 14


def test_line_search_bookkeeping_is_the_sum_of_its_phases():
    # in place (fp32/fp64): ArmijoSGD's save reads g; the Adam searches check g (4), save the moments
    # (20), try in place (16) and take the final step from the trial point (20)
    assert traffic.bytes_per_param(traffic.armijo_sgd_phases(), 4) == 4 + 12
    assert traffic.bytes_per_param(traffic.adam_sls_phases(), 4) == 4 + 20 + 16 + 20
    assert traffic.bytes_per_param(traffic.adam_search_phases(), 4) == 4 + 20 + 16
    # from a kept w0 (fp16/bf16, keep_start_point=True): the saves copy p, the moves read w0
    assert traffic.bytes_per_param(traffic.armijo_sgd_phases(keeps_w0=True), 4) == 12 + 12
    assert traffic.bytes_per_param(traffic.adam_sls_phases(keeps_w0=True), 2) == 2 + 14 + 8 + 8
    # PLASLS with 10 groups: every step checks and saves all and takes every final step, searches a
    # tenth on average; in place the searched tenth's final step is from its trial point (20), the
    # others' from w0 (16)
    assert traffic.bytes_per_param(traffic.adam_sls_phases(0.1), 4) == pytest.approx(4 + 20 + 1.6 + 2 + 14.4)
    assert traffic.bytes_per_param(traffic.adam_sls_phases(0.1, keeps_w0=True), 4) == pytest.approx(4 + 28 + 1.6 + 16)


def test_every_row_is_accounted():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(20)]
    ctx = rows_mod.Context(params, [torch.zeros(3)] * 20, torch.device("cpu"), torch.float32)
    expected = {"torch_adamw_foreach": 28, "torch_adamw_fused": 28, "adamw": 28, "svi_sgd": 20, "svi_adam": 28,
                "ls_trial_sgd": 12, "ls_trial_adam": 16, "armijo_sgd_bookkeeping": 16, "adam_sls_bookkeeping": 60,
                "layerwise_adam_sls_bookkeeping": 4 + 20 + 36 / 10 + 16 * 9 / 10, "salsa_search_bookkeeping": 40,
                "salsa_skipped_step": 28,
                # issue 24: 2-byte state (bf16), 8-bit codes with a 4-byte scale per 256 (the peers)
                "adamw_bf16_state": 20, "adam_sls_bookkeeping_bf16_state": 46,
                "salsa_search_bookkeeping_bf16_state": 30,
                "layerwise_adam_sls_bookkeeping_bf16_state": 4 + 12 + 30 / 10 + 12 * 9 / 10,
                "bnb_adamw8bit": 12 + 4 * (1 + 4 / 256), "torchao_adamw8bit": 12 + 4 * (1 + 4 / 256)}
    # int8 state (ours): each 4-byte state access of the fp32 row moves 1 + 4/256 bytes (a 2-byte one in bf16)
    expected.update({name + "_int8_state": expected[name] - (expected[name] - expected[name + "_bf16_state"]) / 2 *
                     (4 - (1 + 4 / 256)) for name in ("adamw", "adam_sls_bookkeeping", "salsa_search_bookkeeping",
                                                      "layerwise_adam_sls_bookkeeping")})
    seen = set()
    for row in rows_mod.build_rows(["cpu"]):
        name = row.name.replace("reference_style_", "")
        got = traffic.bytes_per_param(row.phases(ctx), 4, row.traffic_state_itemsize(None, 4))
        assert got == pytest.approx(expected[name]), row.name
        seen.add(row.name)
    assert {"reference_style_armijo_sgd_bookkeeping", "layerwise_adam_sls_bookkeeping"} <= seen


def test_bf16_line_searches_are_counted_from_their_kept_start_point():
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)) for _ in range(20)]
    ctx = rows_mod.Context(params, [torch.zeros(3, dtype=torch.bfloat16)] * 20, torch.device("cpu"), torch.bfloat16)
    expected = {"ls_trial_sgd": 6, "ls_trial_adam": 8, "armijo_sgd_bookkeeping": 6 + 6,
                "salsa_search_bookkeeping": 2 + 14 + 8, "adam_sls_bookkeeping": 2 + 14 + 8 + 8,
                "layerwise_adam_sls_bookkeeping": 2 + 14 + 8 / 10 + 8}
    for row in rows_mod.build_rows(["cpu"]):
        if row.name in expected:
            assert traffic.bytes_per_param(row.phases(ctx), 2) == pytest.approx(expected[row.name]), row.name


def test_targets_mark_missing_rows():
    def row(name, backend, kind, ms, ratio, frac, workload="w", gbps=10.0):
        return {"name": name, "backend": backend, "kind": kind, "workload": workload, "ms": ms,
                "ratio_to_torch_fused_adamw": ratio, "fraction_of_stream": frac, "gbps": gbps,
                "compare_to": "reference_style_adam_sls_bookkeeping" if "sls" in name else None}
    rows = [row("adamw", "cpu", "ours", 1.0, 0.9, 0.9), row("svi_sgd", "cpu", "ours", 1.0, 0.9, 0.9),
            row("adam_sls_bookkeeping", "cpu", "ours", 1.0, 2.0, 0.9),
            row("reference_style_adam_sls_bookkeeping", "reference-style", "reference-style", 4.0, 8.0, 0.2),
            row("adamw", "reference", "ours", 9.0, 9.0, 0.1),
            row("adamw", "cpu", "ours", 1.0, 0.9, 0.9, workload="huge", gbps=30.0),
            row("adamw", "cpu", "ours", 1.0, 0.9, 0.3, workload="many-small", gbps=10.0),
            row("svi_sgd", "cpu", "ours", 1.0, 0.7, 0.7, workload="huge")]
    targets.evaluate(rows)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("MISSING") and "0.8x" in rows[1]["status"]
    assert "5x faster" in rows[2]["status"] and rows[2]["speedup_vs_reference_style"] == pytest.approx(4.0)
    assert rows[3]["status"] == "-" and rows[4]["status"] == "-"  # baselines and the oracle carry no target
    # per-byte cost: fraction of stream on huge / here (each against its own probe windows): 0.9 / 0.3
    assert rows[6]["per_byte_cost_vs_huge"] == pytest.approx(3.0) and "per-byte" in rows[6]["status"]
    assert "of stream" not in rows[6]["status"] and "of stream" not in rows[0]["status"]  # huge, bert-base only
    assert "80% of stream" in rows[7]["status"]


def test_targets_say_when_a_limit_lies_within_the_run_s_noise():
    def row(name, ratio, interval, frac=0.9, frac_interval=(0.85, 0.95), workload="huge", ms=1.0, ms_interval=None):
        return {"name": name, "backend": "cpu", "kind": "ours", "workload": workload, "ms": ms,
                "ratio_to_torch_fused_adamw": ratio, "ratio_interval": interval, "fraction_of_stream": frac,
                "fraction_of_stream_interval": frac_interval, "ms_interval": ms_interval, "gbps": 10.0,
                "compare_to": "reference_style_armijo_sgd_bookkeeping" if "armijo" in name else None}
    rows = [row("adamw", 1.02, (0.97, 1.08)),                        # missed, but the limit 1.0 is inside
            row("svi_sgd", 0.85, (0.82, 0.90)),                      # missed clearly
            row("ls_trial_sgd", 0.48, (0.45, 0.53), frac=0.79, frac_interval=(0.70, 0.81)),  # met in noise; missed in noise
            row("ls_trial_adam", 0.40, (0.38, 0.42)),                # met clearly
            row("adamw", 0.9, (0.9, 0.9), frac=0.3, frac_interval=(0.25, 0.5), workload="many-small"),
            row("armijo_sgd_bookkeeping", 0.5, None, ms=2.0, ms_interval=(1.8, 2.4), workload="w"),
            dict(row("reference_style_armijo_sgd_bookkeeping", 5.0, None, ms=9.0, ms_interval=(8.0, 10.0), workload="w"),
                 kind="reference-style", backend="reference-style")]
    targets.evaluate(rows)
    by = [{c["target"]: c for c in r["targets"]} for r in rows]
    assert by[0]["<= 1x torch fused AdamW"]["within_noise"] and "AdamW (within noise)" in rows[0]["status"]
    assert by[1]["<= 0.8x torch fused AdamW"]["within_noise"] is False and "(within noise)" not in rows[1]["status"]
    assert by[2]["<= 0.5x torch fused AdamW"]["met"] and by[2]["<= 0.5x torch fused AdamW"]["within_noise"]
    assert by[2][">= 80% of stream"]["met"] is False and "stream (within noise)" in rows[2]["status"]
    assert by[3]["<= 0.5x torch fused AdamW"]["within_noise"] is False
    # per-byte cost 0.9 / 0.3 = 3 (missed); its interval from the two fractions' intervals: [0.85/0.5, 0.95/0.25]
    cost = by[4]["<= 2x per-byte cost of huge"]
    assert cost["met"] is False and cost["interval"] == pytest.approx((1.7, 3.8)) and cost["within_noise"]
    # speedup vs reference-style 9 / 2 = 4.5 (missed); interval [8/2.4, 10/1.8] holds 5
    speed = by[5][">= 5x faster than reference-style"]
    assert speed["met"] is False and speed["interval"] == pytest.approx((8 / 2.4, 10 / 1.8)) and speed["within_noise"]
    # met/missed within noise: rows 0, 2 (stream), 4 (cost), 5 (speedup) missed; row 2's ratio met
    assert targets.within_noise(rows) == (1, 4)
    assert targets.summary(rows)[1] == 5  # counted as missed all the same: the median decides


def test_workload_shapes_come_from_bert_config():
    pytest.importorskip("transformers")
    mini = workloads.minilm()
    assert len(mini.shapes) == 103 and 20e6 < mini.numel < 25e6
    assert workloads.many_small().numel == 1000 * 4096 and len(workloads.huge().shapes) == 1
