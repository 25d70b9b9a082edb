"""Median time per call, and (on a GPU) kernel launches and host syncs per call."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

MIN_WINDOW_S = {"cpu": 0.02, "cuda": 0.005}  # calls are batched into windows at least this long
MIN_REPEATS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device,
                     excluded: Optional[Callable[[], float]] = None) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls, less what ``excluded`` (a running total of
    seconds) grew by meanwhile."""
    _sync(device)
    before = excluded() if excluded is not None else 0.0
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    elapsed = time.perf_counter() - t0
    if excluded is not None:
        elapsed -= excluded() - before
    return max(elapsed, 0.0) / calls


def _calls_per_window(seconds: float, device: torch.device) -> int:
    return max(1, math.ceil(MIN_WINDOW_S.get(device.type, 0.02) / max(seconds, 1e-7)))


Paired = Tuple[Callable[[], object], float]  # (another call, its ms per call)


Interval = Tuple[float, float]


def median_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """A distribution-free interval for the median of ``values`` (order statistics, binomial with p = 1/2):
    the k-th smallest and k-th largest value for the largest k whose coverage is still >= ``level``
    (7 windows: min and max, 98%; 15 windows: 4th and 12th, 96.5%). With too few values for the level,
    min and max."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return (math.nan, math.nan)
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2:
        below_next = below + math.comb(n, k) / 2 ** n
        if 2 * below_next > 1.0 - level:
            break
        below, k = below_next, k + 1
    k = max(k, 1)
    return (xs[k - 1], xs[n - k])


class Timing(NamedTuple):
    ms: float                  # median over windows of fn's mean ms per call
    paired_ms: List[float]     # each paired call's median ms
    paired_ratio: List[float]  # median over windows of (fn's ms / that paired call's ms in the next window)
    ms_interval: Interval                # median_interval of fn's per-window ms
    paired_ratio_interval: List[Interval]  # median_interval of each per-window ratio


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              budget_s: float = float("inf"), paired: Sequence[Paired] = (),
              excluded: Optional[Callable[[], float]] = None) -> Timing:
    """Median over ``repeats`` windows of the mean ms per call, after ``warmup`` untimed calls.

    Short calls are grouped so each window lasts at least MIN_WINDOW_S, which keeps timer and
    synchronisation overhead out of the per-call figure. Slow calls get fewer windows (never fewer
    than MIN_REPEATS, nor fewer than one warm-up call) so one row spends about ``budget_s``.

    ``paired``: a window of each of these calls follows every window of ``fn``, so a load burst from
    another process hits all of them; the ratio of ``fn`` to one of them, window by window, then
    median (``paired_ratio``), is the robust figure on a shared machine: this VM's bandwidth moves
    from one call to the next, which a ratio of two medians taken over different windows keeps.

    ``excluded``: a running total of seconds that ``fn`` (or a paired call) spends on something not to
    be counted (the closure of a line-search step); what it grows by during a window is taken out of
    that window.
    """
    estimate = seconds_per_call(fn, 1, device, excluded)  # first call: allocates state, so it is never timed
    spent = estimate
    for _ in range(max(warmup - 1, 0)):
        if spent > budget_s / 3:
            break
        estimate = seconds_per_call(fn, 1, device, excluded)  # the last warm-up call sizes the windows
        spent += estimate
    calls = _calls_per_window(estimate, device)
    window_s = estimate * calls
    other_calls = [_calls_per_window(other_ms * 1e-3, device) for _other, other_ms in paired]
    window_s += sum(other_ms * 1e-3 * n for (_other, other_ms), n in zip(paired, other_calls))
    affordable = max(budget_s - spent, 0.0) / max(window_s, 1e-9)
    windows = max(int(min(repeats, affordable)), min(repeats, MIN_REPEATS), 1)
    mine: List[float] = []
    theirs: List[List[float]] = [[] for _ in paired]
    for _ in range(windows):
        mine.append(seconds_per_call(fn, calls, device, excluded))
        for (other, _ms), n, times in zip(paired, other_calls, theirs):
            times.append(seconds_per_call(other, n, device, excluded))
    ratios = [[m / t if t > 0 else math.inf for m, t in zip(mine, times)] for times in theirs]
    return Timing(1e3 * statistics.median(mine), [1e3 * statistics.median(t) for t in theirs],
                  [statistics.median(r) for r in ratios], tuple(1e3 * x for x in median_interval(mine)),
                  [median_interval(r) for r in ratios])


_LAUNCH_MARKERS = ("LaunchKernel", "cuLaunchCooperativeKernel")
_SYNC_NAMES = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
               "cuCtxSynchronize", "cuEventSynchronize"}


def launches_and_syncs(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[int], Optional[int]]:
    """Kernel launches and host<->device synchronisations in one call, from the profiler's CUDA
    runtime/driver API events. ``(None, None)`` on CPU or when the profiler cannot tell."""
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    try:
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
        names = [evt.name for evt in prof.events()]
    except Exception:  # profiler unavailable (e.g. CUPTI missing): report n/a rather than fail the run
        return None, None
    launches = sum(1 for n in names if any(m in n for m in _LAUNCH_MARKERS))
    # The trailing synchronize above is ours, not the step's.
    syncs = max(sum(1 for n in names if n in _SYNC_NAMES) - 1, 0)
    return launches, syncs
