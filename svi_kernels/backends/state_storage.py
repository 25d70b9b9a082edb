"""How optimizer state is stored (issue 24): the allowed (param dtype, state dtype) pairs, their
check, and the stochastic rounding (SR) of bf16 state in plain PyTorch.

The SR bits are those of csrc/include/svi_kernels/state_storage.h and of the Triton mirror
(svi_kernels/triton/state_storage.py), bit for bit: uint32 arithmetic, here on int64 tensors (or
Python ints) masked to 32 bits, every product split so that no int64 overflows.

    fmix32(x):  x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    key_t     = fmix32(seed + t * 0x9E3779B9)                      t: the tensor's index in the call
    r(t,l,i)  = fmix32(key_t + l * 0x7F4A7C15 + i * 0x9E3779B1) >> 16   l: STATE_LIST, i: flat index
    bf16 bits = (float_bits(x) + r) >> 16, NaN rounded to nearest

Adding a uniform 16-bit r below the bf16 mantissa and truncating rounds up with probability
(fraction dropped) / 2^16: unbiased, so a bf16 v of Adam with beta2 = 0.999 (a change of 0.1 % a
step, under half a bf16 ulp) follows the float32 v instead of sticking (tests/backends/test_state_storage_ops.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch._prims_common as _prims
from torch import Tensor

_M32 = 0xFFFFFFFF
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

# param/grad dtype -> the state dtypes it may have (the first: today's, the param dtype itself)
STATE_DTYPES: Dict[torch.dtype, tuple] = {F32: (F32, BF16), F64: (F64,), F16: (F16, F32), BF16: (BF16, F32)}
PAIRS_TEXT = ("(float32, float32), (float32, bfloat16), (float64, float64), (float16, float16), "
              "(float16, float32), (bfloat16, bfloat16), (bfloat16, float32)")

# The list salt l of the SR bits.
STATE_LIST = {"exp_avgs": 0, "momentum_buffers": 0, "exp_avg_sqs": 1, "max_exp_avg_sqs": 2}
SEED_LIMIT = 2 ** 31

Bits = Union[int, Tensor]  # a uint32 value held in a Python int or an int64 tensor


def check_state_dtypes(op: str, params: Sequence[Tensor], state_lists: Dict[str, Optional[Sequence[Tensor]]]
                       ) -> Optional[torch.dtype]:
    """Every state tensor shares one dtype that params[0]'s dtype may pair with; raises a ValueError
    naming the list otherwise. Returns the state dtype (None without params or state)."""
    if not len(params):
        return None
    param_dtype = params[0].dtype
    allowed = STATE_DTYPES.get(param_dtype, ())
    state_dtype, first = None, ""
    for name, tensors in state_lists.items():
        for i, t in enumerate(tensors or ()):
            if state_dtype is None:
                state_dtype, first = t.dtype, f"{name}[{i}]"
                if t.dtype not in allowed:
                    raise ValueError(f"{op}: {first} has dtype {t.dtype} but params[0] has {param_dtype}; the "
                                     f"allowed (param, state) dtype pairs are {PAIRS_TEXT}")
            elif t.dtype != state_dtype:
                raise ValueError(f"{op}: {name}[{i}] has dtype {t.dtype} but {first} has {state_dtype}; all "
                                 "optimizer-state tensors of one call must share a dtype")
    return state_dtype


def check_state_seed(op: str, state_seed: Optional[int]) -> None:
    if state_seed is not None and not (isinstance(state_seed, int) and 0 <= state_seed < SEED_LIMIT):
        raise ValueError(f"{op}: state_seed must be None or an int in [0, 2**31), got {state_seed!r}")


def _mul32(x: Bits, c: int) -> Bits:
    """(x * c) mod 2^32 for x < 2^32, in two 16-bit halves of c (no int64 overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def fmix32(x: Bits) -> Bits:
    """MurmurHash3's 32-bit finaliser."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def sr_key(state_seed: int, tensor_index: int) -> int:
    return fmix32((state_seed + _mul32(tensor_index & _M32, 0x9E3779B9)) & _M32)


def sr_bits(key: int, list_id: int, index: Tensor) -> Tensor:
    """The 16 random bits (0..65535, int64) of the elements at flat ``index`` (int64) of one tensor."""
    salt = _mul32(list_id, 0x7F4A7C15)
    return fmix32((key + salt + _mul32(index & _M32, 0x9E3779B1)) & _M32) >> 16


def memory_index(t: Tensor) -> Tensor:
    """Each element's offset in ``t``'s memory (int64, ``t``'s shape): the flat index the kernels use,
    which walk a dense tensor in memory order (a channels_last state tensor is not walked in its
    logical order). Equal to the logical flat index for a contiguous tensor."""
    index = torch.arange(t.numel(), device=t.device)
    if t.is_contiguous() or not _prims.is_non_overlapping_and_dense_or_false(t):
        return index.view(t.shape)
    return index.as_strided(t.shape, t.stride())


def stochastic_round_bf16(x: Tensor, state_seed: int, tensor_index: int, list_id: int,
                          index: Optional[Tensor] = None) -> Tensor:
    """float32 ``x`` rounded stochastically to bfloat16; element bits by ``index`` (``memory_index`` of the
    destination; default: the logical flat index)."""
    x = x.to(torch.float32)
    if index is None:
        index = torch.arange(x.numel(), device=x.device).view(x.shape)
    r = sr_bits(sr_key(state_seed, tensor_index), list_id, index)
    u = x.view(torch.int32).to(torch.int64) & _M32
    bits = ((u + r) & _M32) >> 16
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)  # uint16 as int16
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), bits.view(torch.bfloat16))


def store_state(dst: Tensor, value: Tensor, state_seed: Optional[int], tensor_index: int, list_name: str,
                keep: Optional[Tensor] = None) -> None:
    """dst <- value: bf16 state with a seed stochastically rounded, anything else to nearest.
    ``keep`` (0-d bool): a select, the step may be skipped without the host reading it."""
    if state_seed is not None and dst.dtype == BF16:
        value = stochastic_round_bf16(value, state_seed, tensor_index, STATE_LIST[list_name], memory_index(dst))
    if keep is not None:
        value = torch.where(keep, value.to(dst.dtype), dst)
    if value is not dst:
        dst.copy_(value)
