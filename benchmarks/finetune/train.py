"""One training run: a (optimizer, lr, seed, schedule) on cached features, with periodic evaluation.

Determinism: ``seed`` fixes the classifier init (``model.reset``), the batch order (its own
generator) and the dropout masks (global torch RNG seeded at the start). Timing counts only the
training steps (forward, backward, optimizer), never evaluation; both wall-clock and process CPU
time are kept because the study machine's 2 cores are shared.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from . import optimizers
from .features import Features
from .model import Backbone, TrainableTop, reset


@dataclass
class RunConfig:
    optimizer: str
    lr: float
    seed: int
    top_layers: int
    epochs: float = 3.0
    batch_size: int = 32
    schedule: str = "none"          # none | cosine | linear (after warmup)
    warmup: float = 0.0             # fraction of total steps with linear warmup from 0
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 0.0          # global-norm clipping (0 = off); not used by line search
    evals_per_epoch: int = 4
    sls_batches_per_epoch: int = 500
    backend: Optional[str] = None
    tag: str = ""                   # free label (recipe name, setting)
    extra: dict = field(default_factory=dict)


def schedule_factor(kind: str, warmup_steps: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "none":
            return 1.0
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        raise ValueError(f"unknown schedule {kind!r}")
    return f


@torch.no_grad()
def evaluate(top: TrainableTop, feats: Features, batch_size: int = 128) -> tuple[float, float]:
    was_training = top.training
    top.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(feats), batch_size):
        x, m, y = feats.batch(torch.arange(start, min(start + batch_size, len(feats))))
        logits = top(x, m)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    top.train(was_training)
    return correct / len(feats), loss_sum / len(feats)


def run(backbone: Backbone, top: TrainableTop, train: Features, val: Features, cfg: RunConfig,
        progress: Optional[Callable[[int, int, dict], None]] = None) -> dict:
    reset(backbone, top, cfg.seed)
    torch.manual_seed(cfg.seed)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    built = optimizers.build(cfg.optimizer, top, backbone.model, lr=cfg.lr, steps_per_epoch=steps_per_epoch,
                             weight_decay=cfg.weight_decay, eps=cfg.eps,
                             sls_batches_per_epoch=cfg.sls_batches_per_epoch, backend=cfg.backend)
    opt = built.optimizer
    sched = None
    if not built.line_search and (cfg.schedule != "none" or cfg.warmup > 0):
        warm = int(round(cfg.warmup * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg.schedule, warm, total))
    params = [p for p in top.parameters() if p.requires_grad]

    acc0, vloss0 = evaluate(top, val)
    history = {"step": [0], "epoch": [0.0], "wall_s": [0.0], "cpu_s": [0.0], "train_loss": [float("nan")],
               "val_acc": [acc0], "val_loss": [vloss0]}
    wall = cpu = 0.0
    window: List[float] = []
    diverged = False
    top.train()
    step = 0
    while step < total and not diverged:
        perm = torch.randperm(n, generator=order_gen)
        for start in range(0, n, cfg.batch_size):
            if step >= total:
                break
            x, m, y = train.batch(perm[start:start + cfg.batch_size])
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            opt.zero_grad()
            if built.line_search:
                loss = opt.step(lambda: F.cross_entropy(top(x, m), y))
            else:
                loss = F.cross_entropy(top(x, m), y)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
            wall += time.perf_counter() - t_wall
            cpu += time.process_time() - t_cpu
            step += 1
            lv = float(loss.detach())
            window.append(lv)
            if not math.isfinite(lv):
                diverged = True
            if step % eval_every == 0 or step == total or diverged:
                acc, vloss = evaluate(top, val)
                history["step"].append(step)
                history["epoch"].append(step / steps_per_epoch)
                history["wall_s"].append(wall)
                history["cpu_s"].append(cpu)
                history["train_loss"].append(sum(window) / len(window))
                history["val_acc"].append(acc)
                history["val_loss"].append(vloss)
                window = []
                if progress:
                    progress(step, total, {"acc": acc, "loss": history["train_loss"][-1]})
            if diverged:
                break
    built.close()
    stats = optimizers.line_search_stats(opt)
    fwd = stats.get("n_forwards")
    result = {
        "config": asdict(cfg),
        "implementation": built.implementation,
        "notes": built.notes,
        "n_train": n, "n_val": len(val), "steps": step, "steps_per_epoch": steps_per_epoch,
        "diverged": diverged,
        "final_val_acc": history["val_acc"][-1],
        "best_val_acc": max(history["val_acc"]),
        "final_train_loss": history["train_loss"][-1],
        "final_val_loss": history["val_loss"][-1],
        "train_wall_s": wall, "train_cpu_s": cpu,
        "forwards_per_step": (fwd / max(1, step)) if isinstance(fwd, (int, float)) else 1.0,
        "line_search": stats,
        "history": history,
    }
    return result
