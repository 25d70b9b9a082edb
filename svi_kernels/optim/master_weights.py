"""fp32 master weights of fp16/bf16 parameters: the working tensor a fused op updates, chunked
fp32 updates rounded back into the parameters, and the checkpoint rules."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import state_storage


LOW_PRECISION = (torch.float16, torch.bfloat16)


# fp32 gradient copies made at once for the master update: bounds the step's extra memory (256 MiB).
MASTER_CHUNK_NUMEL = 1 << 26


def working_tensor(group, state: dict, p: Tensor) -> Tensor:
    """The tensor the fused op updates for p: p itself, or, for an fp16/bf16 p under
    ``master_weights``, its float32 copy ``state["master_param"]`` (created here at p's first step
    with master weights, from p's current value; the moments already there take the state dtype of a
    float32 working tensor (state_storage.py: float32, or the group's ``state_dtype``), so a checkpoint
    saved without master weights resumes with them). A group whose flag was switched off drops the
    master and keeps its moments in p's state dtype (p already holds the rounded master)."""
    state_dtype = group.get(state_storage.KEY)
    if group["master_weights"] and p.dtype in LOW_PRECISION:
        master = state.get("master_param")
        if master is None:
            state_storage.conform(state, torch.float32, state_dtype, state_storage.block_size(group))
            master = state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format,
                                                             copy=True)
        return master
    if "master_param" in state:
        del state["master_param"]
        state_storage.conform(state, p.dtype, state_dtype, state_storage.block_size(group))
    return p


def step_with_masters(update, lists: List[List[Tensor]], params: List[Tensor],
                      grad_scale: Optional[Tensor]) -> None:
    """``update(*lists)`` where ``lists[0]`` holds working tensors (see ``working_tensor``) and
    ``lists[1]`` the grads of ``params``, the parameters they stand for.

    Entries that are their own parameter go through in one call, as without master weights. The
    master entries go in chunks of at most MASTER_CHUNK_NUMEL elements: their grads converted to
    float32 (one read of the grad and one fp32 write), the fused op on the fp32 lists, then each
    master rounded (to nearest) into its parameter in place. Under a GradScaler the op unscales the
    fp32 grads; they are copied back so ``p.grad`` ends unscaled as without master weights.
    """
    masters = [i for i, (w, p) in enumerate(zip(lists[0], params)) if w is not p]
    if not masters:
        update(*lists)
        return
    if len(masters) < len(params):
        is_master = set(masters)
        direct = [i for i in range(len(params)) if i not in is_master]
        update(*[[tl[i] for i in direct] for tl in lists])
    for chunk in _chunks(masters, lists[0]):
        sub = [[tl[i] for i in chunk] for tl in lists]
        low_grads = sub[1]
        sub[1] = [g.to(torch.float32) for g in low_grads]
        update(*sub)
        torch._foreach_copy_([params[i] for i in chunk], sub[0])
        if grad_scale is not None:
            torch._foreach_copy_(low_grads, sub[1])


def _chunks(indices: List[int], tensors: Sequence[Tensor]):
    chunk, numel = [], 0
    for i in indices:
        n = tensors[i].numel()
        if chunk and numel + n > MASTER_CHUNK_NUMEL:
            yield chunk
            chunk, numel = [], 0
        chunk.append(i)
        numel += n
    if chunk:
        yield chunk


def keep_master_state(opt, state_dict, flags: Sequence[bool]) -> None:
    """After ``Optimizer.load_state_dict``: keep each group's own ``master_weights`` (a storage choice
    of this optimizer, not of the checkpoint), and undo the cast of the float32 state of master
    params (torch casts every float state to its param's dtype) where master weights are on
    (state_storage.keep_after_load then converts the moments to the group's state dtype)."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [(p, flag) for g, flag in zip(opt.param_groups, flags) for p in g["params"]]
    for group, flag in zip(opt.param_groups, flags):
        group["master_weights"] = flag
    for pid, (p, flag) in zip(saved_ids, params):
        saved = state_dict["state"].get(pid)
        if not flag or not saved or "master_param" not in saved:
            continue
        state = opt.state[p]
        for k, v in saved.items():
            if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                state[k] = v.to(device=p.device)
