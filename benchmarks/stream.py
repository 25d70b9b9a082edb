"""This machine's streaming bandwidth, measured in the same windows as the rows it normalises."""
from __future__ import annotations

import statistics

import torch

from . import timing

# a += s*b reads a and b and writes a: 3 accesses of 4 bytes per float32 element.
STREAM_BYTES_PER_ELEMENT = 12
DEFAULT_STREAM_NUMEL = 100_000_000


class StreamProbe:
    """An in-place ``a.add_(b, alpha=s)`` over ``numel`` float32 elements, kept allocated so svi-bench
    can run a window of it after every window of a row (timing.median_ms's ``paired``): a row's
    fraction of stream then compares two figures taken under the same load. (A probe taken once per
    workload read 80.7 GB/s before one workload and 49-58 GB/s before the others in one run.)"""

    def __init__(self, numel: int = DEFAULT_STREAM_NUMEL, device: torch.device | str = "cpu"):
        self.numel = numel
        self.device = torch.device(device)
        self.a = torch.ones(numel, dtype=torch.float32, device=self.device)
        self.b = torch.full((numel,), 0.5, dtype=torch.float32, device=self.device)
        self()  # first touch of both buffers outside any timed window

    def __call__(self) -> None:
        self.a.add_(self.b, alpha=1e-3)

    def gbps(self, ms: float) -> float:
        return STREAM_BYTES_PER_ELEMENT * self.numel / (ms * 1e-3) / 1e9

    def fraction(self, nbytes: float, time_ratio: float) -> float:
        """Bandwidth of a call moving ``nbytes`` over this probe's, given (call's time / probe's time)."""
        return nbytes / (STREAM_BYTES_PER_ELEMENT * self.numel) / time_ratio

    def measure(self, runs: int = 7) -> dict:
        """Median over ``runs`` single calls (what sizes the paired windows, and the figure printed)."""
        ms = statistics.median(timing.seconds_per_call(self, 1, self.device) for _ in range(runs)) * 1e3
        return {"numel": self.numel, "runs": runs, "bytes_per_element": STREAM_BYTES_PER_ELEMENT, "ms": ms,
                "gbps": self.gbps(ms)}

