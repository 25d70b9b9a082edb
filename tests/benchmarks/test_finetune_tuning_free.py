"""svi-finetune tuning-free (claim 5): the lr-free peers' arms as their READMEs ask, the AlgoPerf-style
scoring on hand-made runs, and the command end to end on a tiny random BERT."""
import importlib
import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from svi_kernels._entry import load

cli = load("finetune.cli")
_pkg = cli.__package__
TF = importlib.import_module(_pkg + ".tuning_free")
O = importlib.import_module(_pkg + ".optimizers")


def _top(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _train(built, top, steps=5):
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for _ in range(steps):
        built.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(top(x), y).backward()
        built.optimizer.step()
        built.after_step()


@pytest.mark.parametrize("name", list(O.PEERS))
def test_peer_builds_at_its_defaults_and_trains(name):
    pytest.importorskip(O.PEERS[name][0])
    top = _top()
    before = [p.detach().clone() for p in top.parameters()]
    built = O.build(name, top, top, lr=123.0, steps_per_epoch=10)  # the lr slot is ignored
    assert not built.line_search and name in O.NO_LR
    assert built.optimizer.param_groups[0]["lr"] == {"prodigy": 1.0, "schedulefree": 0.0025, "dadapt-adam": 1.0,
                                                     "ldog": 1.0}[name]
    _train(built, top)
    assert any(not torch.equal(a, b) for a, b in zip(before, top.parameters()))


def test_schedulefree_evaluates_in_eval_mode_and_trains_in_train_mode():
    pytest.importorskip("schedulefree")
    top = _top()
    built = O.build("schedulefree", top, top, lr=1.0, steps_per_epoch=10)
    assert built.optimizer.param_groups[0]["train_mode"]
    _train(built, top)
    trained = [p.detach().clone() for p in top.parameters()]
    with built.evaluating(top):
        assert not built.optimizer.param_groups[0]["train_mode"]
        assert any(not torch.equal(a, b) for a, b in zip(trained, top.parameters()))  # the averaged point x
    assert built.optimizer.param_groups[0]["train_mode"]
    assert all(torch.equal(a, b) for a, b in zip(trained, top.parameters()))


def test_ldog_evaluates_at_the_averaged_weights():
    dog = pytest.importorskip("dog")
    top = _top()
    built = O.build("ldog", top, top, lr=1.0, steps_per_epoch=10)
    assert isinstance(built.averager, dog.PolynomialDecayAverager)
    _train(built, top, steps=8)
    trained = {k: v.clone() for k, v in top.state_dict().items()}
    averaged = built.averager.averaged_model.state_dict()
    with built.evaluating(top):
        for k, v in top.state_dict().items():
            assert torch.equal(v, averaged[k])
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)
    for k, v in top.state_dict().items():
        assert torch.equal(v, trained[k])


def test_missing_peer_says_what_to_install(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **kw):
        if name == "prodigyopt":
            raise ImportError("no")
        return real(name, *a, **kw)

    monkeypatch.setattr(O.importlib, "import_module", fake)
    with pytest.raises(RuntimeError, match=r"prodigyopt==1\.1\.2.*tuning-free"):
        O.build("prodigy", _top(), _top(), lr=1.0, steps_per_epoch=10)


# ------------------------------------------------------------------------------------------ scoring
def _run(accs, passes_per_eval=10, wall_per_eval=1.0, steps_per_eval=5):
    n = len(accs)
    return {"final_val_acc": accs[-1], "steps": steps_per_eval * (n - 1), "forwards_per_step": 1.0,
            "train_wall_s": wall_per_eval * (n - 1),
            "history": {"val_acc": list(accs), "step": [steps_per_eval * i for i in range(n)],
                        "wall_s": [wall_per_eval * i for i in range(n)],
                        "forwards": [passes_per_eval // 2 * i for i in range(n)],
                        "backwards": [passes_per_eval // 2 * i for i in range(n)]}}


def test_scoring_as_algoperf():
    runs = {
        "adamw": {1e-4: [_run([0.5, 0.6, 0.7]), _run([0.5, 0.6, 0.72]), _run([0.5, 0.6, 0.74])],  # mean 0.72
                  1e-3: [_run([0.5, 0.8, 0.80]), _run([0.5, 0.7, 0.78]), _run([0.5, 0.5, 0.5])]},  # mean 0.693
        "fast": {1.0: [_run([0.5, 0.75, 0.8], passes_per_eval=4)] * 3},
        "never": {1.0: [_run([0.5, 0.6, 0.6])] * 3},
    }
    s = TF.score_setting(runs, margin=0.01)
    assert s["adamw_best_lr"] == 1e-4
    assert s["target"] == pytest.approx(0.72 - 0.01)
    best, sweep = s["methods"][TF.BEST], s["methods"][TF.SWEEP]
    assert best["final_mean"] == pytest.approx(0.72) and best["reached"] == 2 and best["fraction"] == pytest.approx(2 / 3)
    assert best["ttt_passes"] == 20 and best["ttt_wall_s"] == 2.0
    assert best["total_passes"] == 20
    # the sweep pays for the other lr's whole run of the same seed (20 passes, 2 s) on top
    assert sweep["ttt_passes"] == 40 and sweep["total_passes"] == 40 and sweep["total_wall_s"] == 4.0
    fast, never = s["methods"]["fast"], s["methods"]["never"]
    assert fast["ttt_passes"] == 4 and fast["fraction"] == 1.0
    assert never["reached"] == 0 and never["ttt_passes"] is None and math.isinf(never["profile_passes"])
    prof = TF.performance_profile({"a": s, "b": s}, [1.0, 5.0, 10.0, 100.0])
    assert prof["fast"] == [1.0, 1.0, 1.0, 1.0]
    assert prof[TF.BEST] == [0.0, 1.0, 1.0, 1.0]  # 20 passes vs 4: within 5x
    assert prof[TF.SWEEP] == [0.0, 0.0, 1.0, 1.0]
    assert prof["never"] == [0.0] * 4


def test_plan_and_estimate():
    plan = TF.settings("study")
    assert [s.top_layers for s in plan] == [0, 1, 2, -1]  # the study's three and one end to end
    for s in plan:
        arms = {a.label: a for a in s.arms}
        assert set(arms) == set(TF.ARMS)
        assert arms["adamw"].lrs == TF.ADAMW_LRS and len(TF.ADAMW_LRS) == 5
        assert s.tune_seeds == s.seeds == list(range(10))  # every lr on every seed: the sweep's real cost
    assert 0 < TF.estimate_seconds(plan) < 24 * 3600


COMMON = ["--model", "tiny-random", "--dataset", "synthetic", "--scale", "smoke", "--threads", "1", "--no-progress",
          "--seeds", "0"]


def test_estimate_is_printed_first(tmp_path, capsys):
    assert cli.main(["tuning-free", "--out", str(tmp_path), "--estimate-only"] + COMMON) == 0
    err = capsys.readouterr().err
    assert re.search(r"estimated runtime ~\d+ min", err)
    assert not (tmp_path / "tuning-free").exists()


def test_tuning_free_end_to_end(tmp_path, capsys):
    for name in O.PEERS:
        pytest.importorskip(O.PEERS[name][0])
    assert cli.main(["tuning-free", "--out", str(tmp_path)] + COMMON) == 0
    err = capsys.readouterr().err
    assert err.index("estimated runtime") < err.index("done in")
    scores = json.loads((tmp_path / "tuning-free" / "scores.json").read_text())["scores"]
    assert set(scores) == {"classifier-n64", "full-n32"}
    for s in scores.values():
        assert set(s["methods"]) == {TF.BEST, TF.SWEEP} | set(TF.ARMS[1:])
    md = (tmp_path / "tuning-free.md").read_text()
    for table in re.findall(r"((?:^\|.*\|\n)+)", md, flags=re.M):
        assert len({line.count("|") for line in table.strip().splitlines()}) == 1, table
    assert (tmp_path / "img" / "tuning_free_profile.png").stat().st_size > 0


def test_options_the_protocol_fixes_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["tuning-free", "--out", str(tmp_path), "--estimate-only", "--lr-grid", "1e-3"] + COMMON)
    assert "--lr-grid would be ignored" in capsys.readouterr().err
