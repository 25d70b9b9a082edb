"""svi-finetune end to end on a tiny random BERT and synthetic sentences (no network, no model package):
each claim's code path, the JSON per run, the summaries and the Markdown report. Plus the pieces the
study's numbers rest on: the trainable top equals HF's forward, the data split and loaders."""
import importlib
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from svi_kernels import finetune  # noqa: F401  (the entry point itself must import)
from svi_kernels._entry import load

cli = load("finetune.cli")  # benchmarks.finetune from a checkout, svi_kernels._benchmarks.finetune when installed
_pkg = cli.__package__
data = importlib.import_module(_pkg + ".data")
model_mod = importlib.import_module(_pkg + ".model")
features = importlib.import_module(_pkg + ".features")

COMMON = ["--model", "tiny-random", "--dataset", "synthetic", "--scale", "smoke", "--threads", "1", "--no-progress"]
RUN_KEYS = {"config", "implementation", "steps", "final_val_acc", "best_val_acc", "final_train_loss",
            "train_wall_s", "train_cpu_s", "forwards_per_step", "history", "setting", "arm", "mode"}


def _check_claim(out, claim, arms):
    summary = json.loads((out / claim / "summary.json").read_text())
    assert summary["settings"]
    for entry in summary["settings"]:
        assert set(entry["arms"]) == set(arms)
        for arm in entry["arms"].values():
            for rel in arm["runs"]:
                run = json.loads((out / claim / rel).read_text())
                assert RUN_KEYS <= set(run)
                h = run["history"]
                assert len(h["step"]) == len(h["val_acc"]) == len(h["wall_s"]) >= 2
                assert 0.0 <= run["final_val_acc"] <= 1.0 and run["steps"] > 0
    stats = json.loads((out / claim / "stats.json").read_text())
    assert set(stats) == {e["setting"]["name"] for e in summary["settings"]}
    md = (out / "report.md").read_text()
    # well-formed tables: every row of a table has the header's number of cells
    for table in re.findall(r"((?:^\|.*\|\n)+)", md, flags=re.M):
        widths = {line.count("|") for line in table.strip().splitlines()}
        assert len(widths) == 1, table
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / img).stat().st_size > 0
    return summary, stats, md


@pytest.mark.parametrize("claim,arms", [("svi", {"sgd", "svi"}),
                                        ("linesearch", {"adam", "adamsls", "plasls"}),
                                        ("stability", {"bert-default", "stable"}),
                                        ("stabilizers", {"bert-default", "mosbach", "bias-corrected", "mmr",
                                                         "mhloss", "surt", "svi", "linesearch"})])
def test_claim_end_to_end(tmp_path, claim, arms):
    assert cli.main([claim, "--out", str(tmp_path)] + COMMON) == 0
    summary, stats, md = _check_claim(tmp_path, claim, arms)
    assert "| setting |" in md
    if claim == "linesearch":
        ls = [a for s in stats.values() for n, a in s["arms"].items() if n != "adam"]
        assert all(a["forwards_per_step"] >= 2.0 for a in ls)  # line search: >= 1 trial forward per step
    if claim in ("stability", "stabilizers"):
        assert "failed (≤ majority)" in md
        # the report can be rebuilt from the JSON files alone
        (tmp_path / "report.md").unlink()
        assert cli.main(["report", "--out", str(tmp_path)]) == 0
        assert "failed (≤ majority)" in (tmp_path / "report.md").read_text()


def test_custom_run_and_determinism(tmp_path):
    args = ["run", "--mode", "top1", "--optimizer", "svi", "sgd", "--lr", "0.05", "--seeds", "3",
            "--epochs", "1"] + COMMON
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0
    for arm in ("svi", "sgd"):
        name = f"top1__{arm}__lr0.05__s3.json"
        ra = json.loads((tmp_path / "a" / "custom" / "runs" / name).read_text())
        rb = json.loads((tmp_path / "b" / "custom" / "runs" / name).read_text())
        assert ra["history"]["val_acc"] == rb["history"]["val_acc"]
        assert ra["history"]["train_loss"][1:] == rb["history"]["train_loss"][1:]
    ra = json.loads((tmp_path / "a" / "custom" / "runs" / "top1__svi__lr0.05__s3.json").read_text())
    assert "svi_kernels.SVI" in ra["implementation"]
    assert "intermediate.dense" in ra["notes"][0] and "pooler.dense" in ra["notes"][0]


def test_full_model_mode_with_plasls(tmp_path):
    """Full fine-tuning (embeddings trained too): PLASLS gets the embeddings, layer and head groups."""
    args = ["run", "--mode", "full", "--optimizer", "plasls", "adamw", "--lr", "1e-3", "--seeds", "0",
            "--epochs", "1", "--out", str(tmp_path)] + COMMON
    assert cli.main(args) == 0
    run = json.loads((tmp_path / "custom" / "runs" / "full__plasls__lr0.001__s0.json").read_text())
    assert len(run["line_search"]["step_sizes"]) == 4  # embeddings, 2 layers, head
    assert run["forwards_per_step"] >= 2.0


def test_trainable_top_matches_hf_forward():
    ds = data.synthetic()
    bb = model_mod.load_backbone("tiny-random", ds.train_texts)
    ids, mask = bb.tokenize(ds.val_texts[:12], 64)
    with torch.no_grad():
        ref = bb.model(input_ids=ids, attention_mask=mask).logits
        for k in (0, 1, 2, -1):
            feats = features.frozen_features(bb, "check", ds.val_texts[:12], ds.val_labels[:12], k)
            x, m, _ = feats.batch(torch.arange(12))
            got = model_mod.TrainableTop(bb.model, k).eval()(x, m)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    features.clear_cache()


def test_polarity_split_and_glue_loader(tmp_path):
    rows = [f'"1","good film {i}"' for i in range(10)] + [f'"-1","bad film {i}"' for i in range(10)]
    (tmp_path / data.POLARITY_FILE).write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    ds = data.polarity_from_csv(str(tmp_path / data.POLARITY_FILE))  # the parser (load_polarity also checks sha256)
    assert len(ds.val_texts) == 4 and len(ds.train_texts) == 16
    assert sorted(ds.val_texts) == ["bad film 4", "bad film 9", "good film 4", "good film 9"]
    assert all((t.startswith("good")) == (y == 1) for t, y in zip(ds.train_texts, ds.train_labels))
    assert ds.majority_accuracy() == 0.5 and ds.subset(5).train_texts == ds.train_texts[:5]
    glue = tmp_path / "sst2"
    glue.mkdir()
    (glue / "train.tsv").write_text("sentence\tlabel\nnice one \t1\nawful\t0\n")
    (glue / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    g = data.load_dataset(str(glue))
    assert sorted(zip(g.train_texts, g.train_labels)) == [("awful", 0), ("nice one ", 1)]
    assert g.val_labels == [1]
