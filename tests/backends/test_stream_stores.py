"""Streaming (non-temporal) stores of the CPU line-search ops (csrc/cpu/stream_policy.h).

Large calls write their write-only outputs (w0 of a save, p of a trial or final step) with
streaming stores; they must write exactly the bytes the ordinary stores write, for every dtype,
odd sizes, chunk boundaries and outputs that do not start on a vector boundary (views).
"""
from __future__ import annotations

import math

import pytest
import torch

from svi_kernels.backends import backends

CPU = backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU["available"], reason=f"cpu backend: {CPU['reason']}")

SIZES = [1, 7, 64, 4099, 32768 + 13, 40000]  # 32768 = kChunkElems: segments cut inside tensors
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _lists(dtype, k, offset, seed=0):
    """k lists of tensors; with offset, each tensor is a view starting `offset` elements in."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(k):
        ts = []
        for n in SIZES:
            base = torch.randn(n + offset, generator=gen, dtype=torch.float64)
            if j == k - 1:  # last list positive: second moments
                base = base.abs() * 0.01 + 1e-3
            ts.append(base.to(dtype)[offset:])
        out.append(ts)
    return out


def _run(cpu, op, dtype, offset):
    """The op's outputs (copies) for fixed inputs."""
    if op == "ls_save_sgd":
        p, g, _ = _lists(dtype, 3, offset)
        w0 = [torch.full_like(t, 7.0) for t in p]
        sums = cpu.ls_save_sgd(p, g, w0)
        return w0 + [sums]
    if op == "ls_save_adam":
        p, g, m, v = _lists(dtype, 4, offset)
        w0 = [torch.full_like(t, 7.0) for t in p]
        dirs = [torch.full_like(t, 7.0) for t in p]  # write-only like w0: streamed too
        sums = cpu.ls_save_adam(p, g, m, v, w0, dirs, beta1=0.9, beta2=0.999, eps=1e-8,
                                bias_correction2_sqrt=math.sqrt(1 - 0.999 ** 3))
        return w0 + dirs + m + v + [sums]
    etas = [1e-2 * (i + 1) for i in range(len(SIZES))]
    if op == "ls_trial_sgd":
        p, w0, g = _lists(dtype, 3, offset)
        cpu.ls_trial_sgd(p, w0, g, etas)
        return p
    if op == "ls_trial_adam":
        p, w0, g, v = _lists(dtype, 4, offset)
        cpu.ls_trial_adam(p, w0, g, v, etas, eps=1e-8, bias_correction2_sqrt=0.05)
        return p
    p, w0, m, v = _lists(dtype, 4, offset)
    cpu.ls_final_adam(p, w0, m, v, etas, eps=1e-8, bias_correction1=0.1, bias_correction2_sqrt=0.05)
    return p


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["ls_save_sgd", "ls_save_adam", "ls_trial_sgd", "ls_trial_adam", "ls_final_adam"])
def test_streaming_stores_write_the_same_bytes(cpu, stream_threshold, op, dtype, offset):
    stream_threshold(0)  # every call streams
    streamed = _run(cpu, op, dtype, offset)
    stream_threshold(1 << 62)  # no call streams
    cached = _run(cpu, op, dtype, offset)
    for a, b in zip(streamed, cached):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bit for bit
    # and the outputs were really written (not left at the fill value 7)
    assert not torch.equal(streamed[0], torch.full_like(streamed[0], 7.0))


def test_threshold_is_the_l3_size(stream_threshold):
    import os
    import svi_kernels._C as C
    default = C._stream_min_bytes()
    sysfs = "/sys/devices/system/cpu/cpu0/cache/index3/size"
    if "SVI_KERNELS_STREAM_MIN_BYTES" in os.environ:
        assert default == int(os.environ["SVI_KERNELS_STREAM_MIN_BYTES"])
    elif os.path.exists(sysfs):  # not glibc's sysconf figure, which a VM may take from the host
        text = open(sysfs).read().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        assert default == int(text.rstrip("KM")) * scale, (default, text)
    else:
        assert default == 32 << 20
    assert stream_threshold(123) == default and C._stream_min_bytes() == 123
