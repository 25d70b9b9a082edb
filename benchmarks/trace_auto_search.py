"""Trace AdamSLS / SaLSA step sizes per step on a svi-finetune setting (issue 26).

Runs ``svi-finetune linesearch`` with the given arguments and, after every optimizer step, records the
stored step size, whether the step searched, its backtracks and the loss. ``--variant`` swaps
initial_step's rules for the papers' ones to isolate them (diagnosis only):

- ``current``: the code as it is
- ``paper-backtrack``: ``search="auto"`` backtracks by ``eta * beta_b``
- ``paper-start``: ``search="auto"`` starts where the papers do (no catch-up)
- ``paper-both``: both

Usage (from the repository root)::

    PYTHONPATH=. SVI_KERNELS_NO_JIT=1 nice -n 10 python benchmarks/trace_auto_search.py \
        --variant current --trace /tmp/trace.json -- linesearch --modes top1 --epochs 6 --subset 500 \
        --seeds 0 --tune-seeds 0 --lr-grid 1e-3 --optimizers adamsls-auto --threads 1 --out /tmp/x --time-axis cpu
"""
from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="current",
                   choices=["current", "paper-backtrack", "paper-start", "paper-both"])
    p.add_argument("--trace", required=True, help="JSON file: one list of per-step records per run")
    a = p.parse_args(argv[:split])

    from svi_kernels.optim import initial_step, search_schedule
    from svi_kernels.optim._line_search import LineSearchOptimizer

    if a.variant in ("paper-backtrack", "paper-both"):
        original_backtrack = initial_step.backtrack

        def backtrack(ls, group, eta, f0, f1, s):
            original_backtrack(ls, group, eta, f0, f1, s)  # keep its bookkeeping
            return eta * group["beta_b"]
        initial_step.backtrack = backtrack
    if a.variant in ("paper-start", "paper-both"):
        def start(ls, paper_start, group, gi):
            if initial_step.ours(ls):
                search_schedule.note_start(ls["search"], gi, paper_start, initial_step.growth_per_step(group))
            return paper_start
        initial_step.start = start

    runs = []
    failed = []  # the failed trials of the current search: (eta, f0, f1, s, next eta)
    traced_backtrack = initial_step.backtrack

    def backtrack(ls, group, eta, f0, f1, s):
        nxt = traced_backtrack(ls, group, eta, f0, f1, s)
        failed.append([float(eta), float(f0), float(f1), float(s), float(nxt)])
        return nxt
    initial_step.backtrack = backtrack
    original_armijo = LineSearchOptimizer._armijo
    original_finish = LineSearchOptimizer._finish

    def armijo(self, runner, f0, eta, group, try_point, read, on_nonfinite=None):
        failed.clear()
        out = original_armijo(self, runner, f0, eta, group, try_point, read, on_nonfinite)
        self.__dict__.setdefault("_trace_step", []).append(
            dict(f0=float(f0), start=float(eta), accepted=float(out[0]), backtracks=int(out[1]),
                 failed=list(failed)))
        return out

    def finish(self, runner, searched=True, etas=None, old_etas=None):
        original_finish(self, runner, searched, etas, old_etas)
        if not hasattr(self, "_trace"):
            self._trace = []
            runs.append(self._trace)
        searches = self.__dict__.pop("_trace_step", [])
        ls = self.ls_state
        self._trace.append(dict(step=ls["step"], searched=bool(searched),
                                step_sizes=[float(e) for e in ls["step_sizes"]],
                                searches=searches))

    LineSearchOptimizer._armijo = armijo
    LineSearchOptimizer._finish = finish

    from benchmarks.finetune import cli
    try:
        rc = cli.main(argv[split + 1:])
    finally:
        with open(a.trace, "w") as f:
            json.dump(dict(variant=a.variant, args=argv[split + 1:], runs=runs), f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
