"""Wall time per training step of the line searches with ``search="auto"`` against AdamW's, on a small
model where the host work shows (issue 26's target: <= 1.15x AdamW's), measured in one run.

    python -m benchmarks.finetune.auto_step_time [--steps 600] [--repeats 5] [--threads 1]

Each arm trains the same model from the same init on the same batches (a fresh copy per repeat);
the arms alternate within every repeat, so drift of a shared machine hits them alike. Reported: the
median over repeats of (seconds per step of the arm / seconds per step of AdamW in the same repeat),
and forwards per step. The whole loop is timed (zero_grad, forward, backward, step), as a user runs it.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import svi_kernels as sk

ARMS = {
    "AdamW": lambda ps: sk.AdamW(ps, lr=1e-3, weight_decay=0.0),
    "AdamSLS-auto": lambda ps: sk.AdamSLS(ps, search="auto"),
    "SaLSA-auto": lambda ps: sk.SaLSA(ps, search="auto"),
    "LayerwiseAdamSLS-auto": lambda ps: sk.LayerwiseAdamSLS(ps, search="auto"),
}


def small_model(depth: int = 8, width: int = 64, n_in: int = 32) -> torch.nn.Module:
    """Many small layers: per-step host work (launches, Python) is a large share of the step."""
    layers = [torch.nn.Linear(n_in, width), torch.nn.GELU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 2))


def time_arm(name: str, model: torch.nn.Module, batches) -> tuple[float, float]:
    """(seconds per step, forwards per step) of one training run."""
    opt = ARMS[name](model.parameters())
    loss_fn = torch.nn.functional.cross_entropy
    closure_based = name != "AdamW"
    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        if closure_based:
            opt.step(lambda: loss_fn(model(x), y))
        else:
            loss_fn(model(x), y).backward()
            opt.step()
    dt = (time.perf_counter() - t0) / len(batches)
    return dt, (opt.ls_state["n_forwards"] / len(batches) if closure_based else 1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base = small_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 32, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    idx = torch.randint(0, len(x), (a.steps, a.batch), generator=g)
    batches = [(x[i], y[i]) for i in idx]
    ratios = {n: [] for n in ARMS if n != "AdamW"}
    fwd = {n: [] for n in ARMS}
    per_step = {n: [] for n in ARMS}
    time_arm("AdamW", copy.deepcopy(base), batches[:20])  # warm-up (allocator, kernels)
    for r in range(a.repeats):
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
        got = {n: time_arm(n, copy.deepcopy(base), batches) for n in order}
        for n, (dt, f) in got.items():
            per_step[n].append(dt)
            fwd[n].append(f)
            if n != "AdamW":
                ratios[n].append(dt / got["AdamW"][0])
    print(f"{a.steps} steps x {a.repeats} repeats, batch {a.batch}, {a.threads} thread(s), "
          f"model {sum(p.numel() for p in base.parameters())} params")
    print(f"{'arm':24s} {'ms/step':>8s} {'fwd/step':>8s} {'x AdamW (median, min-max)':>28s}")
    for n in ARMS:
        ms = 1000 * statistics.median(per_step[n])
        rr = ratios.get(n)
        r = f"{statistics.median(rr):.3f} ({min(rr):.3f}-{max(rr):.3f})" if rr else "1"
        print(f"{n:24s} {ms:8.3f} {statistics.median(fwd[n]):8.2f} {r:>28s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
