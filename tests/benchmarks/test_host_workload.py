"""svi-bench's host-overhead workload (host-10k): its shapes, which rows run on it, its targets."""
import importlib

import pytest

from svi_kernels._entry import load

microbench = load("microbench")
_pkg = microbench.__package__
rows_mod = importlib.import_module(_pkg + ".rows")
targets = importlib.import_module(_pkg + ".targets")
workloads = importlib.import_module(_pkg + ".workloads")


def test_host_workload_is_ten_thousand_tiny_tensors_run_by_default():
    wl = workloads.get("host-10k")
    assert len(wl.shapes) == 10_000 and set(wl.shapes) == {(64,)} and wl.numel == 640_000
    assert "host-10k" in workloads.DEFAULT_WORKLOADS


def test_every_optimizer_row_runs_on_it_but_not_the_reference_style_ones():
    rows = rows_mod.build_rows(["cpu"])
    on_host = {r.name for r in rows if r.runs_on("host-10k")}
    for name in ("torch_adamw_fused", "adamw", "svi_sgd", "svi_adam", "ls_trial_sgd", "armijo_sgd_bookkeeping",
                 "adam_sls_bookkeeping", "layerwise_adam_sls_bookkeeping"):
        assert name in on_host
    assert not any(n.startswith("reference_style") for n in on_host)
    assert all(r.runs_on("huge") for r in rows)


def _row(name, ratio, frac=0.01):
    return {"name": name, "backend": "cpu", "kind": "ours", "workload": "host-10k", "ms": 1.0,
            "ratio_to_torch_fused_adamw": ratio, "fraction_of_stream": frac, "gbps": 1.0, "compare_to": None}


@pytest.mark.parametrize("name,ratio,ok", [("adamw", 0.13, True), ("adamw", 0.2, False), ("svi_sgd", 0.2, False),
                                           ("adam_sls_bookkeeping", 0.44, True),
                                           ("armijo_sgd_bookkeeping", 0.5, False)])
def test_host_targets_are_ratios_without_a_bandwidth_target(name, ratio, ok):
    rows = [_row(name, ratio)]
    targets.evaluate(rows)
    assert (rows[0]["status"] == "ok") == ok, rows[0]["status"]
    assert "stream" not in rows[0]["status"]  # 1% of stream is no miss on this workload
