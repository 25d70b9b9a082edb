"""The CPU ops' per-tensor sums (ls_save_sgd's sum of g^2, with and without the w0 copy) are
accumulated in double lane by lane (csrc/cpu/vec_helpers.h LaneSum: widened to double vectors on
AVX2/AVX-512), per segment, then rounded once to float32: the result is the exact sum of the terms,
rounded, at any thread count. A float32 accumulator, a lost lane or a skipped tail would not be."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from svi_kernels.backends import backends

CPU = backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU["available"], reason=f"cpu backend: {CPU['reason']}")

CHUNK = 32768  # kChunkElems in csrc/cpu/multi_tensor.h: tensors above it are split into segments


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4099, CHUNK + 5, 2 * CHUNK + 31])
@pytest.mark.parametrize("threads", [1, 2])
def test_sum_of_squares_is_the_exact_sum_rounded_once(dtype, n, threads):
    from svi_kernels.backends import compiled as K
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).mul_(3).to(dtype)
    g[::7] *= 1e3  # magnitudes far apart: a float32 running sum would drop the small terms
    p = torch.randn(n).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = K.ls_save_sgd([p], [g], [torch.empty_like(p)])[0].item()
        read_only = K.ls_save_sgd([p], [g], [])[0].item()
    finally:
        torch.set_num_threads(before)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    terms = (g.to(compute) * g.to(compute)).tolist()  # each term as the kernel forms it
    exact = torch.tensor(math.fsum(terms), dtype=torch.float64).to(torch.float32).item()
    assert got == exact and read_only == exact, (got, read_only, exact)
    running = float(np.cumsum(np.array(terms, dtype=np.float32), dtype=np.float32)[-1])  # sequential float32
    if n >= 1000:  # the test tells a float32 accumulator apart at these sizes
        assert running != exact
