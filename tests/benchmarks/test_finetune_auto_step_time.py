"""benchmarks/finetune/auto_step_time.py runs and reports every arm against AdamW (a smoke test: the
ratios themselves are measured by running the script, never asserted in a test)."""
from svi_kernels._entry import load


def test_auto_step_time_reports_every_arm(capsys):
    mod = load("finetune.auto_step_time")  # benchmarks.finetune from a checkout, svi_kernels._benchmarks when installed
    assert mod.main(["--steps", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for arm in mod.ARMS:
        assert arm in out
    assert "x AdamW" in out
