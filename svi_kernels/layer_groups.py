"""PLASLS parameter groups of any model with repeated blocks (Kenneweg et al. 2023).

The blocks: every ``nn.ModuleList`` / ``nn.Sequential`` whose children are all of one class and hold
parameters, not nested inside another such list (a "stack"). When the model names its block classes in
``_no_split_modules`` (Hugging Face models do), only the stacks of those classes count; otherwise every
stack of two or more blocks, or, failing that, of one block (ALBERT's shared layer group). An
encoder-decoder has two stacks.

Groups, in depth (registration) order: the parameters registered before the first stack (embeddings);
each stack split into consecutive runs of blocks; the parameters registered between two stacks; those
after the last stack (final norm, pooler, head). For BERT-base (12 layers) and ``n_groups=10`` this gives
the authors' split: embeddings, layers [0,1], [2], [3,4], [5], [6,7], [8], [9,10], [11], head.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from torch import nn


def _stack_candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        kids = list(m.children())
        if len({type(k) for k in kids}) == 1 and all(any(True for _ in k.parameters()) for k in kids):
            if not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
                found.append((name, m))
    return found


def find_stacks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The stacks of repeated blocks, in registration order (see the module docstring)."""
    cands = _stack_candidates(model)
    declared = set(getattr(model, "_no_split_modules", None) or ())
    if declared:
        named = [(n, s) for n, s in cands if type(next(iter(s.children()))).__name__ in declared]
        if named:
            return named
    return [(n, s) for n, s in cands if len(s) >= 2] or cands


def _split(n_blocks: List[int], budget: int) -> List[int]:
    """Runs per stack: at least one each, at most one per block, the rest to the stack with most blocks per run."""
    k = [1] * len(n_blocks)
    for _ in range(budget - len(n_blocks)):
        open_ = [i for i in range(len(k)) if k[i] < n_blocks[i]]
        if not open_:
            break
        i = max(open_, key=lambda j: n_blocks[j] / k[j])
        k[i] += 1
    return k


def _common_prefix(names: List[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def layer_groups(model: nn.Module, n_groups: int = 10, trainable_only: bool = True) -> List[dict]:
    """Param groups ``[{"params": [...], "name": ...}, ...]`` for ``LayerwiseAdamSLS``, in depth order.

    Every parameter is in exactly one group (tied weights once, in the group of their first registration).
    ``n_groups`` counts all groups; the blocks get what the fixed groups (before / between / after the
    stacks) leave, at least one run per stack. Below that count (BART has 5: embeddings, encoder, between,
    decoder, head), neighbouring groups are merged, the smallest pair first, until ``n_groups`` are left.
    Fewer groups come back when the model has fewer blocks, or when groups are empty (``trainable_only``
    drops frozen parameters after the split). Raises ``ValueError`` when the model has no repeated blocks.
    """
    stacks = find_stacks(model)
    if not stacks:
        raise ValueError(f"layer_groups: {type(model).__name__} has no repeated blocks (no ModuleList or Sequential "
                         "of same-class modules with parameters); pass your own param groups "
                         "(a list of {'params': [...]}) to LayerwiseAdamSLS instead")
    where: Dict[str, Tuple[int, int]] = {}  # prefix "stack.i." -> (stack index, block index)
    for s, (name, stack) in enumerate(stacks):
        for i, key in enumerate(stack._modules):
            where[f"{name}.{key}." if name else f"{key}."] = (s, i)

    def block_of(pname: str) -> Optional[Tuple[int, int]]:
        for prefix, sb in where.items():
            if pname.startswith(prefix):
                return sb
        return None

    loose: List[List[Tuple[str, nn.Parameter]]] = [[] for _ in range(len(stacks) + 1)]  # before, between..., after
    blocks: List[List[List[nn.Parameter]]] = [[[] for _ in s] for _, s in stacks]
    seen_stack = -1
    for pname, p in model.named_parameters():  # deduplicated: tied weights once
        sb = block_of(pname)
        if sb is None:
            loose[seen_stack + 1].append((pname, p))
        else:
            seen_stack = max(seen_stack, sb[0])
            blocks[sb[0]][sb[1]].append(p)
    if n_groups < 1:
        raise ValueError(f"layer_groups: n_groups must be at least 1, got {n_groups}")
    n_fixed = sum(1 for ps in loose if ps)
    runs = _split([len(s) for _, s in stacks], n_groups - n_fixed)  # one run per stack at least

    named: List[Tuple[str, List[nn.Parameter]]] = []

    if loose[0]:
        named.append((_common_prefix([n for n, _ in loose[0]]) or "embeddings", [p for _, p in loose[0]]))
    for s, (sname, stack) in enumerate(stacks):
        n = len(stack)
        bounds = [math.ceil(j * n / runs[s]) for j in range(runs[s] + 1)]
        label = "layers" if len(stacks) == 1 else sname
        for j in range(runs[s]):
            idx = range(bounds[j], bounds[j + 1])
            named.append((f"{label} {idx[0]}-{idx[-1]}", [p for i in idx for p in blocks[s][i]]))
        if s + 1 < len(stacks) and loose[s + 1]:
            named.append((f"between {sname} and {stacks[s + 1][0]}", [p for _, p in loose[s + 1]]))
    if loose[-1]:
        named.append(("head", [p for _, p in loose[-1]]))
    if trainable_only:
        named = [(name, [p for p in params if p.requires_grad]) for name, params in named]
    named = _merge_neighbours([(name, params) for name, params in named if params], n_groups)
    return [{"params": params, "name": name} for name, params in named]


def _merge_neighbours(named: List[Tuple[str, List[nn.Parameter]]], n_groups: int) -> List[Tuple[str, List[nn.Parameter]]]:
    """Fewer groups than the structure gives (one per stack and one per run of parameters outside them):
    the two neighbours with the fewest elements together become one, until ``n_groups`` are left. Depth
    order stays: the embeddings are in the first group, the head in the last."""
    named = list(named)
    while len(named) > n_groups:
        sizes = [sum(p.numel() for p in params) for _, params in named]
        i = min(range(len(named) - 1), key=lambda j: sizes[j] + sizes[j + 1])
        (a, pa), (b, pb) = named[i], named[i + 1]
        named[i:i + 2] = [(f"{a} + {b}", pa + pb)]
    return named
