"""Element helpers shared by the kernels.

Triton's default fp32 ``sqrt`` and ``/`` lower to approximate PTX instructions; the C++ header
(update_math.h) rounds each operation to nearest. These helpers pick the correctly rounded
forms (fp64 ``sqrt`` and ``/`` already are), and round to the storage dtype to nearest-even as
the GPU and ``Tensor.copy_`` do (triton 3.9's interpreter truncates fp32 -> bf16, so under the
interpreter that rounding is done by hand).

Host scalars reach the kernels as fp64 arguments and are rounded once to the compute dtype
with ``tl.full([], x, COMPUTE)``, as the C++ callers cast their double coefficients.
"""
import triton.language as tl
from triton.language.extra import libdevice

from .runtime import device_function, interpreting

_BF16_BY_HAND = tl.constexpr(interpreting())
_INTERPRETING = tl.constexpr(interpreting())


@device_function
def sqrt_rn(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@device_function
def div_rn(x, y):
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@device_function
def pow_f64(x, y):
    """x ** y in float64 (the Adam bias corrections from a step count read on the device).
    libdevice's pow on the GPU; the interpreter has no libdevice, so there exp(y * log(x)),
    which agrees to a few float64 ulps (invisible once rounded to a float32 coefficient)."""
    if _INTERPRETING:
        return tl.exp(y * tl.log(x))
    else:
        return libdevice.pow(x, y)


@device_function
def chunk_of_program(chunks, BLOCK: tl.constexpr):
    """This program's row of the chunk table: (tensor index, start, end of the full blocks, end).

    Elements [start, full_end) are whole blocks (loaded without masks, so they vectorise);
    [full_end, end) is the masked tail, empty unless this is the tensor's last chunk.
    """
    row = chunks + 3 * tl.program_id(0).to(tl.int64)
    t = tl.load(row)
    start = tl.multiple_of(tl.load(row + 1), BLOCK)  # chunks start at multiples of the chunk size
    end = tl.load(row + 2)
    full_end = start + (end - start) // BLOCK * BLOCK
    return t, start, full_end, end


@device_function
def tensor_ptr(ptrs, t, LIST: tl.constexpr, N_LISTS: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to tensor ``t`` of list ``LIST`` from the [n_tensors, N_LISTS] int64 table.
    ALIGNED: the host checked every pointer is 16-byte aligned (enables 128-bit accesses)."""
    ptr = tl.load(ptrs + t * N_LISTS + LIST).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_function
def to_storage(x, DTYPE: tl.constexpr):
    """Round a compute-dtype value to the storage dtype, to nearest-even."""
    if DTYPE == tl.bfloat16 and _BF16_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).to(tl.uint16)
        return tl.where(x != x, x.to(tl.bfloat16), rounded.to(tl.bfloat16, bitcast=True))
    else:
        return x.to(DTYPE)
