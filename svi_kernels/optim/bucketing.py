"""Fused launches: tensors bucketed by (device, dtype), and the backend that serves each bucket."""
from __future__ import annotations

from typing import Dict, Hashable, List, Sequence, Tuple

import torch
from torch import Tensor

import importlib

# The subpackage, not the ``svi_kernels.backends()`` function that shadows it as a package attribute.
_backends = importlib.import_module("svi_kernels.backends")

from . import sharding  # noqa: E402


def group_by(tensor_lists: Sequence[Sequence[Tensor]], extra_keys: Sequence[Hashable] | None = None
             ) -> Dict[tuple, Tuple[List[List[Tensor]], List[int]]]:
    """Bucket parallel tensor lists by (device, dtype[, extra key]); one fused launch per bucket.

    Returns {key: (lists, indices)}, where ``indices`` are the positions in the input lists.
    FSDP2's DTensors come out as their local shards (the kernels are elementwise; see sharding.py).
    """
    if sharding.any_sharded(tensor_lists[0]):
        tensor_lists = sharding.local_lists(tensor_lists)
    first = tensor_lists[0]
    keys = [(p.device, p.dtype) for p in first]
    if extra_keys is not None:
        keys = [k + (e,) for k, e in zip(keys, extra_keys)]
    if keys and keys.count(keys[0]) == len(keys):  # the common case: one bucket, no copying
        return {keys[0]: ([list(tl) for tl in tensor_lists], list(range(len(first))))}
    buckets: Dict[tuple, Tuple[List[List[Tensor]], List[int]]] = {}
    for i, key in enumerate(keys):
        if key not in buckets:
            buckets[key] = ([[] for _ in tensor_lists], [])
        lists, idx = buckets[key]
        for li, tl in enumerate(tensor_lists):
            lists[li].append(tl[i])
        idx.append(i)
    return buckets


def needs_contiguous(backend: str, tensors: Sequence[Tensor]) -> bool:
    """The compiled and Triton kernels walk flat memory; strided tensors go to the reference path."""
    return backend != "reference" and not all(t.is_contiguous() for t in tensors)


def backend_for(name, device: torch.device, lists: Sequence[Sequence[Tensor]], n_check: int = 2):
    """Resolve the backend module for one fused bucket (reference for non-contiguous tensors).

    Only the first ``n_check`` lists (params, grads) are checked: the state is created with
    ``zeros_like(p)`` and so shares the parameter's layout.
    """
    chosen = _backends.resolve(name, device)
    if any(needs_contiguous(chosen, tl) for tl in lists[:n_check]):
        chosen = "reference"
    return _backends.get(chosen)
