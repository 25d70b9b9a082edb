"""Element helpers shared by the kernels.

Triton's default fp32 ``sqrt`` and ``/`` lower to approximate PTX instructions; the C++ header
(update_math.h) and the PyTorch reference round each operation to nearest. These helpers pick
the correctly rounded forms (fp64 ``sqrt`` and ``/`` already are).
"""
import triton
import triton.language as tl


@triton.jit
def sqrt_rn(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div_rn(x, y):
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def as_compute(x, COMPUTE: tl.constexpr):
    """A host scalar (fp64 kernel argument) rounded once to the compute dtype, like the host's cast."""
    return tl.full([], x, COMPUTE)


@triton.jit
def chunk_of_program(chunks):
    """This program's row of the chunk table: (tensor index, first element, end element)."""
    row = chunks + 3 * tl.program_id(0).to(tl.int64)
    return tl.load(row), tl.load(row + 1), tl.load(row + 2)


@triton.jit
def tensor_ptr(ptrs, t, LIST: tl.constexpr, N_LISTS: tl.constexpr, DTYPE: tl.constexpr):
    """Pointer to tensor ``t`` of list ``LIST`` from the [n_tensors, N_LISTS] int64 table."""
    return tl.load(ptrs + t * N_LISTS + LIST).to(tl.pointer_type(DTYPE))
