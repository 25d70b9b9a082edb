"""The SaLSA skipped-step row is held to our own AdamW on the same workload and backend."""
import importlib

from svi_kernels._entry import load

# benchmarks/ from a checkout, svi_kernels._benchmarks when installed (the wheel check runs both)
targets = importlib.import_module(load("microbench").__package__ + ".targets")


def _row(name, ms, workload="minilm"):
    return {"name": name, "backend": "cpu", "kind": "ours", "workload": workload, "ms": ms,
            "ratio_to_torch_fused_adamw": 1.0, "fraction_of_stream": 0.9, "gbps": 10.0, "compare_to": None}


def test_skipped_step_within_five_percent_of_our_adamw():
    rows = [_row("adamw", 10.0), _row("salsa_skipped_step", 10.4),
            _row("adamw", 10.0, "huge"), _row("salsa_skipped_step", 10.6, "huge")]
    targets.evaluate(rows)
    assert rows[1]["status"] == "ok" and rows[1]["ratio_to_ours_adamw"] == 1.04
    assert "1.05x our adamw" in rows[3]["status"]
