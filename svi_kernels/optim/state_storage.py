"""How an optimizer stores its state (issue 24): the ``state_dtype=`` setting of AdamW, SVI, AdamSLS, SaLSA
and LayerwiseAdamSLS (param group key ``"state_dtype"``).

- ``None``: the state has the dtype of its working tensor (the parameter, or its float32 master under
  ``master_weights``), as before.
- ``torch.float32``: float32 state beside fp16/bf16 (or fp32) working tensors.
- ``torch.bfloat16``: bf16 state beside fp32 (or bf16) working tensors, 2 B per value. The kernels compute
  in float32 and store with stochastic rounding (SR): with beta2 = 0.999 a step changes v by 0.1 %, below
  half a bf16 ulp (0.2 %), so rounded to nearest v would never decay; SR keeps the stored value unbiased.
- ``"int8"``: blockwise 8-bit state (issue 24 phase 2): each moment ``<key>`` is a tensor of codes of the
  working tensor's shape (int8 for m and momentum buffers, uint8 for v) and ``<key>_scale``, float32, one
  scale per block of ``state_block_size`` (group key, default 256) elements of its flat memory; the
  format is svi_kernels/backends/state_storage.py's codec. ~2.03 B/param for Adam's two moments. Under
  FSDP2 the blocks are each local shard's and the scales a DTensor laid out by sharding.py ("int8 state");
  the sharded cases here go through it (``create``, ``matches``, ``_conform_sharded``, ``check_checkpoint``,
  ``scales``: the local scales the kernels take).

What this module holds: the checks (a value, a group, a pair of dtypes), the dtype of a new state tensor
and the conversion of existing state (a checkpoint loaded, a setting changed), and the SR seeds: one per
state-writing launch, from a base seed, a host counter of step() calls (``param_groups[0]["state_seed_calls"]``:
same on every rank, in the state_dict, so a resumed run draws the same bits) and the launch's ordinal in
the step. No seed (None) where no state is bf16 under ``state_dtype=torch.bfloat16``: the ops are then called
as before (round to nearest, today's bits; a backend without the keyword still serves them).
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

_bits = importlib.import_module("svi_kernels.backends.state_storage")  # fmix32, the int8 codec: every backend's
from . import sharding as _sharding  # noqa: E402

KEY = "state_dtype"  # the per-group setting
CALLS_KEY = "state_seed_calls"  # param_groups[0]: step() calls that drew seeds
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SUPPORTED_TEXT = "None (the working tensor's dtype), torch.float32, torch.bfloat16 or 'int8'"
INT8 = _bits.INT8  # the int8 setting ("int8"), held as this string in the param groups
BLOCK_KEY = "state_block_size"  # the per-group block size of int8 state
DEFAULT_BLOCK_SIZE = _bits.DEFAULT_BLOCK_SIZE
SCALE = "_scale"  # state[key + SCALE]: the float32 block scales of int8 state[key]
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # the state keys this module stores
LIST_OF = {"exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs", "max_exp_avg_sq": "max_exp_avg_sqs",
            "momentum_buffer": "momentum_buffers"}  # state key -> the op's list name
BASE_SEED = 0x5EED0024
_M32 = 0xFFFFFFFF


# -------------------------------------------------------------------------------------------- checks
def check_value(value):
    """A ``state_dtype`` as given (constructor or param group): the value ("int8" for any spelling of
    it), or a ValueError."""
    if value is None or (isinstance(value, torch.dtype) and value in (F32, BF16)):
        return value
    if isinstance(value, str) and value.lower() == INT8:
        return INT8
    raise ValueError(f"Invalid state_dtype {value!r}: supported: {SUPPORTED_TEXT}")


def check_block_size(value) -> int:
    """A ``state_block_size``: a power of two in [32, 4096] (the ops' range), or a ValueError."""
    lo, hi = _bits.MIN_BLOCK_SIZE, _bits.MAX_BLOCK_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or value & (value - 1):
        raise ValueError(f"Invalid state_block_size {value!r}: a power of two in [{lo}, {hi}] (the elements "
                         f"that share one float32 scale of int8 state)")
    return value


def working_dtype(group: dict, p: Tensor) -> torch.dtype:
    """The dtype of the tensor the fused op updates for ``p``: float32 for an fp16/bf16 ``p`` under
    ``master_weights`` (its master), else ``p``'s."""
    return F32 if group.get("master_weights") and p.dtype in (F16, BF16) else p.dtype


def _pair_problem(working: torch.dtype, state_dtype) -> Optional[str]:
    if state_dtype == INT8:
        if working not in _bits.INT8_PARAM_DTYPES:
            return (f"int8 state is kept for float32, float16 and bfloat16 parameters (float32 arithmetic), "
                    f"not for {working} ones: use state_dtype=None for them (a param group of their own can set it)")
        return None
    if not working.is_floating_point:
        return f"state_dtype applies to real floating-point parameters, not to {working} ones"
    if working == F64:
        return ("float64 parameters keep float64 state: use state_dtype=None for them (a param group of their "
                "own can set it)")
    if working == F16 and state_dtype == BF16:
        return ("float16 parameters cannot keep bfloat16 state (fp16 and bf16 trade range for precision "
                "differently): use state_dtype=torch.float32, or master_weights=True (float32 masters) where the "
                "optimizer has it")
    return None


def dtype_for(working: torch.dtype, state_dtype, key: str = "exp_avg") -> torch.dtype:
    """The dtype of the state ``key`` of a working tensor of dtype ``working`` (int8 state: its codes');
    ValueError for a pair no kernel has."""
    if state_dtype is None:
        return working
    problem = _pair_problem(working, state_dtype)
    if problem is not None:
        raise ValueError(f"state_dtype={state_dtype}: {problem}")
    return _bits.CODE_DTYPES[LIST_OF[key]] if state_dtype == INT8 else state_dtype


def check_group(opt_name: str, group: dict) -> None:
    """Every refusal of a group's ``state_dtype`` (value, flags, parameter dtypes), with the reason."""
    sd = group.get(KEY)
    try:
        check_value(sd)
    except ValueError as e:
        raise ValueError(f"{opt_name}: {e}") from None
    if sd is None:
        return
    if sd == INT8:
        _check_int8_group(opt_name, group)
    if sd == BF16 and group.get("capturable"):
        raise ValueError(f"{opt_name}: capturable=True with state_dtype=torch.bfloat16 is not supported: the bf16 "
                         "state is stored with stochastic rounding whose random bits change every step, and a "
                         "replayed CUDA graph would replay the same bits (a biased state); use capturable=False, "
                         "or state_dtype=torch.float32 / None")
    if group.get("differentiable"):
        raise ValueError(f"{opt_name}: differentiable=True runs the plain PyTorch update, which keeps the state in the "
                         f"parameter's dtype; use state_dtype=None with it")
    for p in group["params"]:
        problem = _pair_problem(working_dtype(group, p), sd)
        if problem is not None:
            raise ValueError(f"{opt_name}: state_dtype={sd} for a {p.dtype} parameter of shape {tuple(p.shape)}: "
                             f"{problem}")


def _check_int8_group(opt_name: str, group: dict) -> None:
    try:
        group[BLOCK_KEY] = check_block_size(group.setdefault(BLOCK_KEY, DEFAULT_BLOCK_SIZE))
    except ValueError as e:
        raise ValueError(f"{opt_name}: {e}") from None
    for p in group["params"]:
        if p.is_complex():
            raise ValueError(f"{opt_name}: state_dtype='int8' for a complex parameter of shape {tuple(p.shape)}: "
                             "int8 state is kept for real parameters only; use state_dtype=None for it")


def check_new_group(opt, opt_name: str) -> None:
    """After ``Optimizer.add_param_group``: the new (last) group checked, and taken back when refused, so a
    refused group changes nothing. The first group also gets the seed counter (from construction on, so a
    fresh optimizer's state_dict is a complete template for DCP's in-place load)."""
    try:
        check_group(opt_name, opt.param_groups[-1])
    except ValueError:
        opt.param_groups.pop()
        raise
    opt.param_groups[0].setdefault(CALLS_KEY, 0)


# ------------------------------------------------------------------------------------ state tensors
def zeros(working: Tensor, state_dtype: Optional[torch.dtype], as_dtype: Optional[torch.dtype] = None) -> Tensor:
    """A new state tensor of ``working`` (the parameter or its master): zeros with its layout and placement
    (an FSDP2 DTensor's too), in its state dtype (that of a working tensor of dtype ``as_dtype`` if given:
    a parameter under a load/store master mode works in float32)."""
    return torch.zeros_like(working, dtype=dtype_for(as_dtype or working.dtype, state_dtype),
                            memory_format=torch.preserve_format)


def block_size(group: dict) -> int:
    return group.get(BLOCK_KEY, DEFAULT_BLOCK_SIZE)


def create(state: dict, key: str, working: Tensor, group: dict, as_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``state[key]``: a new state tensor of ``working`` (the parameter or its master) in the group's
    storage: zeros in the state dtype with its layout and placement, or, for int8 state, zero codes
    (contiguous: the kernels walk flat memory) and zero scales in ``state[key + "_scale"]``."""
    sd = group.get(KEY)
    if sd != INT8:
        state[key] = zeros(working, sd, as_dtype)
        return state[key]
    if _sharding.is_sharded(working):  # FSDP2: blocks per local shard (see sharding.py, "int8 state")
        state[key], state[key + SCALE] = _sharding.new_int8_state(
            working, dtype_for(as_dtype or working.dtype, sd, key), block_size(group))
        return state[key]
    state[key] = torch.zeros(working.shape, dtype=dtype_for(as_dtype or working.dtype, sd, key), device=working.device)
    state[key + SCALE] = torch.zeros(_bits.n_blocks(working.numel(), block_size(group)), dtype=F32, device=working.device)
    return state[key]


def matches(state: dict, key: str, working: torch.dtype, group: dict) -> bool:
    """``state[key]`` is stored as the group asks (its dtype; int8: codes and scales of its block size)."""
    sd, v = group.get(KEY), state[key]
    if v.dtype != dtype_for(working, sd, key):
        return False
    if sd != INT8:
        return True
    scale = state.get(key + SCALE)
    if scale is not None and _sharding.is_sharded(v):
        return _sharding.int8_scales_fit(v, v, scale, block_size(group)) is None
    return scale is not None and scale.numel() == _bits.n_blocks(v.numel(), block_size(group))


def decoded(state: dict, key: str, block: int) -> Tensor:
    """``state[key]`` as values: int8 codes decoded (float32) with their scales and block size ``block``,
    any other state tensor as it is."""
    v = state[key]
    if v.is_floating_point():
        return v
    if _sharding.is_sharded(v):
        raise TypeError("decoded: int8 state of an FSDP2 DTensor decodes shard by shard (conform)")
    return _bits.decode_int8(v, state[key + SCALE], block)


def conform(state: dict, working: torch.dtype, state_dtype, block: int = DEFAULT_BLOCK_SIZE,
            old_block: Optional[int] = None) -> None:
    """Convert a parameter's state moments (``MOMENTS``; float ones also under other keys, not ``step`` nor
    ``master_param``) to the storage of a working tensor of dtype ``working``: floats rounded to nearest
    (float32 -> bf16) or exactly (bf16 -> float32); int8 codes decoded (with ``old_block``, default
    ``block``) and/or encoded with block size ``block`` (nearest in the code domain)."""
    for k in list(state):
        v = state.get(k)
        if k in ("step", "master_param", "master_correction") or k.endswith(SCALE) or not isinstance(v, Tensor):
            continue
        if k not in MOMENTS:
            if v.is_floating_point() and state_dtype != INT8 and v.dtype != dtype_for(working, state_dtype):
                state[k] = v.to(dtype_for(working, state_dtype))
            continue
        want = dtype_for(working, state_dtype, k)
        if _sharding.is_sharded(v):
            _conform_sharded(state, k, want, state_dtype, block, old_block)
            continue
        scale = state.get(k + SCALE)
        if old_block is None and scale is not None and scale.numel() != _bits.n_blocks(v.numel(), block):
            raise ValueError(f"the int8 state '{k}' has {scale.numel()} block scales, not one per {block} elements: "
                             f"state_block_size changed after the state was made; set it before the first step, "
                             f"or load a checkpoint into an optimizer with the new block size")
        same_blocks = state_dtype != INT8 or (old_block or block) == block
        if v.dtype == want and same_blocks and (state_dtype != INT8 or k + SCALE in state):
            continue
        values = decoded(state, k, old_block or block)
        state.pop(k + SCALE, None)
        if state_dtype == INT8:
            state[k], state[k + SCALE] = _bits.encode_int8(values.to(F32), want == torch.int8, block)
        else:
            state[k] = values.to(want)


def _conform_sharded(state: dict, k: str, want: torch.dtype, state_dtype, block: int,
                     old_block: Optional[int]) -> None:
    """conform for the FSDP2 (DTensor) moment ``state[k]``: the same conversions on its local shard, whose
    int8 blocks start at the shard's element 0 (sharding.py, "int8 state"); the result keeps its placement."""
    v, scale = state[k], state.get(k + SCALE)
    src = old_block or block
    if scale is not None:
        problem = _sharding.int8_scales_fit(v, v, scale, src)
        if problem is not None:
            raise ValueError(f"the int8 state '{k}' of an FSDP2 parameter does not fit its layout for "
                             f"state_block_size {src}: {problem}; the block size (and the mesh) must stay the "
                             f"ones the state was made with, or load a checkpoint into an optimizer with the new one")
    if v.dtype == want and (state_dtype != INT8 or (scale is not None and src == block)):
        return
    lv = _sharding.local(v)
    values = lv if scale is None else _bits.decode_int8(lv, _sharding.local_scales(scale, v, src), src)
    state.pop(k + SCALE, None)
    if state_dtype == INT8:
        codes, scales = _bits.encode_int8(values.to(F32), want == torch.int8, block)
        state[k], state[k + SCALE] = _sharding.int8_to_dtensor(v, codes, scales, block)
    else:
        state[k] = _sharding.int8_to_dtensor(v, values.to(want), None, block)[0]


def has_dtype(states: Sequence[Tensor], working: Sequence[Tensor], state_dtype) -> bool:
    """Every state tensor has the float state dtype of its working tensor (a plan is built only then; int8
    state is checked key by key with ``matches``: step_plan._int8_plan)."""
    return state_dtype != INT8 and all(s.dtype == dtype_for(w.dtype, state_dtype) for s, w in zip(states, working))


def settings(opt) -> List[tuple]:
    """Each group's storage setting (state dtype, block size), kept across load_state_dict."""
    return [(g.get(KEY), g.get(BLOCK_KEY)) for g in opt.param_groups]


def check_groups(opt_name: str, opt) -> None:
    for group in opt.param_groups:
        check_group(opt_name, group)


def _saved_pairs(opt, state_dict):
    """(parameter, its group, the checkpoint's group, its saved state or None) in load_state_dict's order."""
    for group, saved_group in zip(opt.param_groups, state_dict["param_groups"]):
        for p, pid in zip(group["params"], saved_group["params"]):
            yield p, group, saved_group, state_dict["state"].get(pid)


def check_checkpoint(opt_name: str, opt, state_dict) -> None:
    """Before ``Optimizer.load_state_dict`` changes anything: the checkpoint's int8 state fits its parameters
    (codes of the parameter's shape and code dtype, float32 scales, one per block of the checkpoint's
    ``state_block_size``); a ValueError naming the parameter otherwise."""
    if len(state_dict["param_groups"]) != len(opt.param_groups):
        return  # (torch's own check names it)
    for i, (p, _group, saved_group, saved) in enumerate(_saved_pairs(opt, state_dict)):
        if not saved:
            continue
        block = saved_group.get(BLOCK_KEY, DEFAULT_BLOCK_SIZE)
        for k in MOMENTS:
            v = saved.get(k)
            if isinstance(v, Tensor) and _sharding.is_sharded(p) != _sharding.is_sharded(v):
                raise ValueError(f"{opt_name}.load_state_dict: parameter {i} (shape {tuple(p.shape)}) is "
                                 f"{'an FSDP2 DTensor' if _sharding.is_sharded(p) else 'a plain tensor'} but its "
                                 f"state '{k}' is {'a DTensor' if _sharding.is_sharded(v) else 'a plain tensor'}: "
                                 f"load FSDP2 state with torch.distributed.checkpoint (set_optimizer_state_dict)")
            if (isinstance(v, Tensor) and v.is_floating_point() and _sharding.is_sharded(v)
                    and saved_group.get(KEY) == INT8 and k + SCALE not in saved):
                # DCP loads in place into this optimizer's state_dict: its float template took the int8
                # codes as numbers (the group's setting and the keys travel with the checkpoint, the scales
                # only where the template has them).
                raise ValueError(f"{opt_name}.load_state_dict: parameter {i} (shape {tuple(p.shape)}): the "
                                 f"checkpoint was saved with state_dtype='int8' but its state '{k}' arrives as "
                                 f"{v.dtype} without '{k}{SCALE}': torch.distributed.checkpoint loaded the int8 "
                                 f"codes into this optimizer's {v.dtype} state as numbers. Load it into an optimizer "
                                 f"with state_dtype='int8' (on a mesh of the same shape), then set the group's "
                                 f"state_dtype to convert at the next step (an int8 group's state saved before "
                                 f"its first step under the setting: take that step before saving)")
            if not isinstance(v, Tensor) or v.is_floating_point():
                continue
            where = f"{opt_name}.load_state_dict: parameter {i} (shape {tuple(p.shape)}): int8 state '{k}'"
            scale = saved.get(k + SCALE)
            if v.dtype != _bits.CODE_DTYPES[LIST_OF[k]] or v.shape != p.shape:
                raise ValueError(f"{where} has dtype {v.dtype} and shape {tuple(v.shape)}; expected "
                                 f"{_bits.CODE_DTYPES[LIST_OF[k]]} codes of the parameter's shape")
            try:
                block = check_block_size(block)
            except ValueError as e:
                raise ValueError(f"{where}: the checkpoint's {e}") from None
            if _sharding.is_sharded(p) or _sharding.is_sharded(v):  # FSDP2: per-shard blocks (sharding.py)
                problem = (_sharding.int8_scales_fit(p, v, scale, block) if isinstance(scale, Tensor)
                           else f"no '{k}{SCALE}'")
                if problem is not None:
                    raise ValueError(f"{where} does not fit this parameter's FSDP2 layout with the checkpoint's "
                                     f"state_block_size {block}: {problem}. An int8 checkpoint loads on a mesh of "
                                     f"the shape it was saved on (DCP, in place)")
                continue
            if not isinstance(scale, Tensor) or scale.dtype != F32 or scale.numel() != _bits.n_blocks(v.numel(), block):
                raise ValueError(f"{where} needs '{k}{SCALE}': float32, {_bits.n_blocks(v.numel(), block)} scales (one per "
                                 f"block of {block}); the checkpoint has "
                                 f"{'none' if not isinstance(scale, Tensor) else f'{scale.numel()} of {scale.dtype}'}")


def _is_int8_entry(key, value: Tensor) -> bool:
    """A saved entry of int8 state: codes (a moment that is not floating) or their scales."""
    return key in MOMENTS and not value.is_floating_point() or isinstance(key, str) and key.endswith(SCALE)


def keep_after_load(opt, kept: Sequence[tuple], state_dict=None) -> None:
    """After ``Optimizer.load_state_dict`` (and master_weights.keep_master_state): each group keeps this
    optimizer's ``state_dtype`` and block size (a storage choice, like ``master_weights``, not the
    checkpoint's), and its state is converted to it (torch cast every floating state tensor to its
    parameter's dtype, which is exact for bf16 state beside fp32 parameters: a checkpoint of this
    optimizer loads bit for bit; an fp32-state checkpoint loads into a bf16-state optimizer rounded to
    nearest; int8 codes and scales are taken back from ``state_dict`` as they were saved; int8 codes are decoded
    with the checkpoint's block size, values encoded with this optimizer's). The seed counter comes from
    the checkpoint (0 for one without it)."""
    saved_blocks = {}
    if state_dict is not None and len(state_dict["param_groups"]) == len(opt.param_groups):
        for p, _group, saved_group, saved in _saved_pairs(opt, state_dict):
            saved_blocks[p] = saved_group.get(BLOCK_KEY, DEFAULT_BLOCK_SIZE)
            st = opt.state.get(p)
            for k, v in (saved or {}).items():  # (torch cast int8 codes and scales to p's dtype)
                if st is not None and isinstance(v, Tensor) and _is_int8_entry(k, v):
                    st[k] = v.to(device=p.device, copy=True)
    for group, (sd, block) in zip(opt.param_groups, kept):
        group[KEY] = sd
        if block is None:
            group.pop(BLOCK_KEY, None)
        else:
            group[BLOCK_KEY] = block
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                master = st.get("master_param")
                conform(st, master.dtype if isinstance(master, Tensor) else working_dtype(group, p), sd, block_size(group),
                        saved_blocks.get(p))
    if opt.param_groups:
        opt.param_groups[0].setdefault(CALLS_KEY, 0)


def op_kwargs(names: Sequence[str], scale_lists: Sequence[Sequence[Tensor]], block: int) -> dict:
    """The int8 keywords of one launch: the scale lists of the op's state lists ``names`` ("exp_avgs", ...)
    and the block size; {} without scale lists (state that is not int8: the op is called as before)."""
    if not scale_lists:
        return {}
    out = {_bits.SCALES_ARG[n]: list(l) for n, l in zip(names, scale_lists)}
    out["block_size"] = block
    return out


def scale_lists(*lists: Optional[Sequence[Tensor]]) -> List[Sequence[Tensor]]:
    """The scale lists given (None: a state list that is not int8, or absent); [] when none is."""
    return [l for l in lists if l is not None]


def with_scales(names: Sequence[str]) -> List[str]:
    """``names`` (op lists: "exp_avgs", ...) followed by the names of the scale lists of their state lists."""
    return list(names) + [_bits.SCALES_ARG[n] for n in names if n in _bits.SCALES_ARG]


def split_scales(names: Sequence[str], lists: Sequence[Sequence], block: int) -> tuple:
    """(the lists ``names``, the int8 keywords of the launch) from lists of ``with_scales(names)``; scale
    lists of None entries (state that is not int8) give {}."""
    n = len(names)
    scale_lists = lists[n:]
    if not scale_lists or not len(scale_lists[0]) or scale_lists[0][0] is None:
        return lists[:n], {}
    return lists[:n], op_kwargs([x for x in names if x in _bits.SCALES_ARG], scale_lists, block)


def values(codes: Tensor, scale: Optional[Tensor], block: int) -> Tensor:
    """A state tensor's values: int8 codes decoded with their ``scale`` (float32), a float tensor itself."""
    return codes if scale is None else _bits.decode_int8(codes, scale, block)


def scales(state: dict, key: str, block: int) -> Optional[Tensor]:
    """The scales of ``state[key]`` as the kernels take them (None unless it is int8; of an FSDP2 DTensor,
    the local shard's: sharding.local_scales)."""
    scale = state.get(key + SCALE)
    return scale if scale is None else _sharding.local_scales(scale, state[key], block)


# ------------------------------------------------------------------------------------------- seeds
def _mix(x: int) -> int:
    return _bits.fmix32(x & _M32) & 0x7FFFFFFF  # 0 <= seed < 2**31 (the ops' contract)


class StepSeeds:
    """The seeds of one step() call: ``next(group)`` gives each state-writing launch of a bf16-state
    group its own seed (the launch's ordinal in the step mixed in), None for any other group."""

    __slots__ = ("_key", "_ordinal")

    def __init__(self, calls: Optional[int]):
        self._key = None if calls is None else (BASE_SEED + calls * 0x9E3779B9) & _M32
        self._ordinal = 0

    def next(self, group: dict) -> Optional[int]:
        if self._key is None or group.get(KEY) != BF16:
            return None
        self._ordinal += 1
        return _mix(self._key + self._ordinal * 0x632BE5AB)


NO_SEEDS = StepSeeds(None)


def draws_seeds(opt) -> bool:
    """Some group keeps bf16 state (its steps draw seeds)."""
    return any(g.get(KEY) == BF16 for g in opt.param_groups)


def step_seeds(opt) -> StepSeeds:
    """This step() call's seeds: the counter advanced once (host ints only, no device sync) when some group
    keeps bf16 state; NO_SEEDS (and nothing touched) otherwise."""
    if not draws_seeds(opt):
        return NO_SEEDS
    first = opt.param_groups[0]
    calls = int(first.get(CALLS_KEY, 0))
    first[CALLS_KEY] = calls + 1
    return StepSeeds(calls)


def seed_kwarg(state_seed: Optional[int], bucket: int, state_list: Sequence[Tensor]) -> dict:
    """The ``state_seed`` keyword of one launch: given only with a seed and a bf16 state list (else {}:
    the op is called as before). Bucket k > 0 of one functional call mixes k into the seed."""
    if state_seed is None or not len(state_list) or state_list[0].dtype != BF16:
        return {}
    return {"state_seed": state_seed if bucket == 0 else _mix(state_seed + bucket * 0x2545F491)}
