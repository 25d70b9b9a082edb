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

    ms, paired = timing.median_ms(step, torch.device("cpu"), warmup=2, repeats=5, paired=[(other, 5.0)],
                                  excluded=lambda: spent_in_closure[0])
    assert ms == pytest.approx(1.0)
    assert paired == [pytest.approx(5.0)]  # the paired call keeps its whole time


def test_without_exclusion_the_whole_call_counts(clock):
    def step():
        clock.now += 0.003

    ms, paired = timing.median_ms(step, torch.device("cpu"), warmup=1, repeats=3)
    assert ms == pytest.approx(3.0) and paired == []


def test_trivial_closure_times_its_forward_and_backward_and_reports_the_backward():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    grad_before, version = p.grad.clone(), p.grad._version
    closure = rows_mod.TrivialClosure(torch.device("cpu"), [p])
    loss = closure(backwards=True)
    assert loss.item() == 1.0 and closure.seconds > 0
    assert p.grad._version > version and torch.equal(p.grad, grad_before)  # "written", data untouched
    with torch.no_grad():
        assert closure().item() < -1e11  # a trial: always accepted
