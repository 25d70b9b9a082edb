"""The four study protocols, as settings x arms x learning rates x seeds.

An *arm* is one curve in the results: an optimizer with its recipe (schedule, epochs, ...) and a
learning-rate grid. In a setting, every arm is first run on ``tune_seeds`` for each rate of its grid;
the rate with the best mean final val accuracy is chosen (ties: the first in the grid), and the arm is
then run on all ``seeds`` at that rate. Runs are written as JSON as they finish and re-used when the
study is restarted with the same output directory.

Profiles (``--scale``): ``smoke`` (CI, tiny model), ``study`` (the committed results: fits ~90 min on 2
shared cores) and ``paper`` (closer to the papers' protocols; hours on 2 cores).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

from . import data as data_mod
from . import features as feat_mod
from . import optimizers as optimizer_factory
from .model import Backbone, TrainableTop, load_backbone
from .train import RunConfig, check_stabilizers, run, same_config


@dataclass
class Arm:
    label: str
    optimizer: str
    lrs: List[float]
    overrides: dict = field(default_factory=dict)   # RunConfig fields specific to this arm


@dataclass
class Setting:
    name: str
    top_layers: int
    subset: Optional[int]
    arms: List[Arm]
    seeds: List[int]
    tune_seeds: List[int]
    base: dict = field(default_factory=dict)         # RunConfig fields shared by the arms


def mode_name(top_layers: int) -> str:
    return "classifier" if top_layers == 0 else ("full" if top_layers < 0 else f"top{top_layers}")


def parse_mode(text: str) -> int:
    """``classifier`` -> 0, ``topK`` -> K >= 1, ``full`` -> -1 (a bare integer is K; 0 is classifier)."""
    if text == "classifier":
        return 0
    if text == "full":
        return -1
    digits = text[3:] if text.startswith("top") else text
    if not digits.isdigit() or (text.startswith("top") and int(digits) < 1):
        raise ValueError(f"unknown mode {text!r}: use classifier, topK (K >= 1 trained layers) or full")
    return int(digits)


# --------------------------------------------------------------------------------------------- profiles
PROFILES: Dict[str, Dict[str, dict]] = {
    "smoke": {
        "svi": dict(modes=[0, 1], lr_grid=[0.01, 0.1], seeds=[0, 1], tune_seeds={0: [0, 1], 1: [0]}, epochs=2,
                    batch_size=16),
        "linesearch": dict(settings=[("n32", 32, 2), ("all", None, 1)], top_layers=1, adam_lrs=[1e-3],
                           seeds=[0, 1], batch_size=16),
        "stability": dict(subset=None, top_layers=1, seeds=[0, 1], lr=1e-3, batch_size=16,
                          few_epochs=1, many_epochs=2),
        "stabilizers": dict(subset=None, top_layers=1, seeds=[0, 1], lr=1e-3, batch_size=16, few_epochs=1,
                            many_epochs=2, mmr=0.1, heads=3, surt_steps=2, surt_lr=1e-3),
    },
    "study": {
        # tuning seeds per mode: classifier-only runs take seconds, top-2 runs minutes
        "svi": dict(modes=[0, 1, 2], lr_grid=[3e-3, 1e-2, 3e-2, 1e-1], seeds=[0, 1, 2, 3, 4],
                    tune_seeds={0: [0, 1, 2, 3, 4], 1: [0, 1], 2: [0]}, epochs=2, batch_size=32),
        "linesearch": dict(settings=[("n500", 500, 5), ("full", None, 2)], top_layers=2,
                           adam_lrs=[2e-5, 1e-4, 5e-4], seeds=[0, 1, 2], batch_size=32),
        "stability": dict(subset=1000, top_layers=1, seeds=list(range(10)), lr=2e-5, batch_size=16,
                          few_epochs=3, many_epochs=10),
        # claim 4: the unstable setting found by the search in docs/results.md
        "stabilizers": dict(subset=500, top_layers=2, seeds=list(range(10)), lr=5e-4, batch_size=16, few_epochs=3,
                            many_epochs=5, mmr=0.1, heads=5, surt_steps=32, surt_lr=1e-4),
    },
    "paper": {
        "svi": dict(modes=[0, 1, 2, 4], lr_grid=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], seeds=list(range(10)),
                    tune_seeds=[0, 1, 2], epochs=5, batch_size=32),
        "linesearch": dict(settings=[("n500", 500, 5), ("full", None, 5)], top_layers=-1,
                           adam_lrs=[2e-5], seeds=[0, 1, 2, 3, 4], batch_size=32),
        "stability": dict(subset=1000, top_layers=-1, seeds=list(range(25)), lr=2e-5, batch_size=16,
                          few_epochs=3, many_epochs=20),
        "stabilizers": dict(subset=500, top_layers=-1, seeds=list(range(25)), lr=5e-4, batch_size=16, few_epochs=3,
                            many_epochs=20, mmr=0.1, heads=5, surt_steps=320, surt_lr=1e-4),
    },
}


def svi_settings(p: dict, optimizers=("sgd", "svi")) -> List[Setting]:
    """Claim 1: SVI vs SGD (both momentum 0.95, Nesterov, constant lr), same lr grid, per mode."""
    out = []
    for k in p["modes"]:
        arms = [Arm(o, o, list(p["lr_grid"])) for o in optimizers]
        tune = p["tune_seeds"]
        tune = list(tune.get(k, p["seeds"][:1]) if isinstance(tune, dict) else tune)
        out.append(Setting(mode_name(k), k, p.get("subset"), arms, list(p["seeds"]), tune,
                           dict(epochs=p["epochs"], batch_size=p["batch_size"], evals_per_epoch=4)))
    return out


def linesearch_settings(p: dict, optimizers=("adam", "adamsls", "plasls")) -> List[Setting]:
    """Claim 2: ADAMSLS / PLASLS (paper constants, no schedule) vs Adam with 10% warmup + cosine."""
    out = []
    for name, subset, epochs in p["settings"]:
        arms = []
        for o in optimizers:
            if o in optimizer_factory.LINE_SEARCH:
                arms.append(Arm(o, o, [0.1]))  # lr slot = initial step size (ignored by the factory)
            else:
                arms.append(Arm(o, o, list(p["adam_lrs"]), dict(schedule="cosine", warmup=0.1)))
        evals = 2 if subset and subset <= 1000 else 4
        tune = list(p.get("tune_seeds") or p["seeds"][:1])  # --tune-seeds, else the first seed
        out.append(Setting(name, p["top_layers"], subset, arms, list(p["seeds"]), tune,
                           dict(epochs=epochs, batch_size=p["batch_size"], evals_per_epoch=evals)))
    return out


def stability_settings(p: dict) -> List[Setting]:
    """Claim 3: Mosbach et al. -- BERT's default recipe (AdamW without bias correction, 3 epochs) vs the
    stable one (bias correction, 10% warmup + linear decay, more epochs). Both: lr 2e-5, eps 1e-6,
    wd 0.01 (not on bias/LayerNorm), grad-norm clip 1.0, batch 16."""
    common = dict(schedule="linear", warmup=0.1, weight_decay=0.01, eps=1e-6, grad_clip=1.0)
    arms = [Arm("bert-default", "adamw-nobc", [p["lr"]], dict(common, epochs=p["few_epochs"])),
            Arm("stable", "adamw", [p["lr"]], dict(common, epochs=p["many_epochs"]))]
    name = f"n{p['subset']}" if p["subset"] else "all"
    return [Setting(name, p["top_layers"], p["subset"], arms, list(p["seeds"]), list(p["seeds"][:1]),
                    dict(batch_size=p["batch_size"], evals_per_epoch=2))]


# claim 4 arms: BERT's recipe (as in the brief: no bias correction, 3 epochs, no warm-up), then each change
STABILIZER_ARMS = ("bert-default", "mosbach", "mmr", "mhloss", "surt", "svi", "linesearch", "bias-corrected")


def stabilizers_settings(p: dict, arms: Optional[List[str]] = None) -> List[Setting]:
    """Claim 4: Fu et al.'s stabilizers where fine-tuning fails.

    bert-default: AdamW without bias correction, ``few_epochs``, no warm-up, linear decay, eps 1e-6,
    wd 0.01, clip 1.0, batch 16. mosbach: bias correction, 10% warm-up, ``many_epochs``. mmr / mhloss /
    surt: bert-default plus one stabilizer. svi: SVI(base="adam") with bert-default's recipe (its Adam
    has bias correction). linesearch: ADAMSLS (paper constants, no schedule), ``few_epochs``.
    bias-corrected: bert-default with bias correction only (the control for svi and mosbach).
    Every arm runs at the setting's one rate.
    """
    default = dict(schedule="linear", warmup=0.0, weight_decay=0.01, eps=1e-6, grad_clip=1.0, epochs=p["few_epochs"])
    table = {
        "bert-default": ("adamw-nobc", default),
        "mosbach": ("adamw", dict(default, warmup=0.1, epochs=p["many_epochs"])),
        "mmr": ("adamw-nobc", dict(default, mmr=p["mmr"])),
        "mhloss": ("adamw-nobc", dict(default, heads=p["heads"])),
        "surt": ("adamw-nobc", dict(default, surt_steps=p["surt_steps"], surt_lr=p["surt_lr"])),
        "svi": ("svi-adam", default),
        "linesearch": ("adamsls", dict(epochs=p["few_epochs"])),
        "bias-corrected": ("adamw", default),
    }
    chosen = arms or list(STABILIZER_ARMS)
    out = [Arm(label, table[label][0], [p["lr"]], dict(table[label][1])) for label in chosen]
    name = f"{mode_name(p['top_layers'])}-n{p['subset']}" if p["subset"] else mode_name(p["top_layers"])
    return [Setting(name, p["top_layers"], p["subset"], out, list(p["seeds"]), list(p["seeds"][:1]),
                    dict(batch_size=p["batch_size"], evals_per_epoch=1))]


CLAIMS = {"svi": svi_settings, "linesearch": linesearch_settings, "stability": stability_settings,
          "stabilizers": stabilizers_settings}


def check_settings(settings: List[Setting]) -> None:
    """Raise ValueError for an arm whose stabilizer options cannot run (before any data or model work)."""
    for s in settings:
        for arm in s.arms:
            kw = {**s.base, **arm.overrides}
            names = {f.name for f in fields(RunConfig)}
            check_stabilizers(RunConfig(optimizer=arm.optimizer, lr=arm.lrs[0], seed=0, top_layers=s.top_layers,
                                        **{k: v for k, v in kw.items() if k in names}))


# ------------------------------------------------------------------------------------------- running
class Context:
    """Model, data and frozen-feature cache shared by every run of a study."""

    def __init__(self, model_spec: str, dataset_spec: str, out_dir: str, cache_dir: Optional[str] = None,
                 max_len: int = 64, backend: Optional[str] = None, progress: bool = True):
        self.dataset = data_mod.load_dataset(dataset_spec, cache_dir)
        self.backbone: Backbone = load_backbone(model_spec, self.dataset.train_texts, self.dataset.n_classes)
        self.out_dir, self.max_len, self.backend, self.progress = out_dir, max_len, backend, progress
        self.cache_dir = cache_dir or data_mod.default_cache_dir()
        self.model_spec, self.dataset_spec = model_spec, dataset_spec
        self._tops: Dict[int, TrainableTop] = {}
        self.all_top_layers: List[int] = []

    def top(self, k: int) -> TrainableTop:
        if k not in self._tops:
            self._tops[k] = TrainableTop(self.backbone.model, k)
        return self._tops[k]

    def features(self, k: int, subset: Optional[int]):
        ds = self.dataset.subset(subset)
        also = [j for j in self.all_top_layers if j != k]
        # the full training set is encoded once; subsets are its first n rows
        tr = feat_mod.frozen_features(self.backbone, self.dataset.name + ":train", self.dataset.train_texts,
                                      self.dataset.train_labels, k, self.max_len, also=also,
                                      cache_dir=self.cache_dir)
        va = feat_mod.frozen_features(self.backbone, self.dataset.name + ":val", ds.val_texts, ds.val_labels,
                                      k, self.max_len, also=also, cache_dir=self.cache_dir)
        if subset and subset < len(tr):
            tr = feat_mod.Features(tr.x[:subset], tr.mask[:subset], tr.labels[:subset])
        return tr, va, ds


def _run_path(claim_dir: str, setting: Setting, arm: Arm, lr: float, seed: int) -> str:
    return os.path.join(claim_dir, "runs", f"{setting.name}__{arm.label}__lr{lr:g}__s{seed}.json")


def read_runs(claim_dir: str, setting: Setting, arm: Arm, lr: float) -> List[dict]:
    """The finished runs of ``arm`` at ``lr`` over the setting's seeds, from their files."""
    out = []
    for seed in setting.seeds:
        with open(_run_path(claim_dir, setting, arm, lr, seed)) as fh:
            out.append(json.load(fh))
    return out


def _config(ctx: Context, setting: Setting, arm: Arm, lr: float, seed: int) -> RunConfig:
    kw = dict(setting.base)
    kw.update(arm.overrides)
    names = {f.name for f in fields(RunConfig)}
    return RunConfig(optimizer=arm.optimizer, lr=lr, seed=seed, top_layers=setting.top_layers,
                     backend=ctx.backend, tag=f"{setting.name}/{arm.label}",
                     **{k: v for k, v in kw.items() if k in names})


def _one(ctx: Context, claim_dir: str, setting: Setting, arm: Arm, lr: float, seed: int, feats, bar) -> dict:
    path = _run_path(claim_dir, setting, arm, lr, seed)
    cfg = _config(ctx, setting, arm, lr, seed)
    if os.path.exists(path):
        with open(path) as fh:
            res = json.load(fh)
        if same_config(res.get("config"), cfg):
            return res
    tr, va, _ = feats
    inner = None
    if ctx.progress:
        from tqdm.auto import tqdm
        inner = tqdm(total=1, desc=f"{setting.name} {arm.label} lr={lr:g} s{seed}", leave=False, mininterval=2)

    def progress(step, total, info):
        if inner is not None:
            inner.total = total
            inner.n = step
            inner.set_postfix(acc=f"{info['acc']:.3f}", loss=f"{info['loss']:.3f}", refresh=True)

    res = run(ctx.backbone, ctx.top(setting.top_layers), tr, va, cfg, progress, texts=feats[2].train_texts)
    if inner is not None:
        inner.close()
    res.update(setting=setting.name, arm=arm.label, mode=mode_name(setting.top_layers),
               model=ctx.backbone.name, dataset=ctx.dataset.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(res, fh)
    os.replace(path + ".tmp", path)
    if bar is not None:
        bar.update(1)
        bar.write(f"  {setting.name:>10} {arm.label:>12} lr={lr:<8g} seed={seed}: final acc "
                  f"{res['final_val_acc']:.4f}, {res['steps']} steps, {res['train_wall_s']:.1f}s")
    return res


def run_claim(ctx: Context, claim: str, settings: List[Setting]) -> dict:
    """Run (or re-load) every run of ``settings``; write and return ``<out>/<claim>/summary.json``."""
    claim_dir = os.path.join(ctx.out_dir, claim)
    os.makedirs(claim_dir, exist_ok=True)
    ctx.all_top_layers = sorted({s.top_layers for s in settings})
    n_runs = sum(len(a.lrs) * len(s.tune_seeds) + len(s.seeds) - len(set(s.tune_seeds) & set(s.seeds))
                 for s in settings for a in s.arms)  # the chosen rate's tuning runs are re-used
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_runs, desc=f"claim {claim}", mininterval=5)
    summary = {"claim": claim, "model": ctx.backbone.name, "model_spec": ctx.model_spec,
               "dataset": ctx.dataset.name, "dataset_source": ctx.dataset.source,
               "dataset_notes": ctx.dataset.notes, "settings": []}
    for setting in settings:
        feats = ctx.features(setting.top_layers, setting.subset)
        entry = {"setting": asdict(setting), "mode": mode_name(setting.top_layers),
                 "n_train": len(feats[0]), "n_val": len(feats[1]),
                 "majority_acc": feats[2].majority_accuracy(), "arms": {}}
        for arm in setting.arms:
            lr_table = {}
            for lr in arm.lrs:
                tune = [_one(ctx, claim_dir, setting, arm, lr, s, feats, bar) for s in setting.tune_seeds]
                lr_table[f"{lr:g}"] = [r["final_val_acc"] for r in tune]
            best = max(arm.lrs, key=lambda lr: (sum(lr_table[f"{lr:g}"]) / len(lr_table[f"{lr:g}"]),
                                                -arm.lrs.index(lr)))
            runs = [_one(ctx, claim_dir, setting, arm, best, s, feats, bar) for s in setting.seeds]
            entry["arms"][arm.label] = {
                "optimizer": arm.optimizer, "chosen_lr": best, "lr_table": lr_table,
                "implementation": runs[0]["implementation"],
                "runs": [os.path.relpath(_run_path(claim_dir, setting, arm, best, s), claim_dir) for s in setting.seeds],
            }
        summary["settings"].append(entry)
    if bar is not None:
        bar.close()
    with open(os.path.join(claim_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def profile(scale: str, claim: str, overrides: dict) -> dict:
    p = copy.deepcopy(PROFILES[scale][claim])
    # tune_seeds is taken even where the profile has none (linesearch: its default is the first seed),
    # so that --tune-seeds 0 keeps the rate chosen on seed 0 whatever the order of --seeds
    p.update({k: v for k, v in overrides.items() if v is not None and (k in p or k == "tune_seeds")})
    return p
