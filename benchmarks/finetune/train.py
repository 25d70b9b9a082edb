"""One training run: a (optimizer, lr, seed, schedule) on cached features, with periodic evaluation.

Determinism: ``seed`` fixes the classifier init (``model.reset``), the batch order (its own
generator) and the dropout masks (global torch RNG seeded at the start). Timing counts only the
training steps (forward, backward, optimizer), never evaluation; both wall-clock and process CPU
time are kept because the study machine's 2 cores are shared.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from svi_kernels import stability

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
    length_group: int = 8           # sort runs of 8 batches by length (0/1 = plain random batches)
    sls_batches_per_epoch: int = 500
    backend: Optional[str] = None
    tag: str = ""                   # free label (recipe name, setting)
    extra: dict = field(default_factory=dict)
    # Fu et al.'s stabilizers (svi_kernels.stability); the defaults turn them off
    mmr: float = 0.0                # MMR weight (0 = off)
    mmr_distance: str = "euclidean"
    mmr_normalize: str = "l2"
    heads: int = 1                  # MHLoss heads (1 = HF's single linear classifier)
    heads_reduction: str = "mean"
    surt_steps: int = 0             # SURT masked-LM steps before fine-tuning (0 = off)
    surt_lr: float = 5e-5
    surt_mask_rate: float = 0.15
    surt_head_steps: int = -1       # MLM-head-only steps first (-1: surt's default for a fresh head)
    surt_batch_size: int = 16
    # issue 24's low-precision arms (svi-finetune low-precision); the defaults are the optimizer's own
    state_dtype: str = ""           # "" (the optimizer's default) | fp32 | bf16 | int8
    master_weights: str = ""        # "" (False) | false | true | kahan | 8bit | stochastic
    param_dtype: str = ""           # "" (float32) | bf16: the trained part's parameters cast to bfloat16


STABILIZER_DEFAULTS = {f.name: f.default for f in fields(RunConfig)
                       if f.name.startswith(("mmr", "heads", "surt"))
                       or f.name in ("state_dtype", "master_weights", "param_dtype")}
PARAM_DTYPES = {"": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}


def same_config(saved: Optional[dict], cfg: "RunConfig") -> bool:
    """A saved run's config equals ``cfg``; runs saved before the stabilizer and precision fields had them off."""
    return saved is not None and {**STABILIZER_DEFAULTS, **saved} == asdict(cfg)


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


def batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator, group: int) -> List[torch.Tensor]:
    """One epoch of random batches. With ``group > 1``, each run of ``group * batch_size`` shuffled rows
    is sorted by length before being cut into batches (less padding, like HF's group_by_length), and
    the batch order is shuffled again."""
    perm = torch.randperm(len(lengths), generator=gen)
    if group <= 1:
        return list(perm.split(batch_size))
    out = []
    for chunk in perm.split(group * batch_size):
        out += list(chunk[torch.argsort(lengths[chunk], descending=True, stable=True)].split(batch_size))
    return [out[i] for i in torch.randperm(len(out), generator=gen)]


@torch.no_grad()
def evaluate(top: TrainableTop, feats: Features, batch_size: int = 128) -> tuple[float, float]:
    was_training = top.training
    top.eval()
    correct, loss_sum = 0, 0.0
    order = torch.argsort(feats.mask.sum(1))  # length-sorted: exact, and little padding
    for start in range(0, len(feats), batch_size):
        x, m, y = feats.batch(order[start:start + batch_size])
        logits = top(x, m)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    top.train(was_training)
    return correct / len(feats), loss_sum / len(feats)


def check_stabilizers(cfg: RunConfig) -> None:
    """Refuse unusable stabilizer settings before any work (the argument errors of svi_kernels.stability)."""
    if cfg.mmr:
        stability.MaxMarginRegularizer(cfg.mmr, cfg.mmr_distance, cfg.mmr_normalize)
    if cfg.heads != 1:
        stability.MultiHeadClassifier(1, 1, cfg.heads, cfg.heads_reduction)
    if cfg.surt_steps and cfg.top_layers == 0:
        raise ValueError("SURT re-trains encoder layers, and mode 'classifier' trains none (the [CLS] features "
                         "are cached): use mode topK or full with --surt-steps")


def _install_heads(backbone: Backbone, top: TrainableTop, cfg: RunConfig):
    """MHLoss: swap the classifier for ``cfg.heads`` heads (each drawn like ``reset`` draws the single one).
    Returns the original classifier, to put back after the run."""
    original = top.classifier
    if cfg.heads == 1:
        return original
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    head = stability.MultiHeadClassifier.like(original, cfg.heads, cfg.heads_reduction,
                                              backbone.model.config.initializer_range, gen)
    top.classifier = backbone.model.classifier = head  # the full model too: layer groups (PLASLS) see it
    return original


def _surt(backbone: Backbone, top: TrainableTop, cfg: RunConfig, texts: Optional[List[str]]) -> dict:
    """SURT on the run's training texts, moving only the encoder layers this run trains (the cached
    frozen features below them stay valid)."""
    if not texts:
        raise ValueError("SURT needs the training texts")
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "fresh MLM head" note goes into the run's notes instead
        rep = stability.surt(backbone.model, backbone.mlm_tokenizer, texts, steps=cfg.surt_steps, lr=cfg.surt_lr,
                             mlm_probability=cfg.surt_mask_rate, batch_size=cfg.surt_batch_size,
                             seed=cfg.seed, parameters=top.encoder_parameters(), checkpoint=backbone.checkpoint,
                             head_only_steps=None if cfg.surt_head_steps < 0 else cfg.surt_head_steps)
    return {"mlm_head_initialised": rep.mlm_head_initialised, "head_only_steps": rep.head_only_steps,
            "steps": rep.steps, "first_loss": rep.losses[0] if rep.losses else None,
            "last_loss": rep.losses[-1] if rep.losses else None, "cpu_s": time.process_time() - t0,
            "notes": rep.notes}


def make_loss(top: TrainableTop, cfg: RunConfig) -> Callable:
    """The training loss: cross-entropy (or MHLoss over the heads), plus the MMR term on the pooled features."""
    mmr = stability.MaxMarginRegularizer(cfg.mmr, cfg.mmr_distance, cfg.mmr_normalize) if cfg.mmr else None

    def loss(x, m, y):
        logits, pooled = top(x, m, with_pooled=True)
        task = top.classifier.loss(y) if cfg.heads > 1 else F.cross_entropy(logits, y)
        return task + mmr(pooled, y) if mmr is not None else task

    return loss


def run(backbone: Backbone, top: TrainableTop, train: Features, val: Features, cfg: RunConfig,
        progress: Optional[Callable[[int, int, dict], None]] = None, texts: Optional[List[str]] = None) -> dict:
    """One run; ``texts``: the training texts (SURT's input)."""
    check_stabilizers(cfg)
    reset(backbone, top, cfg.seed)
    original_head = _install_heads(backbone, top, cfg)
    try:
        surt_info = _surt(backbone, top, cfg, texts) if cfg.surt_steps else None
        if PARAM_DTYPES[cfg.param_dtype] != torch.float32:
            # the trained part in bf16 (TrainableTop casts its float input to match and returns fp32 logits)
            top.to(PARAM_DTYPES[cfg.param_dtype])
        result = _run(backbone, top, train, val, cfg, progress)
    finally:
        top.float()  # the shared modules back in float32 (reset() reloads the pretrained values)
        top.classifier = backbone.model.classifier = original_head
    if surt_info is not None:
        result["surt"] = surt_info
        result["notes"] = result["notes"] + surt_info["notes"]
    return result


def _run(backbone: Backbone, top: TrainableTop, train: Features, val: Features, cfg: RunConfig,
         progress: Optional[Callable[[int, int, dict], None]] = None) -> dict:
    torch.manual_seed(cfg.seed)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    built = optimizers.build(cfg.optimizer, top, backbone.model, lr=cfg.lr, steps_per_epoch=steps_per_epoch,
                             weight_decay=cfg.weight_decay, eps=cfg.eps,
                             sls_batches_per_epoch=cfg.sls_batches_per_epoch, backend=cfg.backend,
                             precision=optimizers.precision_kwargs(cfg.state_dtype, cfg.master_weights))
    opt = built.optimizer
    sched = None
    if not built.line_search and (cfg.schedule != "none" or cfg.warmup > 0):
        warm = int(round(cfg.warmup * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg.schedule, warm, total))

    with built.evaluating(top):
        acc0, vloss0 = evaluate(top, val)
    history = {"step": [0], "epoch": [0.0], "wall_s": [0.0], "cpu_s": [0.0], "train_loss": [float("nan")],
               "val_acc": [acc0], "val_loss": [vloss0], "forwards": [0], "backwards": [0]}
    loop = _Loop(top, train, val, cfg, built, sched, history, progress, order_gen, total, steps_per_epoch)
    try:
        loop.run()
        notes = _svi_notes(built)
        memory = memory_stats(opt, loop.params)
    finally:
        built.close()  # detach SVI even when a run fails, so the next run starts clean
    stats = optimizers.line_search_stats(opt)
    step, wall, cpu, diverged = loop.step, loop.wall, loop.cpu, loop.diverged
    fwd = stats.get("n_forwards")
    result = {
        "config": asdict(cfg),
        "implementation": built.implementation,
        "notes": notes,
        "n_train": n, "n_val": len(val), "steps": step, "steps_per_epoch": steps_per_epoch,
        "diverged": diverged,
        "final_val_acc": history["val_acc"][-1],
        "best_val_acc": max(history["val_acc"]),
        "final_train_loss": history["train_loss"][-1],
        "final_val_loss": history["val_loss"][-1],
        "train_wall_s": wall, "train_cpu_s": cpu,
        "forwards_per_step": (fwd / max(1, step)) if isinstance(fwd, (int, float)) else 1.0,
        "line_search": stats,
        "memory": memory,
        "history": history,
    }
    return result


def memory_stats(opt: torch.optim.Optimizer, params: List[torch.Tensor]) -> dict:
    """What training holds per trained parameter element, counted from the live tensors after the last
    step: the optimizer's state (benchmarks/state_bytes.py: every tensor reachable from the optimizer,
    parameters and gradients left out) and the whole training state (parameters + gradients, one per
    parameter in its dtype, + that state)."""
    from ..state_bytes import state_bytes_per_param

    numel = sum(p.numel() for p in params)
    state = state_bytes_per_param(opt, params)
    pg = sum(2 * p.numel() * p.element_size() for p in params) / numel
    dtypes = sorted({str(v.dtype).replace("torch.", "") for st in opt.state.values() if isinstance(st, dict)
                     for v in st.values() if torch.is_tensor(v) and v.numel() > 1})
    return {"param_dtype": str(params[0].dtype).replace("torch.", ""), "state_dtypes": dtypes,
            "state_bytes_per_param": state, "train_bytes_per_param": pg + state, "n_params": numel}


def _svi_notes(built) -> List[str]:
    """``built.notes``, with the SVI layer list read after training: ``svi.attach`` without example
    inputs finds the layers during the first forward, after the optimizer was built."""
    layers = [str(l) for l in getattr(built.svi_handle, "layers", None) or []]
    if not layers:
        return list(built.notes)
    return [n for n in built.notes if not n.startswith("SVI field on")] + \
        [f"SVI field on {len(layers)} layers: {', '.join(layers)}"]


class _Loop:
    """The step loop of ``run``: batches, optimizer steps, timing, periodic evaluation."""

    def __init__(self, top, train, val, cfg, built, sched, history, progress, order_gen, total, steps_per_epoch):
        self.top, self.train, self.val, self.cfg, self.built, self.sched = top, train, val, cfg, built, sched
        self.history, self.progress, self.order_gen = history, progress, order_gen
        self.total, self.steps_per_epoch = total, steps_per_epoch
        self.eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
        self.params = [p for p in top.parameters() if p.requires_grad]
        self.loss_fn = make_loss(top, cfg)
        self.step, self.wall, self.cpu, self.diverged = 0, 0.0, 0.0, False

    def _one_step(self, x, m, y) -> float:
        opt, loss_fn = self.built.optimizer, self.loss_fn
        opt.zero_grad()
        if self.built.line_search:
            try:
                loss = opt.step(lambda: loss_fn(x, m, y))
            except FloatingPointError:  # svi_kernels.NonFiniteLossError: the loss is already NaN/inf
                return float("nan")
        else:
            loss = loss_fn(x, m, y)
            loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            opt.step()
            self.built.after_step()  # LDoG's averager
            if self.sched is not None:
                self.sched.step()
        return float(loss.detach())

    def _record(self, window: List[float]) -> None:
        h = self.history
        with self.built.evaluating(self.top):  # Schedule-Free's eval(), LDoG's averaged weights
            acc, vloss = evaluate(self.top, self.val)
        ls = optimizers.line_search_stats(self.built.optimizer)  # forward and backward passes so far
        h.setdefault("forwards", []).append(ls.get("n_forwards", self.step))
        h.setdefault("backwards", []).append(ls.get("n_backwards", self.step))
        h["step"].append(self.step)
        h["epoch"].append(self.step / self.steps_per_epoch)
        h["wall_s"].append(self.wall)
        h["cpu_s"].append(self.cpu)
        h["train_loss"].append(sum(window) / len(window))
        h["val_acc"].append(acc)
        h["val_loss"].append(vloss)
        if self.progress:
            self.progress(self.step, self.total, {"acc": acc, "loss": h["train_loss"][-1]})

    def run(self) -> None:
        lengths = self.train.mask.sum(1)
        window: List[float] = []
        self.top.train()
        while self.step < self.total and not self.diverged:
            for idx in batches(lengths, self.cfg.batch_size, self.order_gen, self.cfg.length_group):
                x, m, y = self.train.batch(idx)
                t_wall, t_cpu = time.perf_counter(), time.process_time()
                lv = self._one_step(x, m, y)
                self.wall += time.perf_counter() - t_wall
                self.cpu += time.process_time() - t_cpu
                self.step += 1
                window.append(lv)
                self.diverged = not math.isfinite(lv)
                if self.step % self.eval_every == 0 or self.step == self.total or self.diverged:
                    self._record(window)
                    window = []
                if self.diverged or self.step >= self.total:
                    break
