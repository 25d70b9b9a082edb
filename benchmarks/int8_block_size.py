"""How large a block of int8 optimizer state should be (issue 24 phase 2): train a toy problem with
``state_dtype="int8"`` at several ``state_block_size`` values and with fp32 state, same seeds, and print
the final losses, their gap to fp32 and the state's bytes per parameter (counted from the live tensors).

A block shares one float32 scale (its absmax): smaller blocks follow the local magnitude of m and v more
closely (less quantisation error where a block mixes large and small values) at 4 / B extra bytes per value
and moment. The toy problem: a 3-layer tanh MLP (64 -> 256 -> 256 -> 10, ~85k parameters: every weight
tensor spans many blocks of every size) fitted to a random teacher's labels, minibatches of 128.

    python -m benchmarks.int8_block_size [--steps 300] [--seeds 3] [--optimizer AdamW|AdamSLS] [--backend reference]

Runs on CPU in a few minutes (reference backend); the numbers in docs/kernels.md came from it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import svi_kernels as sk
from benchmarks.state_bytes import state_bytes_per_param

BLOCK_SIZES = (64, 128, 256, 1024, 2048)
D_IN, HIDDEN, CLASSES, N_TRAIN, BATCH = 64, 256, 10, 4096, 128


def _data(seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(N_TRAIN, D_IN, generator=g)
    teacher = torch.randn(D_IN, CLASSES, generator=g)
    y = (torch.tanh(x @ teacher) + 0.3 * torch.randn(N_TRAIN, CLASSES, generator=g)).argmax(dim=1)
    return x, y


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES))


def _optimizer(name: str, params, backend: str, **storage):
    if name == "AdamW":
        return sk.AdamW(params, lr=3e-3, weight_decay=0.0, backend=backend, **storage)
    return sk.AdamSLS(params, n_batches_per_epoch=N_TRAIN // BATCH, init_step_size=1e-2, backend=backend, **storage)


def train(name: str, seed: int, steps: int, backend: str, **storage) -> tuple[float, float, torch.Tensor,
                                                                             torch.Tensor]:
    """(final full-batch training loss, optimizer bytes per parameter, start and final parameters flat)."""
    x, y = _data(seed)
    model = _model(seed)
    params = list(model.parameters())
    start = torch.cat([p.detach().reshape(-1) for p in params])
    opt = _optimizer(name, params, backend, **storage)
    g = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=g)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            return loss
        if name == "AdamW":
            closure()
            opt.step()
        else:
            opt.step(closure)
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    return final, state_bytes_per_param(opt, params), start, torch.cat([p.detach().reshape(-1) for p in params])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--optimizer", choices=("AdamW", "AdamSLS"), default="AdamW")
    ap.add_argument("--backend", default="reference")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = [("fp32", {})] + [(f"int8 B={b}", dict(state_dtype="int8", state_block_size=b)) for b in BLOCK_SIZES]
    results = {}
    t0 = time.perf_counter()
    for label, storage in settings:
        runs = [train(args.optimizer, s, args.steps, args.backend, **storage) for s in range(args.seeds)]
        results[label] = ([r[0] for r in runs], runs[0][1], runs)
    base, base_runs = results["fp32"][0], results["fp32"][2]
    print(f"{args.optimizer}, {args.steps} steps, {args.seeds} seeds, backend {args.backend} "
          f"({time.perf_counter() - t0:.0f} s); final full-batch loss (initial ~{_initial_loss():.3f})")
    print("drift: |w - w_fp32| / |w_fp32 - w_0| at the end, the same seed (mean over seeds)")
    print(f"{'state':>14} {'B/param':>8} {'loss mean':>10} {'std':>8} {'gap to fp32 (mean of per-seed gaps)':>36} "
          f"{'drift':>8}")
    for label, (losses, bpp, runs) in results.items():
        gaps = [a - b for a, b in zip(losses, base)]
        drift = statistics.mean(float((r[3] - b[3]).norm() / (b[3] - b[2]).norm()) for r, b in zip(runs, base_runs))
        print(f"{label:>14} {bpp:8.3f} {statistics.mean(losses):10.5f} {statistics.pstdev(losses):8.5f} "
              f"{statistics.mean(gaps):+36.5f} {drift:8.4f}")


def _initial_loss() -> float:
    x, y = _data(0)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(_model(0)(x), y))


if __name__ == "__main__":
    main()
