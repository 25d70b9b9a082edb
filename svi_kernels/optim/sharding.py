"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the optimizers on DTensor parameters.

Every rank owns a shard of each parameter, its gradient and its optimizer state. The fused kernels
are elementwise, so they run on the local shards (``local``) with no all-gather; the state is
created with ``zeros_like(p)`` and so keeps the parameter's placement (``state_dict`` and
torch.distributed.checkpoint see DTensors). Only the line search needs more: its Armijo test reads
sums over whole parameters, so those are summed over the shards (``sum_over_shards``) before any rank
decides, and every rank decides the same way.

This module is where sharding is handled; the optimizers call it where tensor lists reach the kernels
(``bucketing.group_by``, ``_line_search.StepTensors``), where reductions are read (``DeviceSums``) and
in their input checks (``check``); state_storage.py calls it for int8 state (blocks per local shard, the
scales' DTensor layout: "int8 state" below).

Supported placements: ``Shard(0)`` (what fully_shard makes) and ``Replicate()`` (the replicate
dimension of HSDP's 2-D mesh). Anything else (tensor-parallel ``Shard(d>0)``, ``_StridedShard``,
``Partial``) is refused before anything is modified.
"""
from __future__ import annotations

import contextlib
import copy
from itertools import repeat
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed: no parameter can be sharded
    DTensor = Replicate = Shard = FSDPModule = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor the kernels update for ``t``: its local shard for a DTensor, else ``t`` itself.
    (Outside autograd, ``DTensor.to_local()`` is this same object; the attribute read is cheaper.)"""
    return t._local_tensor if is_sharded(t) else t


def like(p: Tensor, local_t: Tensor) -> Tensor:
    """``local_t`` (a tensor of p's local shape) as state of p: a DTensor with p's mesh and placements
    when p is one, else ``local_t`` itself (a DTensor already: itself)."""
    if not is_sharded(p) or is_sharded(local_t):
        return local_t
    return DTensor.from_local(local_t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    return DTensor is not None and any(map(isinstance, tensors, repeat(DTensor)))


def local_lists(tensor_lists: Sequence[Sequence[Tensor]]) -> List[List[Tensor]]:
    return [[local(t) for t in tl] for tl in tensor_lists]


# ------------------------------------------------------------------------------------------ checks
def _placement_ok(pl) -> bool:
    # type() and not isinstance(): _StridedShard subclasses Shard and is not a plain dim-0 split.
    return isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0)


def check(opt_name: str, params: Sequence[Tensor]) -> None:
    """Refuse a placement the optimizers do not support, or a gradient sharded unlike its parameter."""
    if DTensor is None:
        return
    for p in params:
        g = p.grad
        if isinstance(p, DTensor):
            for dim, pl in enumerate(p.placements):
                if not _placement_ok(pl):
                    raise RuntimeError(
                        f"{opt_name}: a parameter of shape {tuple(p.shape)} has placement {pl!r} on mesh dimension "
                        f"{dim} (placements {p.placements}); only Shard(0) (FSDP2's fully_shard) and Replicate() "
                        f"(HSDP) are supported; tensor-parallel placements are not")
            if g is None:
                continue
            if not isinstance(g, DTensor):
                raise RuntimeError(f"{opt_name}: the parameter of shape {tuple(p.shape)} is a DTensor "
                                   f"{p.placements} but its gradient is a plain tensor of shape {tuple(g.shape)}")
            if g.placements != p.placements or g.device_mesh != p.device_mesh:
                raise RuntimeError(f"{opt_name}: the gradient of a parameter of shape {tuple(p.shape)} has placements "
                                   f"{g.placements} on {g.device_mesh}, the parameter {p.placements} on "
                                   f"{p.device_mesh}; they must agree")
        elif g is not None and isinstance(g, DTensor):
            raise RuntimeError(f"{opt_name}: a plain parameter of shape {tuple(p.shape)} has a DTensor gradient "
                               f"({g.placements})")


# ------------------------------------------------------------------------------- trial forwards
@contextlib.contextmanager
def fresh_gathers(active: bool):
    """Every FSDP2 module the enclosed forward calls is resharded when it ends.

    A module that does not reshard after its forward (the root, or ``reshard_after_forward=False``)
    keeps the gathered parameters until its backward; a trial forward has no backward, so the next
    trial (or the next step) would see the parameters of this trial, not the shards written since.
    Resharding drops the gathered copy: the next forward gathers the current shards.
    """
    if not active or FSDPModule is None:
        yield
        return
    called: Dict[int, nn.Module] = {}

    def note(module, _args):
        if isinstance(module, FSDPModule):
            called[id(module)] = module

    handle = torch.nn.modules.module.register_module_forward_pre_hook(note)
    try:
        yield
    finally:
        handle.remove()
        for module in called.values():
            module.reshard()


# ---------------------------------------------------------------------------- global reductions
def _ranks(process_group) -> List[int]:
    dist = torch.distributed
    return dist.get_process_group_ranks(process_group if process_group is not None else dist.group.WORLD)


class ShardSums:
    """How the per-tensor sums of one line-search step become sums over whole parameters.

    A rank contributes a tensor's partial sum when it holds a distinct piece of it: every shard
    counts once, a replicated copy (a Replicate mesh dimension, or a plain parameter) only on its
    first replica (coordinate 0 / rank 0 of the group). Then one all_reduce(SUM) over the group whose
    ranks average the loss gives every rank the same exact total (adding zeros rounds nothing).
    """

    def __init__(self, opt_name: str, params: Sequence[Tensor], process_group):
        dist = torch.distributed
        if process_group is False:
            raise RuntimeError(f"{opt_name}: sharded (DTensor) parameters need the loss averaged over the ranks "
                               f"that hold the shards; process_group=False turns that off")
        self.group = process_group
        group_ranks = sorted(_ranks(process_group))
        me = dist.get_rank(process_group)
        seen: Dict[int, tuple] = {}
        weights = []
        for p in params:
            if not is_sharded(p):
                weights.append(1.0 if me == 0 else 0.0)
                continue
            mesh = p.device_mesh
            if id(mesh) not in seen:
                mesh_ranks = sorted(mesh.mesh.flatten().tolist())
                if mesh_ranks != group_ranks:
                    raise RuntimeError(
                        f"{opt_name}: parameters are sharded over the ranks {mesh_ranks}, but the losses are "
                        f"averaged over {group_ranks}; pass process_group= the group of the whole device mesh")
                seen[id(mesh)] = (mesh, mesh.get_coordinate())
            coord = seen[id(mesh)][1]
            first = all(coord[d] == 0 for d, pl in enumerate(p.placements) if isinstance(pl, Replicate))
            weights.append(1.0 if first else 0.0)
        self.weights = weights  # by position in the step's tensor lists

    def sum_over_shards(self, parts):
        """[(positions, per-tensor local sums)] -> [(positions, per-tensor global sums)], one all_reduce."""
        if not parts:
            return parts
        positions = [i for pos, _ in parts for i in pos]
        device = parts[0][1].device
        vec = torch.cat([x.reshape(-1).to(device=device, dtype=torch.float64) for _, x in parts])
        # A NaN/inf partial sum stays non-finite (0 * inf = NaN), so every rank sees it and raises together.
        vec = vec * torch.tensor([self.weights[i] for i in positions], dtype=torch.float64, device=device)
        dist = torch.distributed
        if dist.get_backend(self.group) == "nccl" and not vec.is_cuda:
            vec = vec.cuda()
        dist.all_reduce(vec, group=self.group)
        return [(positions, vec)]


def shard_sums(opt_name: str, params: Sequence[Tensor], process_group) -> Optional[ShardSums]:
    """A ShardSums for a step whose tensors include DTensors; None otherwise (sums are local as before)."""
    if not any_sharded(params):
        return None
    return ShardSums(opt_name, params, process_group)


# -------------------------------------------------------------------- distributed checkpoints
# torch.distributed.checkpoint.state_dict.get_optimizer_state_dict renames every key of
# ``state_dict()["state"]`` to its parameter's name (and fails on any other key) but keeps the
# entries of the param groups; so the line-search counters travel in the first param group. They go
# as a one-element tuple: DCP stores a tuple as one opaque entry, whereas it splits a dict into its
# keys and, when loading in place into a fresh optimizer's state_dict, keeps only the keys that the
# fresh one already has (a counter created during training would be lost).
def counters_into_groups(sd: dict, key: str) -> dict:
    """``state_dict()`` of a line-search optimizer: ``state[key]`` moved to ``param_groups[0][key] = (counters,)``."""
    counters = sd["state"].pop(key, None)
    if counters is not None and sd["param_groups"]:
        sd["param_groups"][0][key] = (copy.deepcopy(counters),)
    return sd


def counters_from_groups(sd: dict, key: str) -> dict:
    """The inverse, on a copy; a checkpoint with the counters in ``state`` (older layout) passes as it is."""
    sd = dict(sd)
    sd["state"] = dict(sd["state"])
    groups = [dict(g) for g in sd["param_groups"]]
    for g in groups:
        packed = g.pop(key, None)
        if packed is not None and key not in sd["state"]:
            sd["state"][key] = packed[0] if isinstance(packed, (tuple, list)) else packed
    sd["param_groups"] = groups
    return sd


# ------------------------------------------------------------------------------ int8 state (issue 24)
# int8 state keeps one float32 scale per block of ``block`` elements of the tensor the kernel updates,
# i.e. of the local shard: blocks start at each shard's element 0 and never straddle two shards. The
# codes are ``zeros_like(p)`` (p's placement). The scales are a DTensor on p's mesh of global shape
# (W_1, ..., W_k, Kmax): W_j the size of the j-th mesh dimension on which p is Shard(0) (the scales are
# Shard(j - 1) there, Replicate on the others), Kmax = ceil(rows * row_numel / block) for the largest local
# shard (rows = ceil(dim0 / W) per Shard(0) dimension: torch.chunk's split, which FSDP2 follows). Every
# rank thus holds Kmax scales (an even split: DCP and full_tensor() see one consistent tensor); the kernels
# get the first ceil(local numel / block) of them (``local_scales``), the rest stay 0. The shape names the
# mesh: a checkpoint loads (DCP, in place) on a mesh of the same shape; on another, DCP refuses the scales'
# size before it reads anything (the codes' blocks would no longer be those of their shards).
def _layout(p, block: int) -> tuple:
    """(the global shape of the scales of the DTensor ``p``'s int8 state, their placements, Kmax)."""
    shape, placements, rows = [], [], (p.shape[0] if p.dim() else 1)
    for d, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            placements.append(Shard(len(shape)))
            shape.append(p.device_mesh.size(d))
            rows = -(-rows // shape[-1])
        else:
            placements.append(Replicate())
    row_numel = 1
    for n in p.shape[1:]:
        row_numel *= n
    kmax = -(-(rows * row_numel) // block)
    return tuple(shape) + (kmax,), tuple(placements), kmax


def int8_scales_from_local(p, local_scales: Tensor, block: int):
    """A scale DTensor for p (``_layout``) whose local part begins with ``local_scales`` (zeros after)."""
    shape, placements, kmax = _layout(p, block)
    out = torch.zeros(kmax, dtype=torch.float32, device=local(p).device)
    out[:local_scales.numel()].copy_(local_scales)
    local_shape = (1,) * (len(shape) - 1) + (kmax,)
    return DTensor.from_local(out.view(local_shape), p.device_mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def new_int8_state(p, code_dtype: torch.dtype, block: int) -> tuple:
    """(zero codes with p's placement, zero scales) of the DTensor ``p``."""
    codes = torch.zeros_like(p, dtype=code_dtype, memory_format=torch.contiguous_format)
    return codes, int8_scales_from_local(p, torch.zeros(0), block)


def int8_scales_fit(p, codes, scales, block: int) -> Optional[str]:
    """None when ``codes`` and ``scales`` are int8 state of the DTensor ``p`` in this layout for ``block``;
    else what differs."""
    if not is_sharded(p):
        return "the parameter is a plain tensor but its int8 state is a DTensor"
    want, placements, kmax = _layout(p, block)
    if not is_sharded(codes) or not is_sharded(scales):
        return (f"the parameter is an FSDP2 DTensor {p.placements} but its int8 state is "
                f"{'a plain tensor' if not is_sharded(codes) else 'DTensor codes with plain-tensor scales'}")
    if codes.device_mesh != p.device_mesh or codes.placements != p.placements or codes.shape != p.shape:
        return (f"codes {tuple(codes.shape)} {codes.placements} on {codes.device_mesh}, the parameter "
                f"{tuple(p.shape)} {p.placements} on {p.device_mesh}")
    if (scales.device_mesh != p.device_mesh or tuple(scales.placements) != placements
            or tuple(scales.shape) != want or scales.dtype != torch.float32):
        return (f"scales {tuple(scales.shape)} {scales.dtype} {scales.placements}, expected {want} torch.float32 "
                f"{placements} (one per block of {block} elements of each local shard, {kmax} per shard)")
    return None


def local_scales(scales: Tensor, codes: Tensor, block: int) -> Tensor:
    """What the kernels get for the scales of ``codes``: a plain tensor as it is; of a DTensor, the first
    ceil(local numel / block) entries of the local part (a view)."""
    if not is_sharded(scales):
        return scales
    return scales._local_tensor.view(-1)[:-(-local(codes).numel() // block)]


def int8_to_dtensor(p, codes_local: Tensor, scales_local: Optional[Tensor], block: int) -> tuple:
    """Local codes (or float state, ``scales_local`` None) of p's shard as DTensor state of p."""
    return like(p, codes_local), (None if scales_local is None else int8_scales_from_local(p, scales_local, block))
