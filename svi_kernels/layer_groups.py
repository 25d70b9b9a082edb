"""PLASLS parameter grouping of a Hugging Face BERT-style encoder (Kenneweg et al. 2023).

Groups: the embeddings; the encoder layers split into ``n_groups - 2`` consecutive blocks; the
head (everything else: pooler and classifier). For BERT-base (12 layers) and ``n_groups=10`` this
gives the authors' split: layers [0,1], [2], [3,4], [5], [6,7], [8], [9,10], [11]. Unlike the
authors' model, HF's ``BertForSequenceClassification`` uses its pooler, so the pooler is trained and
grouped with the classifier.
"""
from __future__ import annotations

import math
from typing import List

from torch import nn


def _find_encoder_layers(model: nn.Module):
    for name, module in model.named_modules():
        if name.endswith("encoder.layer") and isinstance(module, nn.ModuleList):
            return name, module
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
            return name, module
    raise ValueError("layer_groups: no `encoder.layer` ModuleList found; pass your own param groups "
                     "(a list of {'params': [...]}) to LayerwiseAdamSLS instead")


def _find_embeddings(model: nn.Module):
    for name, module in model.named_modules():
        if name.split(".")[-1] == "embeddings":
            return name, module
    raise ValueError("layer_groups: no `embeddings` module found; pass your own param groups instead")


def layer_groups(model: nn.Module, n_groups: int = 10, trainable_only: bool = True) -> List[dict]:
    """Param groups ``[{"params": [...], "name": ...}, ...]`` for ``LayerwiseAdamSLS``.

    Empty groups are dropped (e.g. when the model has fewer layers than ``n_groups - 2``), so the result
    may have fewer than ``n_groups`` groups.
    """
    if n_groups < 3:
        raise ValueError(f"n_groups must be >= 3 (embeddings, >= 1 layer block, head), got {n_groups}")
    emb_name, emb = _find_embeddings(model)
    _, layers = _find_encoder_layers(model)
    n_layers = len(layers)
    k = min(n_groups - 2, n_layers)
    bounds = [math.ceil(j * n_layers / k) for j in range(k + 1)]
    named = []
    named.append((emb_name, list(emb.parameters())))
    for j in range(k):
        idx = list(range(bounds[j], bounds[j + 1]))
        params = [p for i in idx for p in layers[i].parameters()]
        named.append((f"layers {idx[0]}-{idx[-1]}" if idx else "layers (none)", params))
    seen = {id(p) for _, ps in named for p in ps}
    head = [p for p in model.parameters() if id(p) not in seen]
    named.append(("head", head))
    groups = []
    for name, params in named:
        if trainable_only:
            params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "name": name})
    return groups
