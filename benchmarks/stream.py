"""This machine's streaming bandwidth, measured in the same run as the rows it normalises."""
from __future__ import annotations

import statistics
import time

import torch

# a += s*b reads a and b and writes a: 3 accesses of 4 bytes per float32 element.
STREAM_BYTES_PER_ELEMENT = 12
DEFAULT_STREAM_NUMEL = 100_000_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_stream(numel: int = DEFAULT_STREAM_NUMEL, runs: int = 7, device: torch.device | str = "cpu") -> dict:
    """Median GB/s of an in-place ``a.add_(b, alpha=s)`` over ``numel`` float32 elements."""
    device = torch.device(device)
    a = torch.ones(numel, dtype=torch.float32, device=device)
    b = torch.full((numel,), 0.5, dtype=torch.float32, device=device)
    a.add_(b, alpha=1e-3)  # first touch of both buffers outside the timed runs
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        a.add_(b, alpha=1e-3)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    seconds = statistics.median(times)
    return {
        "numel": numel,
        "runs": runs,
        "bytes_per_element": STREAM_BYTES_PER_ELEMENT,
        "ms": seconds * 1e3,
        "gbps": STREAM_BYTES_PER_ELEMENT * numel / seconds / 1e9,
    }
