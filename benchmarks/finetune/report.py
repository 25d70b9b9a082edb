"""Summaries, plots and Markdown tables from the per-run JSON files of a claim.

Conventions:
- "final" = the last evaluation (end of training); "best" = the best evaluation during training.
- Target accuracy of a setting (for steps / seconds to target): 98% of the best arm's mean final val
  accuracy, rounded down to 0.005, unless ``target`` is given. Steps and seconds are means over the
  seeds that reach it (``reached`` says how many did); seconds are training wall-clock (evaluation
  excluded) on a shared 2-core machine, so read them as rough.
- Failed run (Mosbach et al.): final val accuracy <= the majority-class accuracy of the val set.
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional

import numpy as np

from .optimizers import NO_LR  # their "lr" slot is a placeholder, not a rate


def load_runs(claim_dir: str, summary: dict) -> None:
    """Attach the run dicts to ``summary`` (in place) under ``arm["results"]``."""
    for entry in summary["settings"]:
        for arm in entry["arms"].values():
            arm["results"] = []
            for rel in arm["runs"]:
                with open(os.path.join(claim_dir, rel)) as fh:
                    arm["results"].append(json.load(fh))


def _mean_std(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _first_reach(res: dict, target: float) -> Optional[tuple[int, float, float]]:
    h = res["history"]
    for step, acc, wall, cpu in zip(h["step"], h["val_acc"], h["wall_s"], h["cpu_s"]):
        if acc >= target:
            return step, wall, cpu
    return None


def setting_target(entry: dict, target: Optional[float] = None) -> float:
    if target is not None:
        return target
    best = max(np.mean([r["final_val_acc"] for r in arm["results"]]) for arm in entry["arms"].values())
    return math.floor(0.98 * best * 200) / 200


def arm_stats(arm: dict, target: float, majority: float) -> dict:
    rs = arm["results"]
    final = [r["final_val_acc"] for r in rs]
    reach = [_first_reach(r, target) for r in rs]
    hit = [x for x in reach if x is not None]
    m, s = _mean_std(final)
    steps = [r["steps"] for r in rs]
    return {
        "n": len(rs), "lr": arm["chosen_lr"], "final_mean": m, "final_std": s,
        "final_median": float(np.median(final)), "final_min": float(min(final)), "final_max": float(max(final)),
        "best_mean": float(np.mean([r["best_val_acc"] for r in rs])),
        "train_loss_mean": float(np.nanmean([r["final_train_loss"] for r in rs])),
        "failed": int(sum(a <= majority + 1e-12 for a in final)),
        "diverged": int(sum(bool(r.get("diverged")) for r in rs)),
        "reached": len(hit),
        "steps_to_target": float(np.mean([x[0] for x in hit])) if hit else None,
        "s_to_target": float(np.mean([x[1] for x in hit])) if hit else None,
        "cpu_s_to_target": float(np.mean([x[2] for x in hit])) if hit else None,
        "steps": float(np.mean(steps)),
        "wall_s": float(np.mean([r["train_wall_s"] for r in rs])),
        "s_per_step": float(np.mean([r["train_wall_s"] / max(1, r["steps"]) for r in rs])),
        "cpu_s_per_step": float(np.mean([r["train_cpu_s"] / max(1, r["steps"]) for r in rs])),
        "forwards_per_step": float(np.mean([r["forwards_per_step"] for r in rs])),
        "implementation": arm.get("implementation", ""),
    }


def summarize(summary: dict, target: Optional[float] = None) -> dict:
    out = {}
    for entry in summary["settings"]:
        t = setting_target(entry, target)
        name = entry["setting"]["name"]
        out[name] = {"target": t, "majority": entry["majority_acc"], "mode": entry["mode"],
                     "n_train": entry["n_train"], "n_val": entry["n_val"],
                     "arms": {label: arm_stats(arm, t, entry["majority_acc"]) for label, arm in entry["arms"].items()}}
    return out


# ----------------------------------------------------------------------------------------------- plots
def _save(fig, path: str, dpi: int) -> None:
    """PNG with a small palette: line plots lose nothing visible, the files shrink ~3x (committed)."""
    fig.savefig(path, dpi=dpi)
    try:
        from PIL import Image
        with Image.open(path) as im:
            im.convert("RGB").quantize(colors=64).save(path, optimize=True)
    except ImportError:
        pass


def _aligned(results: List[dict], key: str, xkey: str):
    n = min(len(r["history"][key]) for r in results)
    ys = np.array([r["history"][key][:n] for r in results], dtype=float)
    xs = np.array([r["history"][xkey][:n] for r in results], dtype=float).mean(0)
    return xs, ys


def plot_curves(summary: dict, path: str, title: str, time_axis: str = "wall") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["settings"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 2.6 * len(rows)), squeeze=False)
    tkey, tlabel = ("wall_s", "train wall-clock (s)") if time_axis == "wall" else ("cpu_s", "train time (s, process CPU)")
    panels = [("val_acc", "step", "val accuracy", "step"), ("val_acc", tkey, "val accuracy", tlabel),
              ("train_loss", "step", "train loss", "step"), ("train_loss", tkey, "train loss", tlabel)]
    for i, entry in enumerate(rows):
        for j, (key, xkey, ylabel, xlabel) in enumerate(panels):
            ax = axes[i][j]
            for label, arm in entry["arms"].items():
                xs, ys = _aligned(arm["results"], key, xkey)
                if key == "train_loss":  # first point is before training (no loss)
                    xs, ys = xs[1:], ys[:, 1:]
                mean = np.nanmean(ys, 0)
                std = np.nanstd(ys, 0, ddof=1) if ys.shape[0] > 1 else np.zeros_like(mean)
                lr = arm["chosen_lr"]
                lab = f"{label} (lr {lr:g})" if arm["optimizer"] not in NO_LR else label
                line, = ax.plot(xs, mean, label=lab, lw=1.3)
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
            if key == "val_acc":
                ax.axhline(entry["majority_acc"], color="grey", ls=":", lw=0.8)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_title(f"{entry['setting']['name']} ({entry['mode']}, n={entry['n_train']})", fontsize=8, loc="left")
                ax.legend(fontsize=7)
    fig.suptitle(title + " - mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    _save(fig, path, 72)
    plt.close(fig)


def plot_box(summary: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["settings"]
    most = max(len(entry["arms"]) for entry in rows)  # many arms (claim 4 has 8): a wider panel
    fig, axes = plt.subplots(1, len(rows), figsize=(max(4.5, 3.2 * len(rows), 0.9 * most * len(rows)), 3.0),
                             squeeze=False)
    for ax, entry in zip(axes[0], rows):
        labels = list(entry["arms"])
        data = [[r["final_val_acc"] for r in entry["arms"][l]["results"]] for l in labels]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=20)
        for i, d in enumerate(data):
            ax.scatter(np.full(len(d), i + 1) + np.linspace(-0.08, 0.08, len(d)), d, s=8, alpha=0.6)
        ax.axhline(entry["majority_acc"], color="grey", ls=":", lw=0.8)
        ax.set_title(f"{entry['setting']['name']} ({entry['mode']})", fontsize=8)
        ax.set_ylabel("final val accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path, 80)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- markdown
def _f(x, fmt="{:.3f}"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown_tables(claim: str, summary: dict, stats: dict) -> str:
    lines = []
    if claim in ("stability", "stabilizers"):
        lines += ["| setting | recipe | optimizer | epochs | mean | std | median | min | max | failed (≤ majority) | best-during-training mean |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for entry in summary["settings"]:
            st = stats[entry["setting"]["name"]]
            for label, a in st["arms"].items():
                arm = entry["arms"][label]
                ep = arm["results"][0]["config"]["epochs"]
                lines.append(f"| {entry['setting']['name']} ({st['mode']}, majority {st['majority']:.3f}) | {label} | "
                             f"{arm['optimizer']} | {ep:g} | {a['final_mean']:.4f} | {a['final_std']:.4f} | "
                             f"{a['final_median']:.4f} | {a['final_min']:.4f} | {a['final_max']:.4f} | "
                             f"{a['failed']}/{a['n']} | {a['best_mean']:.4f} |")
        return "\n".join(lines)
    lines += ["| setting | optimizer | lr | final val acc (mean ± std) | best val acc | final train loss | "
              "target | steps to target | s to target wall / cpu | reached | fwd/step | s/step wall / cpu | implementation |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in summary["settings"]:
        st = stats[entry["setting"]["name"]]
        for label, a in st["arms"].items():
            lr = "— (no lr)" if entry["arms"][label]["optimizer"] in NO_LR else f"{a['lr']:g}"
            lines.append(f"| {entry['setting']['name']} ({st['mode']}, n={st['n_train']}) | {label} | {lr} | "
                         f"{a['final_mean']:.4f} ± {a['final_std']:.4f} (n={a['n']}) | {a['best_mean']:.4f} | "
                         f"{_f(a['train_loss_mean'])} | {st['target']:.3f} | {_f(a['steps_to_target'], '{:.0f}')} | "
                         f"{_f(a['s_to_target'], '{:.1f}')} / {_f(a['cpu_s_to_target'], '{:.1f}')} | {a['reached']}/{a['n']} | {a['forwards_per_step']:.2f} | "
                         f"{a['s_per_step']:.3f} / {a['cpu_s_per_step']:.3f} | {a['implementation']} |")
    return "\n".join(lines)


def lr_table(summary: dict) -> str:
    """Mean final val accuracy per learning rate on the tuning seeds (the selection data)."""
    lines = []
    for entry in summary["settings"]:
        arms = {l: a for l, a in entry["arms"].items() if len(a["lr_table"]) > 1}
        if not arms:
            continue
        lrs = sorted({lr for a in arms.values() for lr in a["lr_table"]}, key=float)
        lines += [f"\n{entry['setting']['name']} ({entry['mode']}): mean final val acc on tuning seeds "
                  f"{entry['setting']['tune_seeds']}\n",
                  "| lr | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for lr in lrs:
            cells = []
            for l, a in arms.items():
                v = a["lr_table"].get(lr)
                mark = " *" if v is not None and float(lr) == a["chosen_lr"] else ""
                cells.append(f"{np.mean(v):.4f}{mark}" if v else "-")
            lines.append(f"| {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TITLES = {"svi": "Claim 1: SVI vs SGD", "linesearch": "Claim 2: ADAMSLS / PLASLS vs Adam",
          "stability": "Claim 3: Mosbach et al. stability",
          "stabilizers": "Claim 4: Fu et al.'s stabilizers where fine-tuning fails"}


def write_report(out_dir: str, claims: List[str], img_dir: Optional[str] = None, target: Optional[float] = None,
                 time_axis: str = "wall") -> str:
    """Write ``<out>/report.md`` (+ PNGs, + ``<claim>/stats.json``); returns the Markdown text."""
    img_dir = img_dir or os.path.join(out_dir, "img")
    os.makedirs(img_dir, exist_ok=True)
    md_path = os.path.join(out_dir, "report.md")
    parts = ["# svi-finetune results\n"]
    for claim in claims:
        claim_dir = os.path.join(out_dir, claim)
        path = os.path.join(claim_dir, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            summary = json.load(fh)
        load_runs(claim_dir, summary)
        stats = summarize(summary, target)
        with open(os.path.join(claim_dir, "stats.json"), "w") as fh:
            json.dump(stats, fh, indent=1)
        curves = os.path.join(img_dir, f"{claim}_curves.png")
        box = os.path.join(img_dir, f"{claim}_box.png")
        plot_curves(summary, curves, TITLES.get(claim, claim), time_axis)
        plot_box(summary, box, TITLES.get(claim, claim) + ": final val accuracy per seed")
        rel = lambda p: os.path.relpath(p, os.path.dirname(md_path))
        parts += [f"## {TITLES.get(claim, claim)}\n",
                  f"Model: {summary['model']}; data: {summary['dataset_source']}.\n",
                  markdown_tables(claim, summary, stats), "", lr_table(summary), "",
                  f"![curves]({rel(curves)})\n", f"![final accuracy]({rel(box)})\n"]
    text = "\n".join(parts)
    with open(md_path, "w") as fh:
        fh.write(text)
    return text
