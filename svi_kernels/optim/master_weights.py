"""Master weights of fp16/bf16 parameters (``master_weights=``, issue 24): a load/store policy around the
unchanged fused update, and the checkpoint rules.

Modes (other dtypes ignore all of them, as ``True`` always did):

- ``False``: the update is rounded to nearest into p (small updates are lost below half an ulp).
- ``True``: a float32 copy ``state["master_param"]`` (+4 B/param) takes the update; p = round(master).
- ``"kahan"``: a compensation ``state["master_correction"]`` in p's dtype (+2 B/param): w = p + c,
  stored as p = round(w), c = round(w - p).
- ``"8bit"``: an int8 code ``state["master_correction"]`` (+1 B/param): w ~= p + code * ulp(p) / 254
  with p = round(w) and code = rint((w - p) / (ulp(p) / 254)) in [-127, 127] (|w - p| <= ulp(p) / 2),
  so |w - reconstruction| <= ulp(p) / 508 (fp16 and bf16 alike; ulp(p) = nextafter(|p|, inf) - |p|).
- ``"stochastic"``: no buffer (+0 B/param); p = stochastic rounding of the new value: the hash bits of
  svi_kernels/backends/state_storage.py (bf16: the kernels' SR of bf16 state, bit for bit; fp16: the same
  16 bits against the gap between the two neighbours) keyed by a host counter in the param group
  (``master_seed_calls``, in the state_dict), the parameter's position and its memory index: same bits on
  every rank, no device RNG, bit-identical resume.

Every mode other than ``True`` loads, per chunk of at most MASTER_CHUNK_NUMEL elements, the float32
working values from (p, correction), runs the same fused op on the float32 chunk (moments created for
a float32 working tensor: float32 by default, or the group's ``state_dtype``), and stores back. The
transient is the chunk (fp32 working values and fp32 grads): a Python-level policy, not fused.

Line searches (``line_search_step``): the whole step runs on float32 working copies of the fp16/bf16
parameters (the precise start point); each trial forward sees the rounded trial point written into p;
the final point is stored back; a raising step puts p back bit for bit (transient: 4 B/param copy,
4 its gradient, 2 p's start value, +4 SR bits under "stochastic"; not chunked).
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import sharding, state_storage


LOW_PRECISION = (torch.float16, torch.bfloat16)


# fp32 gradient copies made at once for the master update: bounds the step's extra memory (256 MiB).
MASTER_CHUNK_NUMEL = 1 << 26

MODES = (False, True, "kahan", "8bit", "stochastic")
MODES_TEXT = "False, True, 'kahan', '8bit' or 'stochastic'"
CORRECTION = "master_correction"  # state key of the kahan compensation / the 8bit code
SEED_KEY = "master_seed_calls"  # group key: steps that drew stochastic-rounding bits
_CODE_UNITS = 254.0  # 8bit: the code counts ulp(p) / 254, so |code| <= 127 for |w - p| <= ulp(p) / 2
_SR_LIST = 7  # the SR list salt of the parameters (the state lists use 0..2)


def check_mode(value):
    """A ``master_weights`` value as given, or a ValueError naming it and the allowed values."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in MODES[2:]:
        return value.lower()
    raise ValueError(f"Invalid master_weights {value!r}: allowed values are {MODES_TEXT}")


def check_new_group(opt, opt_name: str) -> None:
    """After ``Optimizer.add_param_group``: the new group's ``master_weights`` checked (the group taken
    back when refused, so a refused group changes nothing)."""
    group = opt.param_groups[-1]
    try:
        group["master_weights"] = check_mode(group.get("master_weights", False))
        if group["master_weights"] and group.get("differentiable"):
            raise ValueError(f"master_weights={group['master_weights']!r} with differentiable=True is not supported: "
                             "the differentiable step is the plain PyTorch update of the parameter itself; use "
                             "master_weights=False with it")
        if group["master_weights"] == "stochastic" and group.get("capturable"):
            raise ValueError("master_weights='stochastic' with capturable=True is not supported: its rounding bits "
                             "change every step, and a replayed CUDA graph would replay the same bits (a biased "
                             "rounding); use capturable=False, or master_weights='kahan' / '8bit' / True")
        if group["master_weights"] == "stochastic":  # each group its own keys: counters 2^16 steps apart
            group.setdefault(SEED_KEY, (len(opt.param_groups) - 1) << 16)
    except ValueError as e:
        opt.param_groups.pop()
        raise ValueError(f"{opt_name}: {e}") from None


def mode_of(group: dict, p: Tensor):
    """The group's mode where it applies to p (an fp16/bf16 p), else False."""
    mode = group.get("master_weights", False)
    return mode if mode and p.dtype in LOW_PRECISION else False


def _ulp(p: Tensor) -> Tensor:
    """ulp(p) in float32: the spacing of p's dtype at |p| (nextafter(|p|, inf) - |p|; the largest finite values
    the spacing below them; 0 for inf/NaN). bf16 from its exponent bits: 2^(E-127) * 2^-7, at least 2^-133
    (tests/optim/test_master_modes.py checks every bf16 and fp16 value)."""
    if p.dtype == torch.bfloat16:
        u = (p.view(torch.int16) & 0x7F80).view(torch.bfloat16).to(torch.float32).mul_(2.0 ** -7).clamp_(min=2.0 ** -133)
        return u.masked_fill_(torch.isinf(u), 0.0)
    a = p.abs()
    a32 = a.to(torch.float32)
    u = torch.nextafter(a, torch.full_like(a, float("inf"))).to(torch.float32) - a32
    u = torch.where(torch.isinf(u), a32 - torch.nextafter(a, torch.zeros_like(a)).to(torch.float32), u)
    return torch.where(torch.isfinite(u), u, torch.zeros_like(u))


def load(mode, p: Tensor, state: dict, group: Optional[dict] = None) -> Tensor:
    """The float32 working values of p under ``mode`` (a new tensor, except True's master itself; of an
    FSDP2 p, the local shard's values, a plain tensor)."""
    if mode is True:
        return working_tensor(group if group is not None else {"master_weights": True}, state, p)
    return _with_correction(p, state)


def _with_correction(p: Tensor, state: dict) -> Tensor:
    """p in float32 plus its correction, read by its dtype (int8: an 8bit code; p's dtype: a kahan
    compensation), so a group switched between the modes keeps its precise values. Of an FSDP2 p: its
    local shard's (every mode is elementwise; DTensor has no sharding rule for some of these ops)."""
    pl = sharding.local(p.detach())
    w = pl.to(torch.float32, memory_format=torch.preserve_format, copy=True)
    c = state.get(CORRECTION)
    if c is not None and c.dtype == torch.int8:
        w += sharding.local(c).to(torch.float32) * (_ulp(pl) / _CODE_UNITS)
    elif c is not None:
        w += sharding.local(c).to(torch.float32)
    return w


def sr_bits(w: Tensor, key: int, index: int) -> Tensor:
    """The 16 random bits (int32, 0..65535) of each element of ``w`` for the stochastic rounding of the
    parameter at position ``index`` under the step key ``key``: the state SR bits of
    svi_kernels/backends/state_storage.py (by memory index) with the parameters' list salt, computed in
    int32 arithmetic (products wrap mod 2^32, shifts masked to be logical): 6x faster than its int64
    form, the same bits (tests/optim/test_master_modes.py checks them against it)."""
    bits = state_storage._bits
    base = (bits.sr_key(key, index) + bits._mul32(_SR_LIST, 0x7F4A7C15)) & 0xFFFFFFFF
    x = bits.memory_index(w).to(torch.int32) * _I32(0x9E3779B1) + _I32(base)
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _I32(0x85EBCA6B)
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _I32(0xC2B2AE35)
    x = x ^ ((x >> 16) & 0xFFFF)
    return (x >> 16) & 0xFFFF


def _I32(u: int) -> int:
    """A uint32 as the int32 of the same bits."""
    return u - (1 << 32) if u >= 1 << 31 else u


def _stochastic_round(w: Tensor, dtype: torch.dtype, key: int, index: int, r: Optional[Tensor] = None) -> Tensor:
    """float32 ``w`` rounded stochastically to ``dtype`` with the bits ``r`` (``sr_bits``, computed here when
    not given). bf16: bf16 bits = (float bits + r) >> 16, NaN to nearest (the kernels' SR of bf16 state, bit
    for bit, in int32 arithmetic: no carry out of 32 bits below the NaNs); fp16: the upper neighbour with
    probability (w - lower) / gap, by the same 16 bits."""
    if r is None:
        r = sr_bits(w, key, index)
    if dtype == torch.bfloat16:
        hi = torch.bitwise_right_shift(w.view(torch.int32) + r, 16).to(torch.int16).view(torch.bfloat16)
        return torch.where(torch.isnan(w), w.to(torch.bfloat16), hi)
    near = w.to(dtype)
    n32 = near.to(torch.float32)
    down = torch.where(n32 > w, torch.nextafter(near, torch.full_like(near, float("-inf"))), near)
    up = torch.where(n32 < w, torch.nextafter(near, torch.full_like(near, float("inf"))), near)
    gap = up.to(torch.float32) - down.to(torch.float32)
    frac = torch.where(gap > 0, (w - down.to(torch.float32)) / gap, torch.zeros_like(w))
    return torch.where((r.to(torch.float32) + 0.5) / 65536.0 < frac, up, down)


def store(mode, p: Tensor, state: dict, w: Tensor, key: int = 0, index: int = 0,
          group: Optional[dict] = None) -> None:
    """p (and its correction) <- the float32 working values ``w`` under ``mode``. Of an FSDP2 p, on its
    local shard (``w`` a DTensor like p or its local values); the correction is a DTensor like p."""
    pl, wl = sharding.local(p), sharding.local(w)
    if mode == "stochastic":  # (FSDP2: the bits of each local element by its index in the shard)
        pl.copy_(_stochastic_round(wl, p.dtype, key, index))
        state.pop(CORRECTION, None)
        return
    if mode is True:
        master = working_tensor(group if group is not None else {"master_weights": True}, state, p)
        if master is not w:
            sharding.local(master).copy_(wl)
    pl.copy_(wl)
    if mode == "kahan":
        state[CORRECTION] = sharding.like(p, (wl - pl.to(torch.float32)).to(p.dtype))
    elif mode == "8bit":
        code = torch.round((wl - pl.to(torch.float32)) / (_ulp(pl) / _CODE_UNITS))
        code = torch.nan_to_num(code, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-127, 127)
        state[CORRECTION] = sharding.like(p, code.to(torch.int8))


def step_key(group: dict) -> int:
    """A new stochastic-rounding key for this group's step (host counter, advanced once)."""
    calls = int(group.get(SEED_KEY, 0))
    group[SEED_KEY] = calls + 1
    return state_storage._mix(state_storage.BASE_SEED + 0x1234567 + calls * 0x9E3779B9)


def working_tensor(group, state: dict, p: Tensor) -> Tensor:
    """The tensor the fused op updates for p: p itself, or, for an fp16/bf16 p under
    ``master_weights``, its float32 copy ``state["master_param"]`` (created here at p's first step
    with master weights, from p's current value; the moments already there take the state dtype of a
    float32 working tensor (state_storage.py: float32, or the group's ``state_dtype``), so a checkpoint
    saved without master weights resumes with them). A group whose flag was switched off drops the
    master and keeps its moments in p's state dtype (p already holds the rounded master)."""
    state_dtype = group.get(state_storage.KEY)
    mode = group["master_weights"]
    if mode and mode is not True and p.dtype in LOW_PRECISION:  # a load/store mode: p is the owner
        if "master_param" in state:  # switched from True: the master becomes (p, correction)
            master = state.pop("master_param")
            store(mode, p, state, master, step_key(group) if mode == "stochastic" else 0)
        return p
    if not mode or p.dtype not in LOW_PRECISION:
        state.pop(CORRECTION, None)  # (p holds the rounded value)
    if mode is True and p.dtype in LOW_PRECISION:
        master = state.get("master_param")
        if master is None:
            state_storage.conform(state, torch.float32, state_dtype, state_storage.block_size(group))
            master = state["master_param"] = sharding.like(p, _with_correction(p, state))  # (p without a correction)
            state.pop(CORRECTION, None)
        return master
    if "master_param" in state:
        del state["master_param"]
        state_storage.conform(state, p.dtype, state_dtype, state_storage.block_size(group))
    return p


def template_state(group: dict, state: dict, p: Tensor) -> None:
    """Creates p's master state where its first step would (a state_dict template for DCP): True's float32
    copy of p, a zero kahan compensation or 8bit code (p is then exactly its working value)."""
    mode = mode_of(group, p)
    if mode is True:
        working_tensor(group, state, p)
    elif mode in ("kahan", "8bit") and CORRECTION not in state:
        state[CORRECTION] = torch.zeros_like(p, dtype=p.dtype if mode == "kahan" else torch.int8)


def step_with_masters(update, lists: List[List[Tensor]], params: List[Tensor],
                      grad_scale: Optional[Tensor], group: Optional[dict] = None, states=None) -> None:
    """``update(*lists)`` where ``lists[0]`` holds working tensors (see ``working_tensor``) and
    ``lists[1]`` the grads of ``params``, the parameters they stand for.

    Entries that are their own parameter (and not under a load/store mode of ``group``) go through in
    one call, as without master weights. The others go in chunks of at most MASTER_CHUNK_NUMEL
    elements: their grads converted to float32 (one read of the grad and one fp32 write), their float32
    working values loaded (``load``: True's master itself, else built from p and its correction), the
    fused op on the fp32 lists, then each stored back (``store``: True rounds the master to nearest into
    p). Under a GradScaler the op unscales the fp32 grads; they are copied back so ``p.grad`` ends
    unscaled as without master weights. ``states``: the optimizer's state (needed by the load/store modes).
    """
    mode = group.get("master_weights", False) if group is not None else False
    loaded = mode and mode is not True
    masters = [i for i, (w, p) in enumerate(zip(lists[0], params))
               if w is not p or (loaded and p.dtype in LOW_PRECISION)]
    if not masters:
        update(*lists)
        return
    if len(masters) < len(params):
        is_master = set(masters)
        direct = [i for i in range(len(params)) if i not in is_master]
        update(*[[tl[i] for i in direct] for tl in lists])
    key = step_key(group) if mode == "stochastic" else 0
    position = {id(p): k for k, p in enumerate(group["params"])} if group is not None else {}
    for chunk in _chunks(masters, lists[0]):
        sub = [[tl[i] for i in chunk] for tl in lists]
        low_grads = sub[1]
        sub[1] = [g.to(torch.float32) for g in low_grads]
        if loaded:
            sub[0] = [sharding.like(params[i], load(mode, params[i], states[params[i]])) for i in chunk]
        update(*sub)
        if loaded:
            for i, w in zip(chunk, sub[0]):
                store(mode, params[i], states[params[i]], w, key, position.get(id(params[i]), i))
        else:
            torch._foreach_copy_([sharding.local(params[i]) for i in chunk], sharding.local_lists([sub[0]])[0])
        if grad_scale is not None:  # (FSDP2: DTensor has no sharding rule for _foreach_copy_; local shards)
            torch._foreach_copy_(*sharding.local_lists([low_grads, sub[1]]))


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
        if not flag or not saved or ("master_param" not in saved and (flag is True or p.dtype not in LOW_PRECISION)):
            continue
        state = opt.state[p]
        for k, v in saved.items():
            if k != "step" and isinstance(v, Tensor) and (v.is_floating_point() or k == CORRECTION):
                state[k] = v.to(device=p.device, copy=True)  # (torch cast it to p's dtype, an 8bit code too)


# ------------------------------------------------------------------------------- line searches
def line_search_step(step):
    """Decorates a line search's ``step(closure)``: under a master mode its fp16/bf16 parameters are
    searched through float32 working copies (``_searched_in_fp32``); otherwise the step as it was."""
    @functools.wraps(step)
    def wrapper(self, closure=None):
        if not any(g.get("master_weights") for g in self.param_groups) and not self.__dict__.get("_had_masters"):
            return step(self, closure)
        self.__dict__["_had_masters"] = True
        with torch.no_grad():  # a group switched off (or to another mode): its master state converted first
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state.get(p)
                    if st and ("master_param" in st or CORRECTION in st or mode_of(g, p) is True):
                        working_tensor(g, st, p)
        pairs = [(g, k, p, mode_of(g, p)) for g in self.param_groups for k, p in enumerate(g["params"])]
        pairs = [x for x in pairs if x[3] and x[2].requires_grad]
        if not pairs:
            if not any(g.get("master_weights") for g in self.param_groups):
                self.__dict__["_had_masters"] = False
            return step(self, closure)
        with _searched_in_fp32(self, closure, pairs) as wrapped:
            return step(self, wrapped)
    return wrapper


@contextlib.contextmanager
def _searched_in_fp32(opt, closure, pairs):
    """The line search of ``opt`` runs on float32 working copies w of its fp16/bf16 parameters p (the
    precise start point: ``load``), put in their place in the param groups and the state for the step.
    Every closure call but the first writes the rounded trial point into p first (to nearest; under
    "stochastic" the rounding of the final store, same key), so the forward sees what p will hold; the
    first call's gradients are copied to the working copies in float32. After the step each w is stored
    back (``store``); if the step raises, every p gets its start value back (bit for bit) and the master
    state is left as it was. Transient for the step: 4 B/param of w, 4 of its fp32 gradient, 2 of p's
    start value (not chunked: a search moves every parameter together)."""
    from ._closure import grad_marks, grads_changed, grads_set_aside
    from . import step_plan
    state = opt.state
    keys = {id(g): step_key(g) for g, _, _, mode in pairs if mode == "stochastic"}
    items = []  # (group, position, p, mode, its state dict, stashed master entries, w, p's start value)
    for g, k, p, mode in pairs:
        st = state[p]
        w = sharding.like(p, load(mode, p, st, g).detach().clone())  # (FSDP2: a DTensor, as the search needs)
        stash = {key: st.pop(key) for key in ("master_param", CORRECTION) if key in st}
        w.requires_grad_(True)
        if p.grad is not None:
            w.grad = p.grad.detach().to(torch.float32)
        items.append((g, k, p, mode, st, stash, w, p.detach().clone()))
    step_plan.drop_line_search(opt)
    for g, k, p, mode, st, stash, w, p0 in items:
        g["params"][k] = w
        state[w] = state.pop(p)
    owners = [p for _, _, p, _, _, _, _, _ in items]
    calls = [0]

    bits = {}  # the SR bits of each "stochastic" parameter for this step (every trial and the final store)

    def rounded(g, k, p, w):
        wl = sharding.local(w.detach())  # (FSDP2: the local shard, bits by its index there)
        r = bits.get(id(p))
        if r is None:
            r = bits[id(p)] = sr_bits(wl, keys[id(g)], k)
        return _stochastic_round(wl, p.dtype, keys[id(g)], k, r)

    def put_trial_points():
        for g, k, p, mode, st, stash, w, p0 in items:
            if mode == "stochastic":
                sharding.local(p).copy_(rounded(g, k, p, w))
            else:
                sharding.local(p).copy_(sharding.local(w.detach()))

    def copy_grads():
        for g, k, p, mode, st, stash, w, p0 in items:
            w.grad = None if p.grad is None else p.grad.detach().to(torch.float32)

    @contextlib.contextmanager
    def real_params():  # the closure sees the parameters in the groups (its opt.zero_grad() clears p.grad)
        for g, k, p, mode, st, stash, w, p0 in items:
            g["params"][k] = p
        try:
            yield
        finally:
            for g, k, p, mode, st, stash, w, p0 in items:
                g["params"][k] = w

    wrapped = None
    if closure is not None:
        @functools.wraps(closure)
        def wrapped(*args, **kwargs):
            first = calls[0] == 0
            calls[0] += 1
            if not first:  # a trial: p's gradients set aside as the runner does for the working copies'
                with torch.no_grad():
                    put_trial_points()
                with grads_set_aside(owners), real_params():
                    return closure(*args, **kwargs)
            marks = grad_marks(owners)
            with real_params():
                loss = closure(*args, **kwargs)
            if not grads_changed(marks, owners) and isinstance(loss, Tensor) and loss.requires_grad \
                    and torch.is_grad_enabled():
                loss.backward()  # (the runner would have; p's gradients go to the working copies below)
            copy_grads()
            return loss

    ok = False
    try:
        yield wrapped
        ok = True
    finally:
        step_plan.drop_line_search(opt)
        scratch = opt.__dict__.get("_w0", {})
        for g, k, p, mode, st, stash, w, p0 in items:
            g["params"][k] = p
            state[p] = state.pop(w, st)
            st.update(stash)
            scratch.pop(w, None)
            with torch.no_grad():
                if ok and mode == "stochastic":
                    sharding.local(p).copy_(rounded(g, k, p, w))
                    st.pop(CORRECTION, None)
                elif ok:
                    store(mode, p, st, w.detach(), keys.get(id(g), 0), k, g)
                else:
                    p.copy_(p0)
