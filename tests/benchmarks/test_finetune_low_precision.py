"""svi-finetune low-precision (issue 24): the arms really run in the precision they name, the scoring
marks an arm outside one fp32 std, and the command end to end on a tiny random BERT."""
import importlib
import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")

from svi_kernels._entry import load

cli = load("finetune.cli")
_pkg = cli.__package__
LP = importlib.import_module(_pkg + ".low_precision")
O = importlib.import_module(_pkg + ".optimizers")
T = importlib.import_module(_pkg + ".train")

COMMON = ["--model", "tiny-random", "--dataset", "synthetic", "--scale", "smoke", "--threads", "1", "--no-progress"]


def test_precision_kwargs():
    assert O.precision_kwargs() == {}
    assert O.precision_kwargs("bf16", "8bit") == {"state_dtype": torch.bfloat16, "master_weights": "8bit"}
    assert O.precision_kwargs("int8", "false") == {"state_dtype": "int8", "master_weights": False}
    with pytest.raises(ValueError):
        O.precision_kwargs("fp8")
    top = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="takes no state_dtype"):
        O.build("sgd", top, top, lr=0.1, steps_per_epoch=1, precision={"state_dtype": "int8"})


def test_plan():
    plan = LP.settings("study")
    assert [s.name for s in plan] == ["classifier-n500", "top1-n500"]
    for s in plan:
        assert s.seeds == list(range(10))
        assert {a.label for a in s.arms} == {LP.label(o, a) for o in LP.OPTIMIZERS for a in LP.ARMS}
        adamw = {a.label: a for a in s.arms}["adamw+bf16-8bit-int8"]
        assert adamw.overrides == dict(LP.ADAMW_RECIPE, param_dtype="bf16", master_weights="8bit", state_dtype="int8")
    assert {a.label: a.lrs for a in plan[0].arms}["adamw+fp32"] == [1e-3]
    assert {a.label: a.lrs for a in plan[1].arms}["adamw+fp32"] == [3e-3]
    assert 0 < LP.estimate_seconds(plan) < 24 * 3600


def _run(acc):
    return {"final_val_acc": acc, "steps": 10, "train_wall_s": 1.0, "forwards_per_step": 1.0, "diverged": False,
            "memory": {"param_dtype": "float32", "state_dtypes": ["float32"], "state_bytes_per_param": 8.0,
                       "train_bytes_per_param": 16.0}}


def test_scoring_marks_an_arm_outside_one_std():
    runs = {"adamw+fp32": [_run(a) for a in (0.70, 0.72, 0.74)],          # mean 0.72, std 0.02
            "adamw+bf16": [_run(a) for a in (0.60, 0.62, 0.64)],          # 5 stds below
            "adamw+state-int8": [_run(a) for a in (0.705, 0.715, 0.725)],  # 0.25 std below
            "adamsls-auto+fp32": [_run(a) for a in (0.5, 0.5, 0.5)],      # std 0
            "adamsls-auto+bf16": [_run(a) for a in (0.5, 0.5, 0.49)]}
    s = LP.score_setting(runs)["arms"]
    assert s["adamw+bf16"]["diff_in_std"] == pytest.approx(-5.0) and not s["adamw+bf16"]["within_one_std"]
    assert s["adamw+state-int8"]["diff_in_std"] == pytest.approx(-0.25) and s["adamw+state-int8"]["within_one_std"]
    assert s["adamw+fp32"]["within_one_std"]
    assert math.isinf(s["adamsls-auto+bf16"]["diff_in_std"]) and not s["adamsls-auto+bf16"]["within_one_std"]
    one = LP.score_setting({"adamw+fp32": [_run(0.7)], "adamw+bf16": [_run(0.6)]})["arms"]
    assert "within_one_std" not in one["adamw+bf16"]  # one seed: no std to compare with
    md = LP.markdown({"x": {"arms": s}})
    row = next(line for line in md.splitlines() if line.startswith("| adamw | bf16 |"))
    assert "**no**" in row and "-5.00" in row


def test_estimate_is_printed_first(tmp_path, capsys):
    assert cli.main(["low-precision", "--out", str(tmp_path), "--estimate-only", "--seeds", "0"] + COMMON) == 0
    assert re.search(r"estimated runtime ~\d+ min", capsys.readouterr().err)
    assert not (tmp_path / "low-precision").exists()


def test_refuses_options_it_fixes_and_arms_without_fp32(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["low-precision", "--out", str(tmp_path), "--lr-grid", "1e-3"] + COMMON)
    assert "--lr-grid would be ignored" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["low-precision", "--out", str(tmp_path), "--arms", "bf16"] + COMMON)
    assert "must include fp32" in capsys.readouterr().err


def test_low_precision_end_to_end(tmp_path, capsys):
    """2 seeds x every arm x both optimizers on the smoke setting; the run files say what precision
    each arm really trained in, counted from the live tensors."""
    assert cli.main(["low-precision", "--out", str(tmp_path), "--seeds", "0", "1"] + COMMON) == 0
    err = capsys.readouterr().err
    assert err.index("estimated runtime") < err.index("done in")
    d = tmp_path / "low-precision"
    scores = json.loads((d / "scores.json").read_text())["scores"]["classifier-n64"]["arms"]
    assert set(scores) == {LP.label(o, a) for o in LP.OPTIMIZERS for a in LP.ARMS}
    for opt in LP.OPTIMIZERS:
        fp32, bf16 = scores[f"{opt}+fp32"], scores[f"{opt}+bf16"]
        assert fp32["param_dtype"] == "float32" and fp32["state_dtypes"] == ["float32"]
        assert fp32["state_bytes_per_param"] == pytest.approx(8.0, abs=0.05)
        assert scores[f"{opt}+state-bf16"]["state_dtypes"] == ["bfloat16"]
        assert scores[f"{opt}+state-bf16"]["state_bytes_per_param"] == pytest.approx(4.0, abs=0.05)
        assert "int8" in scores[f"{opt}+state-int8"]["state_dtypes"]
        assert scores[f"{opt}+state-int8"]["state_bytes_per_param"] < 2.2
        assert bf16["param_dtype"] == "bfloat16" and "float32" not in bf16["state_dtypes"]
        for arm in ("bf16-master", "bf16-kahan", "bf16-8bit", "bf16-stochastic", "bf16-8bit-int8"):
            assert scores[f"{opt}+{arm}"]["param_dtype"] == "bfloat16", arm
        assert scores[f"{opt}+bf16-master"]["state_bytes_per_param"] == pytest.approx(12.0, abs=0.05)
        assert scores[f"{opt}+bf16-8bit-int8"]["train_bytes_per_param"] < 7.2  # the 7 B/param configuration
        assert all("within_one_std" in st for st in scores.values())
    assert scores["adamsls-auto+fp32"]["forwards_per_step"] >= 1.0
    run = json.loads(next((d / "runs").glob("classifier-n64__adamw+bf16-8bit__*s0.json")).read_text())
    assert run["config"]["param_dtype"] == "bf16" and run["config"]["master_weights"] == "8bit"
    md = (d / "report.md").read_text()
    for table in re.findall(r"((?:^\|.*\|\n)+)", md, flags=re.M):
        assert len({line.count("|") for line in table.strip().splitlines()}) == 1, table
    # a second call re-uses every finished run (and the shared modules went back to float32)
    before = {p.name: p.stat().st_mtime_ns for p in (d / "runs").iterdir()}
    assert cli.main(["low-precision", "--out", str(tmp_path), "--seeds", "0", "1"] + COMMON) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (d / "runs").iterdir()} == before


def test_bf16_top_is_cast_back_after_the_run():
    """The trained modules are shared with the backbone: a bf16 run must leave them float32."""
    ctx_mod = importlib.import_module(_pkg + ".claims")
    ctx = ctx_mod.Context("tiny-random", "synthetic", "/tmp/unused", progress=False)
    tr, va, _ = ctx.features(0, 32)
    cfg = T.RunConfig(optimizer="adamw", lr=1e-3, seed=0, top_layers=0, epochs=1, batch_size=16,
                      param_dtype="bf16", master_weights="kahan")
    res = T.run(ctx.backbone, ctx.top(0), tr, va, cfg)
    assert res["memory"]["param_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in ctx.backbone.model.parameters())
