"""svi_kernels._C's direct calls of adam_step / sgd_momentum_step (csrc/cpu/direct_calls.cpp): the
same bits as torch.ops, and NotImplemented (so compiled.py uses torch.ops) whenever the dispatcher
would do something: grad mode, profiler, dispatch modes, subclasses/other keys, large calls."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from svi_kernels.backends import backends

CPU = backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU["available"], reason=f"cpu backend: {CPU['reason']}")


@pytest.fixture(scope="module")
def C():
    from svi_kernels.backends import compiled
    compiled.load()
    import svi_kernels._C as C
    return C


def lists(count, n=40, size=33, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.rand(size, generator=gen) + 0.1 for _ in range(n)] for _ in range(count)]


def adam_args(ls, amsgrad=False):
    return (*ls[:4], 1e-2, 0.9, 0.999, 1e-8, 0.01, True, 0.3, 0.2, False, ls[4] if amsgrad else None)


def sgd_args(ls):
    return (*ls[:3], 0.1, 0.9, True, 0.01, False, 0.0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_same_bits_as_torch_ops(C, amsgrad):
    a, b = lists(5), lists(5)
    with torch.no_grad():
        assert C._adam_step(*adam_args(a, amsgrad)) is None
        torch.ops.svi_kernels.adam_step(*adam_args(b, amsgrad))
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)


def test_sgd_same_bits_as_torch_ops(C):
    a, b = lists(3), lists(3)
    with torch.no_grad():
        assert C._sgd_momentum_step(*sgd_args(a)) is None
        torch.ops.svi_kernels.sgd_momentum_step(*sgd_args(b))
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)


class _Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _unchanged(ls, run):
    before = [t.clone() for t in ls[0]]
    out = run()
    assert all(torch.equal(x, y) for x, y in zip(ls[0], before))
    return out


@pytest.mark.parametrize("case", ["grad mode", "profiler", "dispatch mode", "neg view", "large", "not a list"])
def test_falls_back_without_touching_anything(C, case):
    ls = lists(3)
    args = sgd_args(ls)
    if case == "grad mode":
        assert _unchanged(ls, lambda: C._sgd_momentum_step(*args)) is NotImplemented
        return
    with torch.no_grad():
        if case == "profiler":
            with torch.autograd.profiler.profile():
                assert _unchanged(ls, lambda: C._sgd_momentum_step(*args)) is NotImplemented
        elif case == "dispatch mode":
            with _Count():
                assert _unchanged(ls, lambda: C._sgd_momentum_step(*args)) is NotImplemented
        elif case == "neg view":
            ls[1][-1] = torch._neg_view(torch.randn(33))  # a Negative dispatch key: torch.ops resolves it
            assert _unchanged(ls, lambda: C._sgd_momentum_step(*sgd_args(ls))) is NotImplemented
        elif case == "large":
            big = [[torch.zeros((1 << 22) + 1)] for _ in range(3)]
            assert _unchanged(big, lambda: C._sgd_momentum_step(*sgd_args(big))) is NotImplemented
        else:
            gen = (t for t in ls[0])
            assert C._sgd_momentum_step(gen, *args[1:]) is NotImplemented


def test_errors_are_the_ops_errors(C):
    ls = lists(4)
    ls[2][-1] = torch.empty(66)[::2]
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"svi_kernels::adam_step: exp_avgs\[39\] is not contiguous"):
        C._adam_step(*adam_args(ls))


LS_CALLS = {  # name: (number of lists, extra args after the lists)
    "ls_save_sgd": (3, ()),
    "ls_save_adam": (6, (0.9, 0.999, 1e-8, 0.3)),
    "ls_trial_sgd": (3, ("etas",)),
    "ls_trial_adam": (4, ("etas", 1e-8, 0.3)),
    "ls_final_adam": (4, ("etas", 1e-8, 0.2, 0.3)),
    "ls_final_adam_from_trial": (4, ("etas", 0.7, 1e-8, 0.2, 0.3)),
}


@pytest.mark.parametrize("name", sorted(LS_CALLS))
def test_line_search_same_bits_as_torch_ops(C, name):
    count, extra = LS_CALLS[name]
    a, b = lists(count), lists(count)
    etas = [0.01 * (i + 1) for i in range(len(a[0]))]
    args = lambda ls: (*ls, *[etas if x == "etas" else x for x in extra])  # noqa: E731
    with torch.no_grad():
        got = getattr(C, "_" + name)(*args(a))
        want = getattr(torch.ops.svi_kernels, name)(*args(b))
    assert got is not NotImplemented
    if want is not None:
        assert got.dtype == want.dtype and torch.equal(got, want)
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)


def test_increment_steps_same_as_torch_ops(C):
    a = [torch.tensor(float(i)) for i in range(50)] + [torch.tensor(2.0, dtype=torch.float64)]
    b = [t.clone() for t in a]
    versions = [t._version for t in a]
    with torch.no_grad():
        got = C._increment_steps(a)
        want = torch.ops.svi_kernels.increment_steps(b)
    assert got == want and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(t._version > v for t, v in zip(a, versions))
