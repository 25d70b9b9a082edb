"""Parameter shapes the benchmark runs on (shapes only: no model weights are downloaded or built)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: List[Shape]
    description: str

    @property
    def numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes)


def _bert_shapes(**config_kwargs) -> List[Shape]:
    """Parameter shapes of a HF BertModel, built on the meta device so no memory is allocated."""
    from transformers import BertConfig, BertModel

    config = BertConfig(**config_kwargs)
    with torch.device("meta"):
        model = BertModel(config)
    return [tuple(p.shape) for p in model.parameters()]


def bert_base() -> Workload:
    shapes = _bert_shapes()
    return Workload("bert-base", shapes, "BertConfig() defaults: 12 layers, hidden 768")


def minilm() -> Workload:
    shapes = _bert_shapes(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return Workload("minilm", shapes, "MiniLM-L6 geometry: 6 layers, hidden 384, 12 heads, FFN 1536")


def many_small(count: int = 1000, size: int = 4096) -> Workload:
    return Workload("many-small", [(size,)] * count, f"{count} tensors of {size} elements")


def host_10k(count: int = 10_000, size: int = 64) -> Workload:
    """Host overhead: the bytes (18 MB of AdamW traffic) stream in under a millisecond, so a step's
    time is the per-tensor work around the kernels (Python, checks, launches)."""
    return Workload("host-10k", [(size,)] * count, f"{count:,} tensors of {size} elements (host overhead)")


def huge(numel: int = 1 << 24) -> Workload:
    return Workload("huge", [(numel,)], f"one tensor of {numel:,} elements")


def tiny() -> Workload:
    """A few mixed shapes (one zero-size) for smoke tests; not a performance workload."""
    shapes = [(64, 32), (32,), (0,), (128,), (16, 16, 4), (1000,), (7,), (33, 3)]
    return Workload("tiny", shapes, "8 small mixed tensors (tests only)")


WORKLOADS: Dict[str, Callable[[], Workload]] = {
    "minilm": minilm,
    "many-small": many_small,
    "huge": huge,
    "host-10k": host_10k,
    "bert-base": bert_base,
    "tiny": tiny,
}

# Chosen to finish in < 3 minutes on 2 CPU cores; bert-base (5x minilm) is opt-in.
DEFAULT_WORKLOADS = ("minilm", "many-small", "huge", "host-10k")
# Host-overhead workloads: the reference-style rows (seconds per step there) are not run on them.
HOST_WORKLOADS = ("host-10k",)


def get(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)}")
    return WORKLOADS[name]()


def make_tensors(workload: Workload, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Parameters (leaf nn.Parameters) and fixed gradients for ``workload``.

    Gradients are small (std 1e-3) so repeated steps keep the parameters in a sane range.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params, grads = [], []
    for shape in workload.shapes:
        p = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        g = torch.empty(shape, dtype=torch.float32).normal_(0.0, 1e-3, generator=gen)
        params.append(torch.nn.Parameter(p.to(device=device, dtype=dtype)))
        grads.append(g.to(device=device, dtype=dtype))
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads
