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

Int8 state (issue 24 phase 2, /work/notes/issue24_int8_spec.md): the state lists hold codes (int8 for m and
momentum buffers, uint8 for v and max v) with one float32 scale per block of ``block_size`` elements of each
tensor's flat (contiguous) memory, the block's absmax; ``encode_int8`` / ``decode_int8`` below are the binding
codec, float32 operation for operation:

    signed  (m): decode x = ((scale * s) * s) * sign(q), s = |q| / 127  (* sign: a negation for q < 0)
                 encode q = clamp(sign(y) * rint(127 * sqrt(|y| * inv)), -127, 127)
    unsigned(v): decode x = (scale * (s * s)) * (s * s), s = q / 255
                 encode q = clamp(rint(255 * sqrt(sqrt(y * inv))), 0, 255)
    scale = max |y| over the block (the NaN of bits 0x7FC00000 if any y is NaN), inv = 1 / scale (0 if scale == 0),
    rint rounds half to even; a code whose value is NaN (a NaN or inf in the block: NaN * x, inf * 0;
    0 * inf under a subnormal scale) is stored as 0.
So a block holding a NaN or an inf decodes to NaN everywhere (scale NaN, or inf * 0).
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

Bits = Union[int, Tensor]

# ------------------------------------------------------------------------------------------- int8 state
INT8 = "int8"  # what check_state_dtypes returns for code lists
CODE_DTYPES = {"exp_avgs": torch.int8, "momentum_buffers": torch.int8,
               "exp_avg_sqs": torch.uint8, "max_exp_avg_sqs": torch.uint8}
SCALES_ARG = {"exp_avgs": "exp_avg_scales", "momentum_buffers": "momentum_buffer_scales",
              "exp_avg_sqs": "exp_avg_sq_scales", "max_exp_avg_sqs": "max_exp_avg_sq_scales"}
INT8_PARAM_DTYPES = (F32, F16, BF16)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, DEFAULT_BLOCK_SIZE = 32, 4096, 256
# |q| / 127 and q / 255 in float32 (a double quotient rounded once to float32 is the float32 quotient)
_S127 = torch.tensor([k / 127 for k in range(129)], dtype=F32)
_S255 = torch.tensor([k / 255 for k in range(256)], dtype=F32)
_NAN = float("nan")  # float32 bits 0x7FC00000, the scale of a block holding a NaN  # a uint32 value held in a Python int or an int64 tensor


def check_state_dtypes(op: str, params: Sequence[Tensor], state_lists: Dict[str, Optional[Sequence[Tensor]]],
                       scales: Optional[Dict[str, Optional[Sequence[Tensor]]]] = None,
                       block_size: int = DEFAULT_BLOCK_SIZE) -> Union[None, torch.dtype, str]:
    """Every state tensor shares one dtype that params[0]'s dtype may pair with, or every state list holds
    int8/uint8 codes with their ``scales`` (keyed by the state list's name); raises a ValueError naming the
    list otherwise. Returns the state dtype, INT8 for codes (None without params or state)."""
    scales = scales or {}
    if any(t.dtype in (torch.int8, torch.uint8) for tensors in state_lists.values() for t in (tensors or ())):
        check_int8_state(op, params, state_lists, scales, block_size)
        return INT8
    for name, given in scales.items():
        if given is not None:
            raise ValueError(f"{op}: {SCALES_ARG[name]} given but {name} does not hold int8 codes (scales go "
                             "only with int8 / uint8 state)")
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
                                     f"allowed (param, state) dtype pairs are {PAIRS_TEXT}, or int8 codes "
                                     "(int8 m / momentum, uint8 v) with float32/float16/bfloat16 params")
            elif t.dtype != state_dtype:
                raise ValueError(f"{op}: {name}[{i}] has dtype {t.dtype} but {first} has {state_dtype}; all "
                                 "optimizer-state tensors of one call must share a dtype")
    return state_dtype


def check_block_size(op: str, block_size: int) -> None:
    ok = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not (ok and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0):
        raise ValueError(f"{op}: block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], "
                         f"got {block_size!r}")


def n_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def check_int8_state(op: str, params: Sequence[Tensor], state_lists: Dict[str, Optional[Sequence[Tensor]]],
                     scales: Dict[str, Optional[Sequence[Tensor]]], block_size: int) -> None:
    """Int8 state: every list codes of its dtype (CODE_DTYPES), contiguous, one per param with its numel, and
    its scales: float32, contiguous, [ceil(numel / block_size)], on the codes' device."""
    check_block_size(op, block_size)
    if len(params) and params[0].dtype not in INT8_PARAM_DTYPES:
        raise ValueError(f"{op}: int8 state needs float32, float16 or bfloat16 params; params[0] has "
                         f"{params[0].dtype}")
    for name, codes in state_lists.items():
        given = scales.get(name)
        if codes is None:
            if given is not None:
                raise ValueError(f"{op}: {SCALES_ARG[name]} given without {name}")
            continue
        want = CODE_DTYPES[name]
        if given is None:
            raise ValueError(f"{op}: {name} holds int8 codes but {SCALES_ARG[name]} is not given (int8 state "
                             "needs one float32 scale tensor per code tensor)")
        if len(given) != len(codes):
            raise ValueError(f"{op}: {SCALES_ARG[name]} has {len(given)} tensors but {name} has {len(codes)}")
        for i, (q, scale) in enumerate(zip(codes, given)):
            if q.dtype != want:
                raise ValueError(f"{op}: {name}[{i}] has dtype {q.dtype}; with int8 state {name} holds {want} "
                                 "codes (int8 for exp_avgs / momentum_buffers, uint8 for exp_avg_sqs / "
                                 "max_exp_avg_sqs)")
            if not q.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] (int8 codes) must be contiguous: its blocks are runs of "
                                 "its flat memory")
            if i < len(params) and q.numel() != params[i].numel():
                raise ValueError(f"{op}: {name}[{i}] has {q.numel()} elements but params[{i}] has "
                                 f"{params[i].numel()}")
            nb = n_blocks(q.numel(), block_size)
            where = f"{op}: {SCALES_ARG[name]}[{i}]"
            if scale.dtype != F32:
                raise ValueError(f"{where} has dtype {scale.dtype}; scales are float32")
            if scale.device != q.device:
                raise ValueError(f"{where} is on {scale.device} but {name}[{i}] is on {q.device}")
            if tuple(scale.shape) != (nb,) or not scale.is_contiguous():
                raise ValueError(f"{where} has shape {tuple(scale.shape)}; expected a contiguous [{nb}] "
                                 f"(ceil({q.numel()} / block_size {block_size}))")


def decode_int8(codes: Tensor, scales: Tensor, block_size: int) -> Tensor:
    """The float32 values (codes' shape) of int8 (signed, m) or uint8 (unsigned, v) codes."""
    n = codes.numel()
    scale = scales.to(F32).repeat_interleave(block_size)[:n]
    q = codes.reshape(-1).to(torch.int64)
    if codes.dtype == torch.int8:
        s = _S127.to(codes.device)[q.abs()]
        mag = scale * s * s
        x = torch.where(q < 0, -mag, mag)  # * sign(q): a negation, and q == 0 keeps scale * 0 * 0
    else:
        s = _S255.to(codes.device)[q]
        s2 = s * s
        x = scale * s2 * s2
    return x.view(codes.shape)


def _sqrt32(x: Tensor) -> Tensor:
    """The correctly rounded float32 sqrt (sqrtf, sqrt.rn.f32): through float64, rounded once (exact for sqrt).
    torch's float32 CPU sqrt is not always correctly rounded (torch 2.13, AVX-512: ~20 % of random inputs
    one ulp off), which would move codes at ties."""
    return x.double().sqrt().float()


def encode_int8(y: Tensor, signed: bool, block_size: int) -> tuple[Tensor, Tensor]:
    """(codes of y's shape, float32 scales [ceil(numel / block_size)]) of the float32 values y."""
    flat = y.reshape(-1).to(F32)
    n = flat.numel()
    nb = n_blocks(n, block_size)
    a = flat.abs()
    scale = torch.nn.functional.pad(a, (0, nb * block_size - n)).view(nb, block_size).amax(dim=1)
    scale = torch.where(torch.isnan(scale), torch.full_like(scale, _NAN), scale)  # one NaN: bits 0x7FC00000
    inv = torch.where(scale == 0, torch.zeros_like(scale), torch.ones_like(scale) / scale)
    inv = inv.repeat_interleave(block_size)[:n]
    if signed:
        q = (torch.sign(flat) * torch.round(_sqrt32(a * inv) * 127)).clamp(-127, 127)
    else:
        q = torch.round(_sqrt32(_sqrt32(flat * inv)) * 255).clamp(0, 255)
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8 if signed else torch.uint8)
    return q.view(y.shape), scale


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
                keep: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """dst <- value: int8 codes (``scale`` given: dst's scales, rewritten too) encoded with encode_int8, bf16
    state with a seed stochastically rounded, anything else to nearest.
    ``keep`` (0-d bool): a select, the step may be skipped without the host reading it."""
    if scale is not None:
        codes, new_scale = encode_int8(value, dst.dtype == torch.int8, block_size)
        if keep is not None:
            codes, new_scale = torch.where(keep, codes, dst), torch.where(keep, new_scale, scale)
        dst.copy_(codes)
        scale.copy_(new_scale)
        return
    if state_seed is not None and dst.dtype == BF16:
        value = stochastic_round_bf16(value, state_seed, tensor_index, STATE_LIST[list_name], memory_index(dst))
    if keep is not None:
        value = torch.where(keep, value.to(dst.dtype), dst)
    if value is not dst:
        dst.copy_(value)
