"""Claim 5, tuning-free: our line searches at their defaults against what a user who wants no tuning
picks instead (Prodigy, Schedule-Free AdamW, D-Adaptation Adam, LDoG, each at its published defaults)
and against what practitioners do (AdamW over a 5-point lr grid).

Scoring as AlgoPerf does it:
- per setting a target: the median final val accuracy of AdamW at its best lr (best mean over the
  seeds), minus ``MARGIN`` (0.01);
- per method: final accuracy mean +- std over the seeds, the fraction of seeds whose run reaches the
  target at some evaluation, the time to target (median over the seeds that reach it) in forward +
  backward passes (a training step of a plain optimizer is 1 + 1; a line-search trial adds a forward)
  and in training wall time, and the total cost of one tuned model: the run itself, or for the AdamW
  sweep all 5 runs (one per lr) of a seed;
- a performance profile over all settings: for each method, the fraction of settings where its
  median time to target in passes is within tau of the fastest method's (unreached by half the
  seeds or more: infinite).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from . import claims as C

MARGIN = 0.01
ADAMW_LRS = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
OURS = ["adamsls-auto", "salsa-auto", "plasls-auto", "svi-adam"]
PEERS = ["prodigy", "schedulefree", "dadapt-adam", "ldog"]
ARMS = ["adamw"] + OURS + PEERS
SVI_DEFAULT_LR = 1e-3  # sk.SVI's default lr
SWEEP = "adamw (5-lr sweep)"
BEST = "adamw (best lr)"

# (name, top_layers, subset, epochs, batch size, evals per epoch) per scale
SETTINGS = {
    "smoke": [("classifier-n64", 0, 64, 2, 16, 2), ("full-n32", -1, 32, 1, 16, 2)],
    "study": [("classifier-n500", 0, 500, 5, 32, 2), ("top1-n500", 1, 500, 5, 32, 2),
              ("top2-n500", 2, 500, 5, 32, 2), ("full-n256", -1, 256, 1, 16, 2)],
}
# rough seconds per training step and per evaluation (800 val sentences), MiniLM, max_len 64, 1 thread
# on the shared 2-core machine, for the runtime estimate: a pilot measured 0.2-0.3 s/step at top2
# (batch 32) and 0.85 s/step end to end (batch 16), ~9 s per evaluation end to end; top1 and the
# classifier are scaled by the layers they run
STEP_S = {0: 0.01, 1: 0.12, 2: 0.22, -1: 0.85}
EVAL_S = {0: 0.1, 1: 1.2, 2: 2.2, -1: 9.0}
FORWARDS = 1.25  # forwards per step of the searching arms (search="auto"), for the estimate


def settings(scale: str = "study", seeds: Optional[List[int]] = None, arms: Optional[List[str]] = None) -> List[C.Setting]:
    """The claim's settings. Every AdamW lr runs on every seed (the sweep's cost is all of them)."""
    seeds = list(range(10)) if seeds is None else list(seeds)
    out = []
    for name, k, subset, epochs, bs, evals in SETTINGS[scale]:
        chosen = []
        for o in arms or ARMS:
            if o == "adamw":
                chosen.append(C.Arm(o, o, list(ADAMW_LRS), dict(schedule="cosine", warmup=0.1, weight_decay=0.01)))
            else:
                chosen.append(C.Arm(o, o, [SVI_DEFAULT_LR if o == "svi-adam" else 1.0]))
        out.append(C.Setting(name, k, subset, chosen, seeds, list(seeds),
                             dict(epochs=epochs, batch_size=bs, evals_per_epoch=evals)))
    return out


def estimate_seconds(plan: List[C.Setting], n_train_full: int = 500) -> float:
    """A rough runtime of the plan (training steps and evaluations; not the one-time feature cache)."""
    total = 0.0
    for s in plan:
        n = s.subset or n_train_full
        steps = math.ceil(n / s.base["batch_size"]) * s.base["epochs"]
        evals = 1 + s.base["evals_per_epoch"] * s.base["epochs"]
        for arm in s.arms:
            runs = len(arm.lrs) * len(set(s.tune_seeds) | set(s.seeds))
            factor = FORWARDS if arm.optimizer.endswith("-auto") else 1.0
            total += runs * (steps * STEP_S[s.top_layers] * factor + evals * EVAL_S[s.top_layers])
    return total


# ------------------------------------------------------------------------------------------- scoring
def first_reach(run: dict, target: float) -> Optional[dict]:
    """Passes, wall time and step at the first evaluation with val accuracy >= target (None: never)."""
    h = run["history"]
    for i, acc in enumerate(h["val_acc"]):
        if acc >= target:
            return {"passes": h["forwards"][i] + h["backwards"][i], "wall_s": h["wall_s"][i], "step": h["step"][i]}
    return None


def run_cost(run: dict) -> dict:
    h = run["history"]
    return {"passes": h["forwards"][-1] + h["backwards"][-1], "wall_s": run["train_wall_s"]}


def method_stats(runs: List[dict], target: float, tuning: Optional[List[dict]] = None) -> dict:
    """Scores of one method over its seeds. ``tuning`` (AdamW sweep): per seed, the cost of the other
    lr runs, added to the time to target and to the total cost."""
    final = [r["final_val_acc"] for r in runs]
    extra = tuning or [{"passes": 0, "wall_s": 0.0}] * len(runs)
    reach = [first_reach(r, target) for r in runs]
    hit = [(x, e) for x, e in zip(reach, extra) if x is not None]
    cost = [run_cost(r) for r in runs]
    ttt_passes = [x["passes"] + e["passes"] for x, e in hit]
    ttt_wall = [x["wall_s"] + e["wall_s"] for x, e in hit]
    # median over all seeds, unreached = inf (AlgoPerf: a workload is solved when most runs reach it)
    all_passes = sorted(ttt_passes + [math.inf] * (len(runs) - len(hit)))
    return {
        "n": len(runs),
        "final_mean": float(np.mean(final)), "final_std": float(np.std(final, ddof=1)) if len(final) > 1 else 0.0,
        "reached": len(hit), "fraction": len(hit) / len(runs),
        "ttt_passes": float(np.median(ttt_passes)) if hit else None,
        "ttt_wall_s": float(np.median(ttt_wall)) if hit else None,
        "profile_passes": float(np.median(all_passes)) if all_passes else math.inf,
        "total_passes": float(np.mean([c["passes"] + e["passes"] for c, e in zip(cost, extra)])),
        "total_wall_s": float(np.mean([c["wall_s"] + e["wall_s"] for c, e in zip(cost, extra)])),
        "forwards_per_step": float(np.mean([r["forwards_per_step"] for r in runs])),
        "wall_s_per_step": float(np.mean([r["train_wall_s"] / max(1, r["steps"]) for r in runs])),
    }


def score_setting(runs_by_arm: Dict[str, Dict[float, List[dict]]], margin: float = MARGIN) -> dict:
    """``runs_by_arm[arm][lr]`` = the runs of every seed (same seed order). AdamW's best lr: the best
    mean final accuracy (ties: the smaller lr); target = its median final accuracy - margin."""
    adamw = runs_by_arm["adamw"]
    best_lr = max(sorted(adamw), key=lambda lr: np.mean([r["final_val_acc"] for r in adamw[lr]]))
    target = float(np.median([r["final_val_acc"] for r in adamw[best_lr]])) - margin
    others = [lr for lr in adamw if lr != best_lr]
    sweep_extra = [{"passes": sum(run_cost(adamw[lr][i])["passes"] for lr in others),
                    "wall_s": sum(run_cost(adamw[lr][i])["wall_s"] for lr in others)}
                   for i in range(len(adamw[best_lr]))]
    methods = {BEST: method_stats(adamw[best_lr], target), SWEEP: method_stats(adamw[best_lr], target, sweep_extra)}
    for arm, by_lr in runs_by_arm.items():
        if arm != "adamw":
            (runs,) = by_lr.values()
            methods[arm] = method_stats(runs, target)
    return {"target": target, "margin": margin, "adamw_best_lr": best_lr,
            "adamw_lr_means": {f"{lr:g}": float(np.mean([r["final_val_acc"] for r in adamw[lr]])) for lr in sorted(adamw)},
            "methods": methods}


def performance_profile(scores: Dict[str, dict], taus: List[float]) -> Dict[str, List[float]]:
    """rho_m(tau): the fraction of settings where method m's median passes to target is within tau
    of the best method's in that setting."""
    methods = sorted({m for s in scores.values() for m in s["methods"]})
    ratios: Dict[str, List[float]] = {m: [] for m in methods}
    for s in scores.values():
        best = min(s["methods"][m]["profile_passes"] for m in s["methods"])
        for m in methods:
            t = s["methods"].get(m, {}).get("profile_passes", math.inf)
            ratios[m].append(t / best if math.isfinite(t) and math.isfinite(best) and best > 0 else math.inf)
    return {m: [sum(r <= tau for r in rs) / len(rs) for tau in taus] for m, rs in ratios.items()}


# ------------------------------------------------------------------------------------------- running
def load_setting_runs(claim_dir: str, setting: C.Setting) -> Dict[str, Dict[float, List[dict]]]:
    return {arm.label: {lr: C.read_runs(claim_dir, setting, arm, lr) for lr in arm.lrs} for arm in setting.arms}


def _fmt(x, f="{:.0f}"):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def markdown(scores: Dict[str, dict]) -> str:
    lines = []
    for name, s in scores.items():
        lines += [f"### {name}\n", f"Target: {s['target']:.4f} (AdamW at lr {s['adamw_best_lr']:g}: median final "
                  f"accuracy minus {s['margin']:g}). AdamW mean final accuracy per lr: " +
                  ", ".join(f"{lr}: {v:.4f}" for lr, v in s["adamw_lr_means"].items()) + ".\n",
                  "| method | seeds | final acc (mean ± std) | reached | passes to target | wall s to target | "
                  "total passes (incl. tuning) | total wall s | forwards/step | ms/step |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, st in s["methods"].items():
            lines.append(f"| {m} | {st['n']} | {st['final_mean']:.4f} ± {st['final_std']:.4f} | "
                         f"{st['reached']}/{st['n']} | {_fmt(st['ttt_passes'])} | {_fmt(st['ttt_wall_s'], '{:.1f}')} | "
                         f"{st['total_passes']:.0f} | {st['total_wall_s']:.1f} | {st['forwards_per_step']:.2f} | "
                         f"{1000 * st['wall_s_per_step']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot_profile(profile: Dict[str, List[float]], taus: List[float], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rho in profile.items():
        ax.step(taus, rho, where="post", label=m, lw=2.2 if m in OURS else 1.4, ls="-" if m in OURS else "--")
    ax.set_xscale("log")
    ax.set_xlabel("tau (passes to target / the fastest method's)")
    ax.set_ylabel("fraction of settings")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Performance profile (AlgoPerf-style), forward+backward passes")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from .report import _save
    _save(fig, path, 110)
    plt.close(fig)


def write_report(out_dir: str, plan: List[C.Setting], img_dir: Optional[str] = None, margin: float = MARGIN) -> str:
    """Score every setting of ``plan`` from its run files; write ``<out>/tuning-free/scores.json``,
    ``<out>/tuning-free.md`` and the profile plot; returns the Markdown."""
    claim_dir = os.path.join(out_dir, "tuning-free")
    scores = {s.name: score_setting(load_setting_runs(claim_dir, s), margin) for s in plan}
    taus = [float(t) for t in np.geomspace(1.0, 20.0, 60)]
    profile = performance_profile(scores, taus)
    img_dir = img_dir or os.path.join(out_dir, "img")
    os.makedirs(img_dir, exist_ok=True)
    png = os.path.join(img_dir, "tuning_free_profile.png")
    plot_profile(profile, taus, png)
    with open(os.path.join(claim_dir, "scores.json"), "w") as fh:
        json.dump({"scores": scores, "profile": {"taus": taus, "rho": profile}}, fh, indent=1)
    md_path = os.path.join(out_dir, "tuning-free.md")
    text = "\n".join(["# Claim 5: tuning-free\n", __doc__.split("\n\n", 1)[1], markdown(scores),
                      f"![performance profile]({os.path.relpath(png, out_dir)})\n"])
    with open(md_path, "w") as fh:
        fh.write(text)
    return text
