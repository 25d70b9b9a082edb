"""The saves of the CPU line-search ops copy p to w0 byte for byte, whatever the bits of p.

fp32/fp64 saves store w0 from the element loop (a vector load and store), fp16/bf16 saves copy it
in a separate pass (csrc/cpu/line_search_loop.h, save_w0_in_loop); both, streamed or not and into
a w0 that does not start on a vector boundary, must write exactly p's bytes (NaN payloads,
signed zeros, infinities, subnormals), and the sums of ls_save_sgd must not depend on the form.
"""
from __future__ import annotations

import math

import pytest
import torch

from svi_kernels.backends import backends

CPU = backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU["available"], reason=f"cpu backend: {CPU['reason']}")

SIZES = [1, 17, 4099, 32768 + 13, 70001]  # 32768 = kChunkElems: segments cut inside tensors
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.view(INT_OF[t.element_size()])


def _random_bit_patterns(n, dtype, gen):
    """Every bit pattern is likely among n: NaNs with payloads, infinities, subnormals, -0.0."""
    ints = torch.randint(-(1 << 62), 1 << 62, (n,), generator=gen, dtype=torch.int64)
    return ints.view(torch.uint8)[: n * torch.finfo(dtype).bits // 8].view(dtype).clone()


def _outputs(n_extra, dtype, count):
    """`count` lists of outputs filled with 7; each tensor is a view n_extra elements in."""
    return [[torch.full((n + n_extra,), 7.0, dtype=dtype)[n_extra:] for n in SIZES] for _ in range(count)]


@pytest.mark.parametrize("w0_offset", [0, 1])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "cached"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["ls_save_sgd", "ls_save_adam", "ls_save_adam_dirs"])
def test_saved_w0_is_p_byte_for_byte(cpu, stream_threshold, op, dtype, stream, w0_offset):
    gen = torch.Generator().manual_seed(1)
    p = [_random_bit_patterns(n, dtype, gen) for n in SIZES]
    g = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    stream_threshold(0 if stream else 1 << 62)
    w0, dirs = _outputs(w0_offset, dtype, 2)
    if op == "ls_save_sgd":
        cpu.ls_save_sgd(p, g, w0)
    else:
        m = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
        v = [torch.rand(n, generator=gen).to(dtype) * 0.01 + 1e-3 for n in SIZES]
        cpu.ls_save_adam(p, g, m, v, w0, dirs if op == "ls_save_adam_dirs" else [], beta1=0.9, beta2=0.999,
                         eps=1e-8, bias_correction2_sqrt=math.sqrt(1 - 0.999 ** 2))
    for saved, source in zip(w0, p):
        assert torch.equal(_bits(saved), _bits(source))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_sums_do_not_depend_on_the_form_of_the_save(cpu, stream_threshold, dtype, threads):
    """Streamed w0, cached w0 and no w0 (the gradient check) run the same summation: same bits."""
    gen = torch.Generator().manual_seed(2)
    p = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    g = [torch.randn(n, generator=gen).mul_(torch.rand(n, generator=gen) * 1e3).to(dtype) for n in SIZES]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stream_threshold(0)
        streamed = cpu.ls_save_sgd(p, g, _outputs(0, dtype, 1)[0])
        check = cpu.ls_save_sgd(p, g, [])
        stream_threshold(1 << 62)
        cached = cpu.ls_save_sgd(p, g, _outputs(0, dtype, 1)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(streamed, cached) and torch.equal(streamed, check), (streamed, cached, check)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.tensor([math.fsum((t.to(compute) * t.to(compute)).tolist()) for t in g]).to(torch.float32)
    assert torch.equal(streamed, want)
