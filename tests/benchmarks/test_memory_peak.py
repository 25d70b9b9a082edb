"""Peak memory of an optimizer step (benchmarks/memory.py): the meter itself, the fresh-process run on a
workload large enough for per-parameter figures (4 M parameters: a page-sized error is far below 0.01
B/param), and svi-bench's --peak-memory wiring. No timing is asserted."""
import importlib
import json
import os
import sys

import pytest
import torch

from svi_kernels._entry import load

microbench = load("microbench")
_pkg = microbench.__package__
memory = importlib.import_module(_pkg + ".memory")
rows_mod = importlib.import_module(_pkg + ".rows")
workloads = importlib.import_module(_pkg + ".workloads")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/clear_refs"),
                                reason="the CPU meter reads and resets /proc/self's high-water mark")
NUMEL = 1 << 22
WORKLOAD = workloads.Workload("test-4m", [(1 << 21,), (1 << 20,), (1 << 20,)], "4 M parameters in 3 tensors")


@linux_only
def test_the_cpu_meter_sees_a_freed_transient_and_starts_at_the_reset():
    meter = memory._CpuMeter()
    assert meter.method == "VmHWM" and meter.peak() < 4 << 20  # a few pages of interpreter work at most
    # 64 MB, touched, then freed: above glibc's largest mmap threshold (32 MB), so fresh pages, not heap
    # this (long-lived test) process freed earlier and still holds
    transient = torch.empty(1 << 24).fill_(1.0)
    del transient
    assert meter.peak() >= 63 << 20


@pytest.fixture(scope="module")
def torch_peaks():
    rows = [r for r in rows_mod.build_rows(["reference"]) if r.name in ("torch_adamw_fused", "torch_adamw_foreach")]
    rows.append(rows_mod.Row("no_such_row", "reference", "ours", lambda ctx: [], lambda ctx: (None, None)))
    peaks = memory.measure_peaks(rows, ["reference"], WORKLOAD, torch.float32, torch.device("cpu"), steps=2)
    return {r["name"]: r for r in peaks}


@linux_only
def test_torch_adamw_peaks_at_its_moments_and_foreach_adds_its_temporaries(torch_peaks):
    fused, foreach = torch_peaks["torch_adamw_fused"], torch_peaks["torch_adamw_foreach"]
    for r in (fused, foreach):
        assert "error" not in r, r.get("traceback", r)
        assert r["numel"] == NUMEL and r["steps"] == 2 and r["peak_method"] == "VmHWM"
        assert r["state_bytes_per_param"] == pytest.approx(8.0, abs=1e-3) == r["state_max_bytes_per_param"]
    # fused: exp_avg and exp_avg_sq (8 B/param), nothing parameter-sized beside them
    assert 7.5 <= fused["peak_bytes_per_param"] <= 9.5, fused
    # torch 2.13's foreach AdamW also holds its denominators sqrt(v)/bc + eps (4 B/param) during a step
    assert foreach["peak_bytes_per_param"] >= fused["peak_bytes_per_param"] + 3.0, foreach
    assert foreach["peak_bytes_per_param"] <= 14.0, foreach
    assert fused["peak_minus_torch_fused_adamw"] == 0.0
    assert foreach["peak_minus_torch_fused_adamw"] == pytest.approx(
        foreach["peak_bytes_per_param"] - fused["peak_bytes_per_param"])


def test_a_row_that_fails_is_reported_not_raised(torch_peaks):
    assert "no svi-bench row 'no_such_row'" in torch_peaks["no_such_row"]["error"]
    table = memory.format_table(list(torch_peaks.values()))
    assert "torch_adamw_fused" in table and "no_such_row" not in table


def test_op_rows_have_no_peak_to_measure():
    rows = [r for r in rows_mod.build_rows(["reference"]) if r.op_only]
    assert {r.name for r in rows} == {"ls_trial_sgd", "ls_trial_adam"}
    assert memory.measure_peaks(rows, ["reference"], WORKLOAD, torch.float32, torch.device("cpu")) == []


def test_svi_bench_peak_memory_fills_the_rows_of_its_workload(tmp_path, capsys):
    out_json, mem_json = tmp_path / "bench.json", tmp_path / "memory.json"
    rc = microbench.main(["--workload", "tiny", "--backend", "reference", "--rows", "adamw,adam_sls_bookkeeping",
                          "--repeats", "1", "--warmup", "1", "--stream-numel", "100000", "--json", str(out_json),
                          "--plot", "", "--no-progress", "--peak-memory", "--peak-workload", "tiny",
                          "--memory-json", str(mem_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "peak B/p" in printed and "state B/p" in printed and "optimizer memory on tiny" in printed
    rows = json.loads(out_json.read_text())
    assert {r["name"] for r in rows} == {"torch_adamw_fused", "adamw", "adam_sls_bookkeeping"}
    for r in rows:  # tiny's 4 K parameters make the figures noise: only their presence is checked here
        assert isinstance(r["peak_bytes_per_param"], float) and r["peak_method"]
        assert r["state_bytes_per_param"] >= 8.0 - 1e-9
        assert r["state_max_bytes_per_param"] >= r["state_bytes_per_param"] - 1e-9
    peaks = json.loads(mem_json.read_text())
    assert {p["name"] for p in peaks} == {r["name"] for r in rows} and all(p["workload"] == "tiny" for p in peaks)
