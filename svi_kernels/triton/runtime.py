"""How the kernels are launched: dtype mapping, device checks, launch counting and capture.

Every launch goes through ``launch`` so it is counted (``svi_kernels.triton.launch_count``) and so
``aot.py`` can record the exact arguments a real call would pass and compile them for sm_90.
"""
import contextlib
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import launch_count

# GPU launch shape: 1024 elements per block step with 4 warps (8 fp32 per thread, two 16-byte
# vectors), 4 block steps per program. The interpreter runs a block as numpy arrays, so bigger
# blocks are much faster there; chunk boundaries and tails are still exercised by the tests.
GPU_BLOCK, GPU_BLOCKS_PER_CHUNK, NUM_WARPS = 1024, 4, 4
INTERPRETER_BLOCK, INTERPRETER_BLOCKS_PER_CHUNK = 16384, 2

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}

_captured: Optional[List[tuple]] = None  # launches recorded instead of run (see capture())


def interpreting() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return bool(triton.knobs.runtime.interpret) or os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_function(fn):
    """``@triton.jit`` for a helper called from kernels. Under the interpreter the helper stays a
    plain Python function: triton 3.9's interpreter re-patches triton.language on every nested
    jit call (about 1 ms each), which made the many-tensor tests minutes long."""
    return fn if interpreting() else triton.jit(fn)


def block_shape(largest_numel: int = 1 << 30) -> Tuple[int, int]:
    """(BLOCK, CHUNK): elements per block step and per program. The interpreter runs each block
    as numpy arrays of BLOCK lanes, so there it is also capped at the largest tensor (many small
    tensors would otherwise each pay for 16K-lane arrays)."""
    if interpreting():
        block = min(INTERPRETER_BLOCK, max(16, triton.next_power_of_2(max(1, largest_numel))))
        return block, block * INTERPRETER_BLOCKS_PER_CHUNK
    return GPU_BLOCK, GPU_BLOCK * GPU_BLOCKS_PER_CHUNK


def element_types(dtype: torch.dtype):
    """(storage dtype, compute dtype) in Triton terms: fp16/bf16 compute in fp32."""
    if dtype not in TORCH_TO_TL:
        raise TypeError(f"the Triton backend supports float32/float16/bfloat16/float64 tensors, got {dtype}")
    return TORCH_TO_TL[dtype], (tl.float64 if dtype == torch.float64 else tl.float32)


def state_types(group, state_seed=None) -> dict:
    """The STATE_DTYPE, SR and QBLOCK constexprs of a kernel that reads or writes optimizer state: SR (stochastic
    rounding) when a seed is given and the state is bf16; int8 state: STATE_DTYPE uint8 (the codes of every
    list, state_storage.py) and QBLOCK its block size."""
    if group.state_dtype == "int8":
        return dict(STATE_DTYPE=tl.uint8, SR=False, QBLOCK=group.block_size)
    return dict(STATE_DTYPE=TORCH_TO_TL[group.state_dtype],
                SR=state_seed is not None and group.state_dtype == torch.bfloat16, QBLOCK=1)


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of per-tensor scalar tables (etas): the compute dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_arg(t, device: torch.device, name: str, placeholder):
    """A one-element float32/float64 tensor the kernel reads (loss scale, skip flag, lr), checked to
    be on ``device``; ``placeholder`` (any tensor, never read) when there is none."""
    if t is None:
        return placeholder
    if t.numel() != 1 or t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be a one-element float32/float64 tensor, got {t.dtype} {tuple(t.shape)}")
    if t.device != device and _captured is None:
        raise RuntimeError(f"{name} is on {t.device} but the tensors are on {device}; the kernel reads it there")
    return t


def scalar_arg(value, device: torch.device, name: str, placeholder):
    """(pointer argument, float64 argument) for a number-or-tensor kernel input such as lr."""
    if isinstance(value, torch.Tensor):
        return tensor_arg(value, device, name, placeholder), 0.0
    return placeholder, float(value)


def step_dtype(steps, device: torch.device):
    """The Triton dtype of the per-tensor step counts (float32 or float64, one for all)."""
    dtypes = {s.dtype for s in steps}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        raise TypeError(f"state_steps must all be float32 or all float64 tensors, got {sorted(map(str, dtypes))}")
    for s in steps:
        tensor_arg(s, device, "state_steps[i]", None)
    return TORCH_TO_TL[dtypes.pop()]


def check_device(device: torch.device) -> None:
    """Raw pointers are dereferenced on the host by the interpreter and on the GPU otherwise."""
    if _captured is not None:  # nothing runs while aot.py records launches
        return
    if interpreting():
        if device.type != "cpu":
            raise RuntimeError(f"under TRITON_INTERPRET=1 the Triton kernels take CPU tensors, got {device}")
    elif device.type != "cuda":
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got {device} "
                           "(set TRITON_INTERPRET=1 to run them on CPU tensors through the interpreter)")


# ------------------------------------------------------------------------------------ launching
@contextlib.contextmanager
def capture():
    """Record launches as (kernel, args, constexprs) instead of running them (used by aot.py)."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def launch(kernel, n_programs: int, args: tuple, constexprs: dict, device: torch.device) -> None:
    """One launch of ``kernel`` over a 1-D grid of ``n_programs``."""
    name = kernel.__name__
    if _captured is not None:
        _captured.append((kernel, args, constexprs))
        return
    launch_count[name] += 1
    # FMA contraction off: each + and * rounds once, as in update_math.h and the reference.
    options = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[(n_programs,)](*args, **constexprs, **options)
    else:
        kernel[(n_programs,)](*args, **constexprs, **options)
