"""Stores into optimizer state (issue 24): to nearest, or, for bf16 state given a seed, stochastically
rounded with the bits of csrc/include/svi_kernels/state_storage.h (uint32 arithmetic, wrapping;
svi_kernels/backends/state_storage.py has the same bits in PyTorch and the formulas).

The state lists may have another dtype (STATE_DTYPE) than the params; each kernel loads them into
the compute dtype like any other input, so only the store differs.
"""
import triton.language as tl

from .ieee import div_rn, sqrt_rn, to_storage
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
def store_state(ptr, offs, mask, x, key, LIST: tl.constexpr, STATE_DTYPE: tl.constexpr, SR: tl.constexpr,
                scale_ptr, QBLOCK: tl.constexpr):
    """*(ptr + offs) <- x (compute dtype): int8 codes and their scales (STATE_DTYPE uint8: store_int8), or
    stored to nearest, or SR: bf16 bits = (float_bits(x) + r) >> 16 with r the top 16 bits of
    fmix32(key + LIST * 0x7F4A7C15 + offs * 0x9E3779B1); offs is the flat index inside the tensor, so the bits do
    not depend on chunks or blocks. LIST: 0 exp_avgs / momentum_buffers, 1 exp_avg_sqs, 2 max_exp_avg_sqs."""
    if STATE_DTYPE == tl.uint8:
        store_int8(ptr, scale_ptr, offs, mask, x, LIST == 0, QBLOCK)
    elif SR:
        salt = tl.full([], LIST * 0x7F4A7C15, tl.uint32)
        r = fmix32(key + salt + offs.to(tl.uint32) * 0x9E3779B1) >> 16
        bits = ((x.to(tl.uint32, bitcast=True) + r) >> 16).to(tl.uint16)
        tl.store(ptr + offs, tl.where(x != x, to_storage(x, STATE_DTYPE), bits.to(tl.bfloat16, bitcast=True)),
                 mask=mask)
    else:
        tl.store(ptr + offs, to_storage(x, STATE_DTYPE), mask=mask)


# ---------------------------------------------------------------------------------------- int8 state
# Int8 state (issue 24 phase 2): the codec of csrc/include/svi_kernels/int8_state.h and of
# backends/state_storage.py (encode_int8 / decode_int8), float32 operation for operation. The kernels see
# the codes of every state list through uint8 pointers (STATE_DTYPE == tl.uint8; the signed ones are
# bitcast to int8), and each list's float32 block scales through a second pointer table (scales_ptr).
# A tile of the kernels is a whole number of quantisation blocks (QBLOCK elements, tile starts at
# multiples of the tile), so a store reshapes the tile to [tile / QBLOCK, QBLOCK] and takes one absmax
# (tl.max) per row, all in registers.
@device_function
def scales_ptr(sptrs, t, LIST: tl.constexpr, N_LISTS: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """The float32 scales of tensor ``t``'s list ``LIST`` (int8 state), else an unused pointer."""
    if STATE_DTYPE == tl.uint8:
        return tl.load(sptrs + t * N_LISTS + LIST).to(tl.pointer_type(tl.float32))
    else:
        return sptrs.to(tl.pointer_type(tl.float32))


@device_function
def _negate(x):
    """-x by its sign bit (as C's unary minus: -0.0 and the NaN's sign too)."""
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@device_function
def load_state(ptr, scale_ptr, offs, mask, SIGNED: tl.constexpr, STATE_DTYPE: tl.constexpr,
               COMPUTE: tl.constexpr, QBLOCK: tl.constexpr):
    """A state list's values in the compute dtype: int8 codes (STATE_DTYPE uint8) decoded with their block's
    scale, signed (m: scale * s * s * sign(q), s = |q| / 127) or unsigned (v: scale * s^2 * s^2, s = q / 255)."""
    if STATE_DTYPE == tl.uint8:
        codes = tl.load(ptr + offs, mask=mask)
        scale = tl.load(scale_ptr + offs // QBLOCK, mask=mask)
        if SIGNED:
            q = codes.to(tl.int8, bitcast=True).to(tl.int32)
            s = div_rn(tl.abs(q).to(tl.float32), tl.full([], 127.0, tl.float32))
            mag = scale * s * s
            return tl.where(q < 0, _negate(mag), mag)
        else:
            s = div_rn(codes.to(tl.float32), tl.full([], 255.0, tl.float32))
            s2 = s * s
            return scale * s2 * s2
    else:
        return tl.load(ptr + offs, mask=mask).to(COMPUTE)


@device_function
def _rint_code(c, TOP: tl.constexpr):
    """rint(min(c, TOP)) as int32 for c >= 0 (NaN -> 0), rounding half to even by hand (the interpreter has no
    libdevice rint); min before rint equals min after it, TOP being an integer."""
    c = tl.where(c != c, 0.0, tl.minimum(c, TOP))
    r = tl.floor(c)
    f = c - r  # exact: c < 2^23
    q = r.to(tl.int32)
    return q + ((f > 0.5) | ((f == 0.5) & ((q & 1) == 1))).to(tl.int32)


@device_function
def store_int8(ptr, scale_ptr, offs, mask, y, SIGNED: tl.constexpr, QBLOCK: tl.constexpr):
    """Encode the float32 tile ``y`` (offs: a whole number of blocks from a block start; mask: the lanes inside
    the tensor, None for a full tile) and store its codes and one scale per block."""
    ROWS: tl.constexpr = offs.shape[0] // QBLOCK
    if mask is not None:
        y = tl.where(mask, y, 0.0)
    y2 = tl.reshape(y, [ROWS, QBLOCK])
    a2 = tl.abs(y2)
    has_nan = tl.max((y2 != y2).to(tl.int32), axis=1) > 0
    nan = tl.full([ROWS], 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    scale = tl.where(has_nan, nan, tl.max(a2, axis=1))
    one = tl.full([ROWS], 1.0, tl.float32)
    inv = tl.where(scale == 0.0, 0.0, div_rn(one, tl.where(scale == 0.0, one, scale)))[:, None]
    if SIGNED:
        q = _rint_code(127.0 * sqrt_rn(a2 * inv), 127.0)
        codes = tl.where(y2 < 0.0, 0 - q, q).to(tl.int8).to(tl.uint8, bitcast=True)
    else:
        codes = _rint_code(255.0 * sqrt_rn(sqrt_rn(y2 * inv)), 255.0).to(tl.uint8)
    tl.store(ptr + offs, tl.reshape(codes, [offs.shape[0]]), mask=mask)
    first = (offs % QBLOCK) == 0  # one lane per block stores its scale
    if mask is not None:
        first = first & mask
    block_scale = tl.reshape(tl.broadcast_to(scale[:, None], [ROWS, QBLOCK]), [offs.shape[0]])
    tl.store(scale_ptr + offs // QBLOCK, block_scale, mask=first)
