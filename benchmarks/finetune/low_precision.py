"""Issue 24: low-precision optimizer state and master weights, fine-tuning beside float32.

Per optimizer (AdamW with the study's recipe at a fixed lr; AdamSLS with ``search="auto"`` at its
defaults), the arms are:

- ``fp32``: float32 parameters and state (the reference);
- ``state-bf16`` / ``state-int8``: float32 parameters, ``state_dtype=torch.bfloat16`` / ``"int8"``;
- ``bf16`` (plain: ``master_weights=False``), ``bf16-master``, ``bf16-kahan``, ``bf16-8bit``,
  ``bf16-stochastic``: the trained part's parameters in bfloat16 with each ``master_weights`` mode;
- ``bf16-8bit-int8``: bf16 parameters, ``"8bit"`` masters and int8 state (~7 B/param with gradients).

bf16 parameters: the trained modules (pooler + classifier, and the trained encoder layers in topK)
are cast to bfloat16 for the run; the cached frozen features are cast to bf16 on entry and the logits
back to float32, so the loss (cross-entropy) and the evaluation are computed in float32.

Scoring: per setting and arm, the final val accuracy mean +- std over the seeds; its difference from
the same optimizer's fp32 arm in units of the fp32 arm's std; "within one std" when that difference
is at most 1 in absolute value; the optimizer's live state and the whole training state (parameters +
gradients + state) in bytes per trained parameter, counted from the live tensors after the last step
(benchmarks/state_bytes.py); forwards per step (AdamSLS).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from . import claims as C

# arm -> RunConfig overrides (state_dtype, master_weights, param_dtype)
ARMS = {
    "fp32": {},
    "state-bf16": dict(state_dtype="bf16"),
    "state-int8": dict(state_dtype="int8"),
    "bf16": dict(param_dtype="bf16", master_weights="false"),
    "bf16-master": dict(param_dtype="bf16", master_weights="true"),
    "bf16-kahan": dict(param_dtype="bf16", master_weights="kahan"),
    "bf16-8bit": dict(param_dtype="bf16", master_weights="8bit"),
    "bf16-stochastic": dict(param_dtype="bf16", master_weights="stochastic"),
    "bf16-8bit-int8": dict(param_dtype="bf16", master_weights="8bit", state_dtype="int8"),
}
OPTIMIZERS = ["adamw", "adamsls-auto"]
ADAMW_RECIPE = dict(schedule="cosine", warmup=0.1, weight_decay=0.01)
# AdamW's fixed lr per setting: the best mean final accuracy of tuning-free's 10-seed sweep
# (docs/results.md, claim 5: classifier-n500 1e-3, top1-n500 3e-3); 1e-3 elsewhere
ADAMW_LR = {"classifier": 1e-3, "top1": 3e-3}
ADAMW_DEFAULT_LR = 1e-3

# (name, top_layers, subset, epochs, batch size, evals per epoch) per scale
SETTINGS = {
    "smoke": [("classifier-n64", 0, 64, 2, 16, 2)],
    "study": [("classifier-n500", 0, 500, 5, 32, 2), ("top1-n500", 1, 500, 5, 32, 2)],
}
# seconds per step / per evaluation as tuning_free's estimate, times a slowdown of the bf16 / master
# arms (the master modes are a Python-level policy: docs/api.md measured 1.7-16x a plain AdamW step)
SLOWDOWN = {"fp32": 1.0, "state-bf16": 1.2, "state-int8": 1.5, "bf16": 1.2, "bf16-master": 1.5, "bf16-kahan": 2.0,
            "bf16-8bit": 3.0, "bf16-stochastic": 3.0, "bf16-8bit-int8": 3.5}


def label(optimizer: str, arm: str) -> str:
    return f"{optimizer}+{arm}"  # in run file names: no ":"


def settings(scale: str = "study", seeds: Optional[List[int]] = None, arms: Optional[List[str]] = None,
             optimizers: Optional[List[str]] = None, names: Optional[List[str]] = None) -> List[C.Setting]:
    seeds = list(range(10)) if seeds is None else list(seeds)
    out = []
    for name, k, subset, epochs, bs, evals in SETTINGS[scale]:
        if names and name not in names:
            continue
        chosen = []
        for o in optimizers or OPTIMIZERS:
            for a in arms or list(ARMS):
                if o == "adamw":
                    lr = ADAMW_LR.get(C.mode_name(k), ADAMW_DEFAULT_LR)
                    chosen.append(C.Arm(label(o, a), o, [lr], dict(ADAMW_RECIPE, **ARMS[a])))
                else:
                    chosen.append(C.Arm(label(o, a), o, [1.0], dict(ARMS[a])))
        out.append(C.Setting(name, k, subset, chosen, seeds, list(seeds[:1]),
                             dict(epochs=epochs, batch_size=bs, evals_per_epoch=evals)))
    return out


def estimate_seconds(plan: List[C.Setting]) -> float:
    from .tuning_free import EVAL_S, FORWARDS, STEP_S
    total = 0.0
    for s in plan:
        steps = math.ceil((s.subset or 500) / s.base["batch_size"]) * s.base["epochs"]
        evals = 1 + s.base["evals_per_epoch"] * s.base["epochs"]
        for arm in s.arms:
            factor = (FORWARDS if arm.optimizer.endswith("-auto") else 1.0) * SLOWDOWN[arm.label.split("+")[1]]
            total += len(s.seeds) * (steps * STEP_S[s.top_layers] * factor + evals * EVAL_S[s.top_layers])
    return total


# ------------------------------------------------------------------------------------------- scoring
def arm_stats(runs: List[dict]) -> dict:
    final = [r["final_val_acc"] for r in runs]
    mem = [r.get("memory") or {} for r in runs]
    return {
        "n": len(runs),
        "final_mean": float(np.mean(final)), "final_std": float(np.std(final, ddof=1)) if len(final) > 1 else 0.0,
        "diverged": sum(bool(r.get("diverged")) for r in runs),
        "param_dtype": mem[0].get("param_dtype"), "state_dtypes": mem[0].get("state_dtypes"),
        "state_bytes_per_param": float(np.mean([m.get("state_bytes_per_param", math.nan) for m in mem])),
        "train_bytes_per_param": float(np.mean([m.get("train_bytes_per_param", math.nan) for m in mem])),
        "forwards_per_step": float(np.mean([r["forwards_per_step"] for r in runs])),
        "wall_s_per_step": float(np.mean([r["train_wall_s"] / max(1, r["steps"]) for r in runs])),
    }


def score_setting(runs_by_arm: Dict[str, List[dict]]) -> dict:
    """``runs_by_arm["<optimizer>+<arm>"]`` = the runs of every seed. Each arm against its optimizer's
    ``fp32`` arm: delta = (mean - fp32 mean) / fp32 std; within one std when |delta| <= 1."""
    out = {}
    for lab, runs in runs_by_arm.items():
        opt = lab.split("+")[0]
        st = arm_stats(runs)
        ref = runs_by_arm.get(label(opt, "fp32"))
        if ref is not None and len(ref) > 1:  # one seed has no std to measure against
            r = arm_stats(ref)
            diff = st["final_mean"] - r["final_mean"]
            st["diff"] = diff
            st["diff_in_std"] = diff / r["final_std"] if r["final_std"] > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
            st["within_one_std"] = bool(abs(st["diff_in_std"]) <= 1.0)
        out[lab] = st
    return {"arms": out}


def load_setting_runs(claim_dir: str, setting: C.Setting) -> Dict[str, List[dict]]:
    return {arm.label: C.read_runs(claim_dir, setting, arm, arm.lrs[0]) for arm in setting.arms}


def _f(x, f="{:.2f}"):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def markdown(scores: Dict[str, dict]) -> str:
    lines = []
    for name, s in scores.items():
        lines += [f"### {name}\n",
                  "| optimizer | arm | seeds | final acc (mean ± std) | Δ vs fp32 (fp32 stds) | within one std | "
                  "param dtype | state dtypes | state B/param | training B/param | forwards/step | ms/step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for lab, st in s["arms"].items():
            opt, arm = lab.split("+")
            within = "—" if "within_one_std" not in st else ("yes" if st["within_one_std"] else "**no**")
            lines.append(f"| {opt} | {arm} | {st['n']} | {st['final_mean']:.4f} ± {st['final_std']:.4f} | "
                         f"{_f(st.get('diff_in_std'), '{:+.2f}')} | {within} | {st['param_dtype']} | "
                         f"{', '.join(st['state_dtypes'] or [])} | {_f(st['state_bytes_per_param'])} | "
                         f"{_f(st['train_bytes_per_param'])} | {st['forwards_per_step']:.2f} | "
                         f"{1000 * st['wall_s_per_step']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: str, plan: List[C.Setting]) -> str:
    """Score ``plan`` from its run files: ``<out>/low-precision/scores.json`` and ``report.md``."""
    claim_dir = os.path.join(out_dir, "low-precision")
    scores = {s.name: score_setting(load_setting_runs(claim_dir, s)) for s in plan}
    with open(os.path.join(claim_dir, "scores.json"), "w") as fh:
        json.dump({"scores": scores}, fh, indent=1)
    text = "\n".join(["# Issue 24: low-precision state and master weights\n", __doc__.split("\n\n", 1)[1],
                      markdown(scores)])
    with open(os.path.join(claim_dir, "report.md"), "w") as fh:
        fh.write(text)
    return text
