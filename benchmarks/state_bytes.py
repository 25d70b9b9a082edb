"""The memory an optimizer keeps: bytes of every tensor reachable from it, counted from the live tensors.

svi-bench's "state B/p" column. The walk starts at the optimizer object and follows what its attributes
hold (``state``, ``param_groups``, dicts, lists, tuples, sets, other objects' attributes and slots, the
cells of stored closures, bound methods' owners), so a buffer kept outside ``opt.state`` (a line search's
start point ``w0``, its saved directions, a step-plan cache) is counted too. Each storage is counted
once, whole (two views of one buffer are one buffer; a view keeps its whole storage alive), and the
parameters' and their gradients' storages are left out: they are the model's, not the optimizer's.
"""
from __future__ import annotations

import types
from collections import abc, deque
from typing import Dict, Iterable, Optional, Set, Tuple

import torch

_SKIPPED = (type, types.ModuleType, types.BuiltinFunctionType, types.CodeType, types.FrameType, str, bytes,
            bytearray, int, float, complex, bool, type(None), torch.device, torch.dtype, torch.Size,
            torch.Generator)

StorageKey = Tuple[str, int]


def _tensor_parts(t: torch.Tensor):
    """The plain tensors holding ``t``'s data: ``t`` itself, or a wrapper subclass's inner tensors
    (a DTensor's local shard, through ``__tensor_flatten__``)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ctx = t.__tensor_flatten__()
        for name in names:
            yield from _tensor_parts(getattr(t, name))
        return
    if t.layout != torch.strided:
        raise TypeError(f"state_bytes: a {t.layout} tensor has no single storage to count; "
                        f"only strided tensors (and wrappers of them) are counted")
    yield t


def _storage(t: torch.Tensor) -> Optional[Tuple[StorageKey, int]]:
    """(device and address of ``t``'s storage, its bytes); None for tensors that hold no memory (meta)."""
    if t.device.type == "meta":
        return None
    s = t.untyped_storage()
    return (str(s.device), s.data_ptr()), s.nbytes()


def _storages(t: torch.Tensor) -> Iterable[Tuple[StorageKey, int]]:
    for part in _tensor_parts(t):
        found = _storage(part)
        if found is not None:
            yield found


def _children(obj) -> Iterable[object]:
    """What ``obj`` holds that the walk follows."""
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif isinstance(obj, types.MethodType):
        yield obj.__self__
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell
                pass
        yield from obj.__defaults__ or ()
    else:
        held = getattr(obj, "__dict__", None)
        if isinstance(held, dict):
            yield from held.values()
        for klass in type(obj).__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    yield getattr(obj, slot)
        if isinstance(obj, abc.Mapping):  # other containers (a Mapping without a dict base, a deque, ...)
            yield from obj.keys()
            yield from obj.values()
        elif isinstance(obj, (abc.Set, abc.Sequence, deque)):
            yield from obj


def state_bytes(obj, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages of every tensor reachable from ``obj``, leaving out the storages
    of ``exclude`` (and of tensors sharing them)."""
    left_out: Set[StorageKey] = {key for t in exclude for key, _n in _storages(t)}
    counted: Dict[StorageKey, int] = {}
    seen: Set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _SKIPPED):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            for key, nbytes in _storages(item):
                if key not in left_out:
                    counted[key] = nbytes
            continue  # a tensor's own attributes (.grad, hooks) are the model's
        if isinstance(item, torch.UntypedStorage):
            if item.device.type != "meta" and (str(item.device), item.data_ptr()) not in left_out:
                counted[(str(item.device), item.data_ptr())] = item.nbytes()
            continue
        stack.extend(_children(item))
    return sum(counted.values())


def optimizer_params(opt) -> list:
    """The parameters of a torch-style optimizer (its ``param_groups``)."""
    return [p for group in getattr(opt, "param_groups", ()) for p in group["params"]]


def state_bytes_per_param(opt, params: Optional[Iterable[torch.Tensor]] = None) -> float:
    """``state_bytes(opt)`` per parameter element, the parameters (``opt.param_groups``' by default)
    and their ``.grad`` left out."""
    params = optimizer_params(opt) if params is None else list(params)
    numel = sum(p.numel() for p in params)
    if numel == 0:
        raise ValueError("state_bytes_per_param: the parameters have no elements")
    grads = [p.grad for p in params if p.grad is not None]
    return state_bytes(opt, exclude=params + grads) / numel
