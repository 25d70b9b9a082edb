"""Triton kernels of svi_kernels: multi-tensor optimizer updates, line-search phases, SVI backward.

Importing this package never imports triton; the kernel modules (``adam``, ``sgd``,
``line_search``, ``svi_backward``, ``aot``) do, and ``svi_kernels.backends.triton`` reports
whether they can run here.

``launch_count`` counts kernel launches by kernel name, so tests can check that one fused op
call is one launch whatever the number of tensors.
"""
from collections import Counter

launch_count: Counter = Counter()


def reset_launch_count() -> None:
    """Zero the per-kernel launch counters."""
    launch_count.clear()


def total_launches() -> int:
    return sum(launch_count.values())
