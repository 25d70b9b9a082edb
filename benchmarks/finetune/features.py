"""Frozen-part caching: run the frozen bottom of the model once per dataset and keep its outputs.

With the top k encoder layers trained, everything below them (embeddings + layers 0..L-k-1) is a
fixed function of the input, so its output is computed once (eval mode: no dropout in the frozen
part) and reused by every seed, learning rate and optimizer. A step then costs only the k trained
layers, the pooler and the classifier, which is what makes multi-seed runs affordable on 2 cores.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .model import Backbone, n_layers


@dataclass
class Features:
    x: torch.Tensor        # [N, H] ([CLS] of last layer), [N, T, H] (hidden states) or [N, T] (token ids)
    mask: torch.Tensor     # [N, T] attention mask (1 = token)
    labels: torch.Tensor   # [N]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to the longest sequence among them (exact: padding is masked)."""
        mask = self.mask[idx]
        x = self.x[idx]
        if x.dim() == 3 or x.dtype == torch.long:  # per-token inputs ([CLS]-only rows have no T axis)
            width = int(mask.sum(1).max())
            x, mask = x[:, :width], mask[:, :width]
        return x, mask, self.labels[idx]


_MEMORY: Dict[tuple, Features] = {}


@torch.no_grad()
def _hidden_states(backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor, wanted: List[int],
                   batch_size: int) -> Dict[int, torch.Tensor]:
    """hidden_states[j] (input of layer j; j = L is the last layer's output) for j in ``wanted``."""
    model = backbone.model.eval()
    N, T = ids.shape
    H = model.config.hidden_size
    out = {j: torch.zeros(N, T, H) for j in wanted}
    order = torch.argsort(mask.sum(1), descending=True)  # length-sorted batches: little padding
    for start in range(0, N, batch_size):
        rows = order[start:start + batch_size]
        width = int(mask[rows].sum(1).max())
        hs = model.bert(input_ids=ids[rows, :width], attention_mask=mask[rows, :width],
                        output_hidden_states=True).hidden_states
        for j in wanted:
            out[j][rows, :width] = hs[j]
    return out


def frozen_features(backbone: Backbone, dataset_key: str, texts: List[str], labels: List[int],
                    top_layers: int, max_len: int = 64, batch_size: int = 64,
                    also: Iterable[int] = (), cache_dir: Optional[str] = None) -> Features:
    """Inputs of the trainable top for ``top_layers`` (see ``TrainableTop``), cached in memory.

    ``also``: other ``top_layers`` values to compute in the same frozen pass (one pass serves all).
    ``cache_dir``: also keep them on disk (``<cache_dir>/features/``), for later processes.
    """
    key = (backbone.name, dataset_key, max_len)
    if (*key, top_layers) in _MEMORY:
        return _MEMORY[(*key, top_layers)]
    y = torch.tensor(labels, dtype=torch.long)
    ks = []
    for k in dict.fromkeys([top_layers, *also]):
        disk = _disk_path(backbone, texts, max_len, k, cache_dir)
        if (*key, k) in _MEMORY:
            continue
        if disk and os.path.exists(disk):
            saved = torch.load(disk)
            _MEMORY[(*key, k)] = Features(saved["x"], saved["mask"], y)
        else:
            ks.append(k)
    if not ks:
        return _MEMORY[(*key, top_layers)]
    ids, mask = backbone.tokenize(texts, max_len)
    L = n_layers(backbone.model)
    for k in ks:
        if not (k == -1 or 0 <= k <= L):
            raise ValueError(f"top_layers must be in 0..{L} or -1 (full), got {k}")
    layer_in = {k: (L - k if k > 0 else L) for k in ks if k >= 0}
    hidden = _hidden_states(backbone, ids, mask, sorted(set(layer_in.values())), batch_size) if layer_in else {}
    for k in ks:
        if k < 0:
            x = ids
        elif k == 0:
            x = hidden[L][:, 0].contiguous()
        else:
            x = hidden[layer_in[k]]
        _MEMORY[(*key, k)] = Features(x, mask, y)
        path = _disk_path(backbone, texts, max_len, k, cache_dir)
        if path and k >= 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"x": x, "mask": mask}, path + ".tmp")
            os.replace(path + ".tmp", path)
    return _MEMORY[(*key, top_layers)]


def _disk_path(backbone: Backbone, texts: List[str], max_len: int, top_layers: int,
               cache_dir: Optional[str]) -> Optional[str]:
    """On-disk cache file (shared by processes of a study), or None for models without a stable id."""
    if not cache_dir or not backbone.cache_id:
        return None
    h = hashlib.sha1(f"{backbone.cache_id}|{max_len}|{top_layers}|".encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    return os.path.join(cache_dir, "features", h.hexdigest()[:20] + ".pt")


def clear_cache() -> None:
    _MEMORY.clear()
