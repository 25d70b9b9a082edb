"""How an optimizer stores its state (issue 24): the ``state_dtype=`` setting of AdamW, SVI, AdamSLS, SaLSA
and LayerwiseAdamSLS (param group key ``"state_dtype"``).

- ``None``: the state has the dtype of its working tensor (the parameter, or its float32 master under
  ``master_weights``), as before.
- ``torch.float32``: float32 state beside fp16/bf16 (or fp32) working tensors.
- ``torch.bfloat16``: bf16 state beside fp32 (or bf16) working tensors, 2 B per value. The kernels compute
  in float32 and store with stochastic rounding (SR): with beta2 = 0.999 a step changes v by 0.1 %, below
  half a bf16 ulp (0.2 %), so rounded to nearest v would never decay; SR keeps the stored value unbiased.

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

_bits = importlib.import_module("svi_kernels.backends.state_storage")  # fmix32: the SR hash of every backend

KEY = "state_dtype"  # the per-group setting
CALLS_KEY = "state_seed_calls"  # param_groups[0]: step() calls that drew seeds
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SUPPORTED_TEXT = "None (the working tensor's dtype), torch.float32 or torch.bfloat16"
BASE_SEED = 0x5EED0024
_M32 = 0xFFFFFFFF


# -------------------------------------------------------------------------------------------- checks
def check_value(value) -> Optional[torch.dtype]:
    """A ``state_dtype`` as given (constructor or param group): the value, or a ValueError."""
    if value is None or (isinstance(value, torch.dtype) and value in (F32, BF16)):
        return value
    if isinstance(value, str) and value.lower() == "int8":
        raise ValueError(f"state_dtype='int8' (blockwise 8-bit state) is not supported yet; "
                         f"supported: {SUPPORTED_TEXT}")
    raise ValueError(f"Invalid state_dtype {value!r}: supported: {SUPPORTED_TEXT}")


def working_dtype(group: dict, p: Tensor) -> torch.dtype:
    """The dtype of the tensor the fused op updates for ``p``: float32 for an fp16/bf16 ``p`` under
    ``master_weights`` (its master), else ``p``'s."""
    return F32 if group.get("master_weights") and p.dtype in (F16, BF16) else p.dtype


def _pair_problem(working: torch.dtype, state_dtype: torch.dtype) -> Optional[str]:
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


def dtype_for(working: torch.dtype, state_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of the state of a working tensor of dtype ``working``; ValueError for a pair no kernel has."""
    if state_dtype is None:
        return working
    problem = _pair_problem(working, state_dtype)
    if problem is not None:
        raise ValueError(f"state_dtype={state_dtype}: {problem}")
    return state_dtype


def check_group(opt_name: str, group: dict) -> None:
    """Every refusal of a group's ``state_dtype`` (value, flags, parameter dtypes), with the reason."""
    sd = group.get(KEY)
    try:
        check_value(sd)
    except ValueError as e:
        raise ValueError(f"{opt_name}: {e}") from None
    if sd is None:
        return
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
def zeros(working: Tensor, state_dtype: Optional[torch.dtype]) -> Tensor:
    """A new state tensor of ``working`` (the parameter or its master): zeros with its layout and placement
    (an FSDP2 DTensor's too), in its state dtype."""
    return torch.zeros_like(working, dtype=dtype_for(working.dtype, state_dtype), memory_format=torch.preserve_format)


def conform(state: dict, working: torch.dtype, state_dtype: Optional[torch.dtype]) -> None:
    """Convert a parameter's floating state tensors (not ``step``, not ``master_param``) to the state dtype
    of a working tensor of dtype ``working``, rounding to nearest (float32 -> bf16) or exactly (bf16 -> float32)."""
    want = dtype_for(working, state_dtype)
    for k, v in state.items():
        if k != "step" and k != "master_param" and isinstance(v, Tensor) and v.is_floating_point() and v.dtype != want:
            state[k] = v.to(want)


def has_dtype(states: Sequence[Tensor], working: Sequence[Tensor], state_dtype: Optional[torch.dtype]) -> bool:
    """Every state tensor has the state dtype of its working tensor (a plan is built only then)."""
    return all(s.dtype == dtype_for(w.dtype, state_dtype) for s, w in zip(states, working))


def settings(opt) -> List[Optional[torch.dtype]]:
    return [g.get(KEY) for g in opt.param_groups]


def check_groups(opt_name: str, opt) -> None:
    for group in opt.param_groups:
        check_group(opt_name, group)


def keep_after_load(opt, kept: Sequence[Optional[torch.dtype]]) -> None:
    """After ``Optimizer.load_state_dict`` (and master_weights.keep_master_state): each group keeps this
    optimizer's ``state_dtype`` (a storage choice, like ``master_weights``, not the checkpoint's), and
    its state is converted to it (torch cast every floating state tensor to its parameter's dtype, which
    is exact for bf16 state beside fp32 parameters: a checkpoint of this optimizer loads bit for bit; an
    fp32-state checkpoint loads into a bf16-state optimizer rounded to nearest). The seed counter comes
    from the checkpoint (0 for one without it)."""
    for group, sd in zip(opt.param_groups, kept):
        group[KEY] = sd
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                master = st.get("master_param")
                conform(st, master.dtype if isinstance(master, Tensor) else p.dtype, sd)
    if opt.param_groups:
        opt.param_groups[0].setdefault(CALLS_KEY, 0)


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
