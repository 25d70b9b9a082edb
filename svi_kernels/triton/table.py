"""Device tables that let one launch cover a whole tensor list, cached across calls.

For lists ``L_0 .. L_{k-1}`` of n tensors (tensor i of every list has the same numel):

- the pointer table: int64 [n, k], row i = ``data_ptr()`` of tensor i in each list;
- the chunk table: int64 [n_chunks, 3], one row (tensor index, start, end) per program, so
  a 1-D grid covers every tensor whatever their sizes (no idle programs for small tensors, as a
  2-D (n_tensors, max_chunks) grid would have). Zero-size tensors have no rows.

Both are keyed on what they hold (the pointers; the numels and chunk size) and rebuilt only when
that changes, so a training loop copies nothing to the device after its first step. Pointers
are addresses, so a reused address with another tensor behind it is still correct.

A whole ``Group`` (its checks, sizes and both tables) is cached too, keyed on every tensor's
``data_ptr()`` and the sizes of the first list, read with C-level ``map`` calls: a call with the
same tensors costs a few passes of C calls and no Python per tensor. Gradients re-allocated
every step (``zero_grad(set_to_none=True)``) usually land at the same addresses (the allocator
reuses the blocks), so they hit; any other address is a miss and everything is checked and
rebuilt, so a hit never holds a stale pointer. A hit trusts that a tensor at a known address,
next to a param of the known size, has the dtype and layout found before: true of params and
optimizer state (same tensors) and of gradients, which torch keeps at their param's size, dtype
and device (and, from autograd, its strides).
"""
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import runtime
from ..backends.state_storage import DEFAULT_BLOCK_SIZE, INT8, SCALES_ARG, check_state_dtypes

CACHE_SIZE = 64  # entries per table kind; one optimizer uses a handful (ops x param groups)

# "pointer_builds", "chunk_builds", "group_builds" and the matching "*_hits"
stats: Counter = Counter()
_pointer_cache: "OrderedDict[tuple, Tuple[Tensor, bool]]" = OrderedDict()
_chunk_cache: "OrderedDict[tuple, Tensor]" = OrderedDict()
_group_cache: "OrderedDict[tuple, _Checked]" = OrderedDict()
_DATA_PTR, _NUMEL = Tensor.data_ptr, Tensor.numel


def clear_cache() -> None:
    _pointer_cache.clear()
    _chunk_cache.clear()
    _group_cache.clear()
    stats.clear()


def _cached(cache: OrderedDict, key: tuple, build, kind: str):
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        stats[kind + "_hits"] += 1
        return hit
    stats[kind + "_builds"] += 1
    value = build()
    cache[key] = value
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return value


def pointer_table(lists: Sequence[Sequence[Tensor]], device: torch.device) -> Tuple[Tensor, bool]:
    """(int64 [n, k] table of data_ptr()s, whether all are 16-byte aligned)."""
    return address_table(tuple(tuple([t.data_ptr() for t in lst]) for lst in lists), device)


def address_table(columns: Tuple[Tuple[int, ...], ...], device: torch.device) -> Tuple[Tensor, bool]:
    """pointer_table of addresses (one tuple per list)."""
    key = (device, columns)

    def build() -> Tuple[Tensor, bool]:
        table = torch.tensor(columns, dtype=torch.int64).t().contiguous().to(device)
        return table, all(p % 16 == 0 for col in columns for p in col)

    return _cached(_pointer_cache, key, build, "pointer")


def chunk_table(numels: Tuple[int, ...], chunk: int, device: torch.device) -> Tensor:
    key = (device, chunk, numels)

    def build() -> Tensor:
        sizes = torch.tensor(numels, dtype=torch.int64)
        per_tensor = (sizes + chunk - 1) // chunk
        tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
        first_row = torch.cumsum(per_tensor, 0) - per_tensor
        start = (torch.arange(tensor_idx.numel()) - first_row[tensor_idx]) * chunk
        end = torch.minimum(start + chunk, sizes[tensor_idx])
        return torch.stack([tensor_idx, start, end], dim=1).contiguous().to(device)

    return _cached(_chunk_cache, key, build, "chunk")


def _dense(t: Tensor) -> bool:
    """Elements fill their memory span exactly (any dim order), so a flat loop covers them."""
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class _Checked:
    """What a Group learned about lists at given addresses: sizes, dtype, device, tables."""
    __slots__ = ("n_tensors", "dtype", "state_dtype", "device", "numels", "n_elements", "largest", "pointers",
                 "chunks", "block_size")

    def __init__(self, group: "Group"):
        self.n_tensors, self.dtype, self.device = group.n_tensors, group.dtype, group.device
        self.state_dtype, self.block_size = group.state_dtype, group.block_size
        self.numels, self.n_elements, self.largest = group.numels, group.n_elements, group.largest
        self.pointers = None  # (table, aligned), built on first use
        self.chunks = {}  # chunk size -> chunk table


def _group_key(lists: Sequence[Sequence[Tensor]], state: Dict[int, str], scales: Dict[int, Sequence[Tensor]],
               block_size: int) -> tuple:
    """Every tensor's address (int8 state: its scales' too, and the block size), the first list's sizes and the
    dtypes of the first param and first state tensor, without a Python loop per tensor."""
    first = lists[0][0] if len(lists[0]) else None
    head = (first.dtype, first.device) if first is not None else None
    if state and first is not None:
        head += (lists[next(iter(state))][0].dtype,)
    key = (head, tuple(map(_NUMEL, lists[0])), tuple(tuple(map(_DATA_PTR, lst)) for lst in lists))
    if scales:
        key += (block_size,) + tuple((i, tuple(map(_DATA_PTR, s)), tuple(map(_NUMEL, s))) for i, s in scales.items())
    return key


class Group:
    """One fused call's tensor lists made launchable.

    Tensors whose memory is not one dense block with the same layout in every list go through
    contiguous staging copies (written back by ``finish``); ordinary parameters never do.
    Lists at the addresses of an earlier call reuse its checks and tables (see the module doc).

    ``state`` ({list index: name}, with ``op`` for the errors): the optimizer-state lists, which may
    have another dtype (``state_dtype``) than the others, as backends/state_storage.py allows, or hold int8
    codes (``state_dtype`` INT8) with their float32 ``scales`` ({list index: scale list}) over blocks of
    ``block_size`` elements.
    """

    def __init__(self, lists: Sequence[Sequence[Tensor]], written: Sequence[int], op: str = "",
                 state: Optional[Dict[int, str]] = None, scales: Optional[Dict[int, Sequence[Tensor]]] = None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        scales = {i: s for i, s in (scales or {}).items() if s is not None}
        for i, name in (state or {}).items():
            if i >= len(lists) and i in scales:
                raise ValueError(f"{op}: {SCALES_ARG[name]} given without {name}")
        state = {i: name for i, name in (state or {}).items() if i < len(lists)}  # AMSGrad's list is optional
        self.scales = scales
        key = _group_key(lists, state, scales, block_size)
        checked = _group_cache.get(key)
        if checked is not None:
            _group_cache.move_to_end(key)
            stats["group_hits"] += 1
            self._adopt(checked, lists)
            return
        stats["group_builds"] += 1
        self._check(lists, written, op, state, scales, block_size)
        if not self._staged:  # staged copies live for one call: nothing to reuse
            self._checked = _Checked(self)
            _group_cache[key] = self._checked
            if len(_group_cache) > CACHE_SIZE:
                _group_cache.popitem(last=False)

    def _adopt(self, checked: _Checked, lists: Sequence[Sequence[Tensor]]) -> None:
        self._checked = checked
        self.n_tensors, self.dtype, self.device = checked.n_tensors, checked.dtype, checked.device
        self.state_dtype, self.block_size = checked.state_dtype, checked.block_size
        self.numels, self.n_elements, self.largest = checked.numels, checked.n_elements, checked.largest
        self.lists = lists
        self._writeback = []

    def _check(self, lists: Sequence[Sequence[Tensor]], written: Sequence[int], op: str,
               state: Dict[int, str], scales: Dict[int, Sequence[Tensor]], block_size: int) -> None:
        self._checked = None
        self._staged = False
        self.n_tensors = len(lists[0])
        for i, lst in enumerate(lists):
            if len(lst) != self.n_tensors:
                raise ValueError(f"tensor list {i} has {len(lst)} tensors, expected {self.n_tensors}")
        first = lists[0][0] if self.n_tensors else None
        self.dtype = first.dtype if first is not None else torch.float32
        self.device = first.device if first is not None else torch.device("cpu")
        self.state_dtype = check_state_dtypes(op, lists[0], {name: lists[i] for i, name in state.items()},
                                              {name: scales.get(i) for i, name in state.items()}, block_size)
        self.state_dtype = self.state_dtype or self.dtype
        self.block_size = block_size
        self._writeback: List[Tuple[Tensor, Tensor]] = []
        lists = [list(lst) for lst in lists]
        # Whole-list comprehensions rather than a loop per tensor: this runs on every call, and
        # per-tensor Python was most of the host time of a step over a few hundred tensors.
        numels = [t.numel() for t in lists[0]]
        kinds = {(t.dtype, t.device) for i, lst in enumerate(lists) if i not in state for t in lst}
        kinds |= {(self.dtype, t.device) for i, lst in enumerate(lists) if i in state for t in lst}
        if len(kinds) > 1:
            dt, dev = next(iter(kinds - {(self.dtype, self.device)}))
            raise TypeError("a fused Triton call takes tensors of one dtype and one device, got "
                            f"{dt}/{dev} next to {self.dtype}/{self.device}")
        for lst in lists[1:]:
            other = [t.numel() for t in lst]
            if other != numels:
                i = next(i for i, (a, b) in enumerate(zip(numels, other)) if a != b)
                raise ValueError(f"tensor {i}: numel {other[i]} differs from {numels[i]} in another list")
        if not all(t.is_contiguous() for lst in lists for t in lst):
            self._stage_strided(lists, written)
        self.lists = lists
        self.numels = tuple(numels)
        self.n_elements = sum(numels)
        self.largest = max(numels, default=1)

    def _stage_strided(self, lists: List[List[Tensor]], written: Sequence[int]) -> None:
        """Contiguous copies for the tensors whose columns are not one dense block with one layout."""
        for i in range(self.n_tensors):
            column = [lst[i] for lst in lists]
            p = column[0]
            if all(t.is_contiguous() for t in column) or (
                    all(_dense(t) for t in column) and all(t.stride() == p.stride() for t in column)):
                continue
            for li, t in enumerate(column):
                staged = t.contiguous()
                lists[li][i] = staged
                self._staged = self._staged or staged is not t
                if li in written and staged is not t:
                    self._writeback.append((t, staged))

    def tables(self, chunk: int) -> Tuple[Tensor, Tensor, bool]:
        """(pointer table, chunk table, every pointer 16-byte aligned) on the group's device."""
        checked = self._checked
        if checked is None:  # staged copies: this call's own addresses
            ptrs, aligned = pointer_table(self.lists, self.device)
            return ptrs, chunk_table(self.numels, chunk, self.device), aligned
        if checked.pointers is None:
            checked.pointers = pointer_table(self.lists, self.device)
        if chunk not in checked.chunks:
            checked.chunks[chunk] = chunk_table(self.numels, chunk, self.device)
        ptrs, aligned = checked.pointers
        return ptrs, checked.chunks[chunk], aligned

    def block_shape(self) -> Tuple[int, int]:
        """(BLOCK, CHUNK); int8 state: a tile holds whole quantisation blocks (chunks start at tile multiples)."""
        block, chunk = runtime.block_shape(self.largest)
        if self.state_dtype == INT8:
            block = max(block, self.block_size)
            chunk = max(chunk, block)
        return block, chunk

    def scale_table(self, placeholder: Tensor) -> Tensor:
        """int8 state: int64 [n, lists] addresses of each state list's scales (0 in the other columns), else
        ``placeholder`` (never read)."""
        if self.state_dtype != INT8:
            return placeholder
        zeros = (0,) * self.n_tensors
        columns = tuple(tuple(map(_DATA_PTR, self.scales[i])) if i in self.scales else zeros
                        for i in range(len(self.lists)))
        return address_table(columns, self.device)[0]

    def finish(self) -> None:
        for original, staged in self._writeback:
            original.copy_(staged)
