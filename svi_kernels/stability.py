"""Fine-tuning stabilizers of Fu, So & Collier, "A Stability Analysis of Fine-Tuning a Pre-Trained
Model" (arXiv 2301.09820): MMR, MHLoss and SURT, each added to a HF encoder in a few lines.

    import svi_kernels.stability as st
    # MMR: a loss term on the pooled features that pushes the classes apart
    mmr = st.MaxMarginRegularizer(weight=0.1)
    out = model.bert(input_ids, attention_mask=mask)
    logits = model.classifier(model.dropout(out.pooler_output))
    loss = F.cross_entropy(logits, labels) + mmr(out.pooler_output, labels)
    # MHLoss: several linear heads on the same features; prediction = their averaged logits
    model.classifier = st.MultiHeadClassifier.like(model.classifier, num_heads=5)
    logits = model(input_ids, attention_mask=mask).logits      # averaged logits: predict with these
    loss = model.classifier.loss(labels)                       # MHLoss over the heads of that forward
    # SURT: masked-LM re-training on the task's own (unlabelled) texts, before fine-tuning
    report = st.surt(model, tokenizer, train_texts, steps=100, lr=5e-5, mlm_probability=0.15)

What is known and what is our reading. The paper's text was not available to us (2026-12): public
sources (the arXiv abstract and third-party summaries) give only what each method does --
MMR "maximises the distance between the encoded features of different classes" (a larger margin
tightens their head-tuning stability bound), MHLoss "uses several linear heads at once" (faster head
convergence), SURT "re-trains the model with masked language modelling on the target data" (a
smaller distance between initial and fine-tuned weights). The formulas below are the natural
reading of those sentences, and every choice that the paper may fix differently is an argument:

- MMR = ``-weight * mean over class pairs (a < b) of d(mu_a, mu_b)``, mu_c the batch mean of the
  (optionally L2-normalised) features of class c; d is euclidean, squared euclidean or cosine
  distance. Classes absent from the batch are skipped; with fewer than two classes the term is 0.
- MHLoss = mean (or sum) over H heads of the cross-entropy of each head's logits; the prediction is
  the mean of the heads' logits. One head is plain cross-entropy.
- SURT = ``steps`` AdamW steps of HF's masked-LM loss (``DataCollatorForLanguageModeling``) on
  ``texts``, updating the encoder parameters you allow (default: all of the encoder) and the MLM
  head, never the classification head. A checkpoint without an MLM head gets a freshly initialised
  one; ``surt`` then warns and says so in its report, and by default trains that head alone for
  ``head_only_steps`` first so that a random head does not send random gradients into the encoder.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaxMarginRegularizer", "max_margin_loss", "MultiHeadClassifier", "multi_head_loss", "surt",
           "SurtReport"]

DISTANCES = ("euclidean", "squared", "cosine")
NORMALISATIONS = ("none", "l2")
REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------------------------ MMR
def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1)
    sq = (a - b).pow(2).sum(-1)
    # sqrt has an infinite derivative at 0 (two equal class means): clamp so the gradient stays finite
    return sq if distance == "squared" else sq.clamp_min(1e-12).sqrt()


def max_margin_loss(features: torch.Tensor, labels: torch.Tensor, *, weight: float = 1.0,
                    distance: str = "euclidean", normalize: str = "l2") -> torch.Tensor:
    """MMR term to *add* to the task loss: ``-weight * mean_{a<b} d(mu_a, mu_b)`` (see the module doc).

    ``features``: [B, H] pooled features (e.g. BERT's ``pooler_output``); ``labels``: [B] class ids.
    ``normalize="l2"`` divides each feature row by its norm first, which bounds the term
    (euclidean <= 2, squared <= 4, cosine <= 2) so that it cannot win by inflating the features;
    ``"none"`` uses the raw features.
    """
    _check_choice("distance", distance, DISTANCES)
    _check_choice("normalize", normalize, NORMALISATIONS)
    if features.dim() != 2 or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"features must be [B, H] and labels [B]; got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    x = F.normalize(features, dim=-1) if normalize == "l2" else features
    classes = torch.unique(labels)
    if classes.numel() < 2:
        return features.sum() * 0.0  # keeps the graph (and the dtype/device) of a real term
    means = [x[labels == c].mean(0) for c in classes]
    dists = [_distance(means[i], means[j], distance) for i, j in itertools.combinations(range(len(means)), 2)]
    return -weight * torch.stack(dists).mean()


class MaxMarginRegularizer(nn.Module):
    """Module form of :func:`max_margin_loss`: ``loss = task_loss + mmr(pooled, labels)``."""

    def __init__(self, weight: float = 0.1, distance: str = "euclidean", normalize: str = "l2"):
        super().__init__()
        _check_choice("distance", distance, DISTANCES)
        _check_choice("normalize", normalize, NORMALISATIONS)
        if not weight >= 0.0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight, self.distance, self.normalize = float(weight), distance, normalize

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return max_margin_loss(features, labels, weight=self.weight, distance=self.distance,
                               normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, distance={self.distance}, normalize={self.normalize}"


# --------------------------------------------------------------------------------------------- MHLoss
def multi_head_loss(head_logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MHLoss: cross-entropy of each head's logits ([H, B, C]), reduced over heads by mean or sum."""
    _check_choice("reduction", reduction, REDUCTIONS)
    if head_logits.dim() != 3:
        raise ValueError(f"head_logits must be [heads, batch, classes], got {tuple(head_logits.shape)}")
    H, B, C = head_logits.shape
    per_head = F.cross_entropy(head_logits.reshape(H * B, C), labels.repeat(H), reduction="none").view(H, B).mean(1)
    return per_head.mean() if reduction == "mean" else per_head.sum()


class MultiHeadClassifier(nn.Module):
    """H linear heads on the same features; ``forward`` returns their averaged logits [B, C].

    Drop-in for ``BertForSequenceClassification.classifier`` (``MultiHeadClassifier.like(...)``):
    the model's ``.logits`` are then the averaged logits (use them to predict). Train with
    :meth:`loss`, the MHLoss of the heads of the latest forward (HF's built-in ``labels=`` loss would
    be the cross-entropy of the *averaged* logits, which is a different objective).
    Each head is initialised like HF's classifier: weights N(0, init_std), bias 0.
    """

    def __init__(self, in_features: int, num_labels: int, num_heads: int = 5, reduction: str = "mean",
                 init_std: float = 0.02, generator: Optional[torch.Generator] = None):
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads, self.num_labels, self.reduction = num_heads, num_labels, reduction
        self.weight = nn.Parameter(torch.randn(num_heads, num_labels, in_features, generator=generator) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_heads, num_labels))
        self.last_head_logits: Optional[torch.Tensor] = None

    @classmethod
    def like(cls, linear: nn.Linear, num_heads: int = 5, reduction: str = "mean", init_std: float = 0.02,
             generator: Optional[torch.Generator] = None) -> "MultiHeadClassifier":
        """A multi-head classifier with ``linear``'s shape, dtype and device (fresh heads)."""
        head = cls(linear.in_features, linear.out_features, num_heads, reduction, init_std, generator)
        return head.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [H, ..., num_labels]."""
        out = torch.einsum("...i,hoi->h...o", features, self.weight)
        return out + self.bias.view(self.num_heads, *([1] * (features.dim() - 1)), self.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.head_logits(features)
        self.last_head_logits = logits
        return logits.mean(0)

    def loss(self, labels: torch.Tensor, head_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MHLoss of ``head_logits`` (default: those of the latest forward)."""
        logits = self.last_head_logits if head_logits is None else head_logits
        if logits is None:
            raise RuntimeError("MultiHeadClassifier.loss: no forward has run yet")
        return multi_head_loss(logits.reshape(self.num_heads, -1, self.num_labels), labels.reshape(-1),
                               self.reduction)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[-1]}, num_labels={self.num_labels}, "
                f"num_heads={self.num_heads}, reduction={self.reduction}")


# ----------------------------------------------------------------------------------------------- SURT
@dataclass
class SurtReport:
    steps: int
    head_only_steps: int
    mlm_head_initialised: bool          # True: the checkpoint had no MLM head, a fresh one was trained
    losses: List[float] = field(default_factory=list)  # MLM loss per step (head-only steps first)
    n_trained_encoder_params: int = 0
    notes: List[str] = field(default_factory=list)


def _mlm_model(model: nn.Module, checkpoint: Optional[str]):
    """A HF *ForMaskedLM sharing ``model``'s encoder; returns (mlm_model, head_was_initialised)."""
    from transformers import AutoModelForMaskedLM

    encoder = model.base_model
    prefix = model.base_model_prefix
    missing: List[str] = []
    if checkpoint is not None:
        mlm, info = AutoModelForMaskedLM.from_pretrained(checkpoint, output_loading_info=True)
        missing = [k for k in info["missing_keys"] if not k.startswith(prefix + ".")]
        initialised = bool(missing)
    else:
        mlm = AutoModelForMaskedLM.from_config(model.config)
        initialised = True
    setattr(mlm, prefix, encoder)  # one encoder: SURT's updates land in the classification model
    out_emb = mlm.get_output_embeddings()
    if out_emb is not None and getattr(model.config, "tie_word_embeddings", True):
        out_emb.weight = encoder.get_input_embeddings().weight
    return mlm.to(next(model.parameters()).device), initialised


def surt(model: nn.Module, tokenizer, texts: Sequence[str], *, steps: int = 100, lr: float = 5e-5,
         mlm_probability: float = 0.15, batch_size: int = 16, max_length: int = 128, seed: int = 0,
         weight_decay: float = 0.0, parameters: Optional[Iterable[nn.Parameter]] = None,
         checkpoint: Optional[str] = None, head_only_steps: Optional[int] = None) -> SurtReport:
    """Self Unsupervised Re-Training: masked-LM training of ``model``'s encoder on ``texts``, in place.

    ``model``: a HF model with a base encoder (e.g. ``BertForSequenceClassification``); only its
    encoder (``model.base_model``) and an MLM head are trained -- the classification head is untouched.
    ``parameters``: the encoder parameters SURT may update (default: all of them); the rest stay
    fixed. ``checkpoint``: a dir/name to load the MLM head from; without one, or when the checkpoint
    has none, the head is initialised fresh (``report.mlm_head_initialised``; a warning says so).
    ``head_only_steps``: steps that train the MLM head alone before the ``steps`` joint steps
    (default: ``steps // 2`` for a fresh head, 0 for a loaded one).
    Deterministic per ``seed`` (masking, dropout, batch order); the global RNG state is restored.
    """
    if not texts:
        raise ValueError("surt needs at least one text")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if steps < 0 or (head_only_steps is not None and head_only_steps < 0):
        raise ValueError("steps and head_only_steps must be >= 0")
    if getattr(tokenizer, "mask_token", None) is None:
        raise ValueError("surt needs a tokenizer with a mask token (a masked-LM vocabulary)")
    encoder = model.base_model
    enc_ids = {id(p) for p in encoder.parameters()}
    allowed = list(encoder.parameters()) if parameters is None else list(parameters)
    if any(id(p) not in enc_ids for p in allowed):
        raise ValueError("surt: `parameters` must belong to model.base_model (the encoder)")
    device = next(model.parameters()).device
    # everything random (the fresh head's init, masking, dropout, order) is drawn from ``seed`` and the
    # caller's global RNG state is restored afterwards
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        return _surt(model, tokenizer, texts, encoder, allowed, steps, lr, mlm_probability, batch_size,
                     max_length, seed, weight_decay, checkpoint, head_only_steps, device)


def _surt(model, tokenizer, texts, encoder, allowed, steps, lr, mlm_probability, batch_size, max_length, seed,
          weight_decay, checkpoint, head_only_steps, device) -> SurtReport:
    from transformers import DataCollatorForLanguageModeling

    enc_ids = {id(p) for p in encoder.parameters()}
    mlm, fresh = _mlm_model(model, checkpoint)
    if head_only_steps is None:
        head_only_steps = steps // 2 if fresh else 0
    notes = []
    if fresh:
        msg = (f"surt: the checkpoint has no masked-LM head; a fresh one (HF's init) is trained on the task "
               f"texts, alone for {head_only_steps} steps, then with the encoder for {steps}")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    head_params = [p for n, p in mlm.named_parameters()
                   if not n.startswith(model.base_model_prefix + ".") and id(p) not in enc_ids]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    report = SurtReport(steps, head_only_steps, fresh, notes=notes,
                        n_trained_encoder_params=sum(p.numel() for p in allowed))

    saved_flags = {id(p): p.requires_grad for p in mlm.parameters()}
    was_training = model.training
    order_gen = torch.Generator().manual_seed(seed)
    try:
        mlm.train()
        for n_steps, trained in ((head_only_steps, head_params), (steps, head_params + allowed)):
            if n_steps == 0:
                continue
            ids = {id(p) for p in trained}
            for p in mlm.parameters():
                p.requires_grad_(id(p) in ids)
            opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
            for batch_texts in _batches(texts, batch_size, n_steps, order_gen):
                enc = tokenizer(list(batch_texts), truncation=True, max_length=max_length)
                batch = collator([{"input_ids": r} for r in enc["input_ids"]])
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = _mlm_loss(mlm, model.base_model_prefix, batch)
                if loss is None:  # nothing was masked in this batch
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                report.losses.append(float(loss.detach()))
    finally:
        for p in mlm.parameters():
            p.requires_grad_(saved_flags[id(p)])
        model.train(was_training)
    return report


def _mlm_loss(mlm: nn.Module, prefix: str, batch: dict) -> Optional[torch.Tensor]:
    """HF's masked-LM loss, with the vocabulary projection run on the masked positions only.

    HF's forward projects every position onto the vocabulary (30k columns) and then ignores the
    unmasked ~85%; the head is per-position, so projecting the masked rows alone gives the same loss
    at a fraction of the cost. Heads under another attribute name than ``cls`` / ``lm_head`` take
    HF's own forward.
    """
    head = getattr(mlm, "cls", None) or getattr(mlm, "lm_head", None)
    labels = batch["labels"]
    picked = labels != -100
    if not bool(picked.any()):
        return None
    if head is None:
        return mlm(**batch).loss
    hidden = getattr(mlm, prefix)(**{k: v for k, v in batch.items() if k != "labels"})[0]
    return F.cross_entropy(head(hidden[picked]), labels[picked])


def _batches(texts: Sequence[str], batch_size: int, n_steps: int, gen: torch.Generator):
    """``n_steps`` batches of ``texts``: reshuffled epochs, the last batch of an epoch may be short."""
    done = 0
    while done < n_steps:
        for idx in torch.randperm(len(texts), generator=gen).split(batch_size):
            yield [texts[i] for i in idx]
            done += 1
            if done == n_steps:
                return


def mlm_steps_for_epochs(n_texts: int, batch_size: int, epochs: float) -> int:
    """Steps of :func:`surt` that make ``epochs`` passes over ``n_texts`` texts."""
    return max(1, int(math.ceil(epochs * n_texts / batch_size)))
