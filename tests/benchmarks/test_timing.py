"""svi-bench's timing windows: what a bookkeeping row leaves out (its closure's time, measured inside
its steps) and the calls run between its windows. A fake clock makes the figures exact."""
import importlib

import pytest
import torch

from svi_kernels._entry import load

_pkg = load("microbench").__package__
timing = importlib.import_module(_pkg + ".timing")
rows_mod = importlib.import_module(_pkg + ".rows")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", c)
    return c


def test_excluded_time_is_taken_out_of_every_window(clock):
    spent_in_closure = [0.0]

    def step():  # 3 ms a call, 2 of them inside "the closure"
        clock.now += 0.003
        spent_in_closure[0] += 0.002

    def other():
        clock.now += 0.005

    ms, paired, ratio, *_ = timing.median_ms(step, torch.device("cpu"), warmup=2, repeats=5, paired=[(other, 5.0)],
                                             excluded=lambda: spent_in_closure[0])
    assert ms == pytest.approx(1.0)
    assert paired == [pytest.approx(5.0)]  # the paired call keeps its whole time
    assert ratio == [pytest.approx(0.2)]


def test_without_exclusion_the_whole_call_counts(clock):
    def step():
        clock.now += 0.003

    ms, paired, ratio, *_ = timing.median_ms(step, torch.device("cpu"), warmup=1, repeats=3)
    assert ms == pytest.approx(3.0) and paired == [] and ratio == []


def test_paired_ratio_is_taken_window_by_window(clock):
    # (fn, paired call) seconds per window, one call each: the medians are 0.04 and 0.04 (ratio 1), while
    # fn is half the paired call in two windows of three
    windows = iter([(0.03, None), (0.02, 0.04), (0.04, 0.02), (0.08, 0.16)])
    current = {}

    def step():
        current["w"] = next(windows)
        clock.now += current["w"][0]

    def other():
        clock.now += current["w"][1]

    t = timing.median_ms(step, torch.device("cpu"), warmup=1, repeats=3, paired=[(other, 30.0)])
    assert t.ms == pytest.approx(40.0) and t.paired_ms == [pytest.approx(40.0)]
    assert t.paired_ratio == [pytest.approx(0.5)]
    # the intervals of the medians over the 3 windows: min and max (too few windows for 95%)
    assert t.ms_interval == (pytest.approx(20.0), pytest.approx(80.0))
    assert t.paired_ratio_interval == [(pytest.approx(0.5), pytest.approx(2.0))]


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 8, 15, 16, 31, 60])
def test_median_interval_is_the_widest_order_statistic_pair_with_95_percent_coverage(n):
    from math import comb

    def coverage(k):  # P(x_(k) <= median <= x_(n-k+1)) for continuous data: P(k <= Binomial(n, 1/2) <= n-k)
        return sum(comb(n, j) for j in range(k, n - k + 1)) / 2 ** n

    lo, hi = timing.median_interval([float(v) for v in reversed(range(1, n + 1))])  # order must not matter
    k = int(lo)
    assert hi == n - k + 1
    if n >= 6:  # from 6 values on, [min, max] covers >= 95%
        assert coverage(k) >= 0.95 and coverage(k + 1) < 0.95
    else:
        assert (lo, hi) == (1, n)
    assert all(x != x for x in timing.median_interval([]))  # nan: no window, no interval


def test_trivial_closure_times_its_forward_and_backward_and_reports_the_backward():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    grad_before, version = p.grad.clone(), p.grad._version
    closure = rows_mod.TrivialClosure(torch.device("cpu"), [p])
    loss = closure.fn(backwards=True)  # the plain function the rows pass to step()
    assert loss.item() == 1.0 and closure.seconds > 0
    assert p.grad._version > version and torch.equal(p.grad, grad_before)  # "written", data untouched
    with torch.no_grad():
        assert closure.fn().item() < -1e11  # a trial: always accepted
