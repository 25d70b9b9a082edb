"""Stores into optimizer state (issue 24): to nearest, or, for bf16 state given a seed, stochastically
rounded with the bits of csrc/include/svi_kernels/state_storage.h (uint32 arithmetic, wrapping;
svi_kernels/backends/state_storage.py has the same bits in PyTorch and the formulas).

The state lists may have another dtype (STATE_DTYPE) than the params; each kernel loads them into
the compute dtype like any other input, so only the store differs.
"""
import triton.language as tl

from .ieee import to_storage
from .runtime import device_function


@device_function
def fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 (>> is a logical shift on unsigned values)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@device_function
def sr_key(state_seed, t):
    """The key of tensor ``t`` (its index in the call) for this call's seed."""
    return fmix32(state_seed.to(tl.uint32) + t.to(tl.uint32) * 0x9E3779B9)


@device_function
def store_state(ptr, offs, mask, x, key, LIST: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr):
    """*(ptr + offs) <- x (compute dtype). SR: bf16 bits = (float_bits(x) + r) >> 16 with r the top 16 bits of
    fmix32(key + LIST * 0x7F4A7C15 + offs * 0x9E3779B1); offs is the flat index inside the tensor, so the bits do
    not depend on chunks or blocks. LIST: 0 exp_avgs / momentum_buffers, 1 exp_avg_sqs, 2 max_exp_avg_sqs."""
    if SR:
        salt = tl.full([], LIST * 0x7F4A7C15, tl.uint32)
        r = fmix32(key + salt + offs.to(tl.uint32) * 0x9E3779B1) >> 16
        bits = ((x.to(tl.uint32, bitcast=True) + r) >> 16).to(tl.uint16)
        value = tl.where(x != x, to_storage(x, STATE_DTYPE), bits.to(tl.bfloat16, bitcast=True))
    else:
        value = to_storage(x, STATE_DTYPE)
    tl.store(ptr + offs, value, mask=mask)
