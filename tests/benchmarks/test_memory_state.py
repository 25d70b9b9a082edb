"""svi-bench's "state B/p": bytes of every tensor an optimizer holds, counted from the live tensors
(benchmarks/state_bytes.py), on optimizers whose state is known to the byte and on fakes that hide
buffers where a walk of ``opt.state`` alone would miss them."""
import importlib

import pytest
import torch

import svi_kernels as sk
from svi_kernels._entry import load

state_bytes = importlib.import_module(load("microbench").__package__ + ".state_bytes")
count, per_param = state_bytes.state_bytes, state_bytes.state_bytes_per_param

SIZES = (1000, 37, 256)
NUMEL = sum(SIZES)


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return ps


def _stepped(opt, steps=3):
    for _ in range(steps):
        opt.step()
    return opt


def test_torch_sgd_without_momentum_keeps_nothing():
    ps = _params()
    opt = _stepped(torch.optim.SGD(ps, lr=0.1))
    assert count(opt, exclude=ps + [p.grad for p in ps]) == 0 and per_param(opt) == 0.0


def test_torch_sgd_with_momentum_keeps_one_buffer():
    ps = _params()
    opt = _stepped(torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert count(opt, exclude=ps + [p.grad for p in ps]) == 4 * NUMEL
    assert per_param(opt) == 4.0


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}, {"foreach": False}])
def test_torch_adamw_keeps_two_moments_and_a_step_count_per_tensor(impl):
    ps = _params()
    opt = _stepped(torch.optim.AdamW(ps, lr=1e-3, **impl))
    # exp_avg, exp_avg_sq in fp32, and a 0-d float32 step tensor per parameter
    assert count(opt, exclude=ps + [p.grad for p in ps]) == 8 * NUMEL + 4 * len(SIZES)
    assert per_param(opt) == pytest.approx(8.0, abs=4 * len(SIZES) / NUMEL + 1e-12)


def test_parameters_are_reached_through_param_groups_and_left_out_by_default():
    ps = _params()
    opt = _stepped(torch.optim.SGD(ps, lr=0.1))
    assert count(opt) == 4 * NUMEL  # the parameters; a tensor's own attributes (.grad) are not followed
    assert count(opt, exclude=ps) == 0


class _Holder:
    """An object the walk reaches through an attribute."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Slotted:
    __slots__ = ("buf", "empty")

    def __init__(self, buf):
        self.buf = buf  # ``empty`` stays unset


class FakeOptimizer(torch.optim.Optimizer):
    """Hides its buffers outside ``self.state``, as the line searches keep w0 and directions."""

    def __init__(self, params, where):
        super().__init__(params, {"lr": 0.1})
        ps = [p for g in self.param_groups for p in g["params"]]
        self.where = where
        buf = torch.zeros(NUMEL)
        if where == "attribute":
            self._w0 = buf
        elif where == "nested dict":
            self._cache = {"plan": {"dirs": {id(ps[0]): buf}}}
        elif where == "list in a tuple":
            self._lists = ([1, "x", [buf]], None)
        elif where == "object attribute":
            self._plan = _Holder(step=_Holder(tensors=[buf]))
        elif where == "slots":
            self._plan = _Slotted(buf)
        elif where == "closure cell":
            self._fn = lambda: buf.sum()
        elif where == "bound method":
            self._hook = _Holder(buf=buf).__init__
        elif where == "set and storage":
            self._bufs = {buf.untyped_storage()}
        elif where == "state":
            self.state[ps[0]]["w0"] = buf
        else:
            raise ValueError(where)

    def step(self, closure=None):
        return None


WHERE = ["attribute", "nested dict", "list in a tuple", "object attribute", "slots", "closure cell", "bound method",
         "set and storage", "state"]


@pytest.mark.parametrize("where", WHERE)
def test_a_buffer_hidden_anywhere_the_optimizer_holds_is_counted(where):
    ps = _params()
    assert per_param(FakeOptimizer(ps, where)) == 4.0


def test_views_of_one_storage_count_once_and_whole():
    ps = _params()
    opt = FakeOptimizer(ps, "attribute")
    buf = opt._w0
    opt._views = [buf[:10], buf.view(1, -1), buf[::2], buf.view(torch.int32)]  # the same storage, four ways
    opt._view_only = {"tail": torch.zeros(2 * NUMEL)[-3:]}  # a 3-element view keeps 2 * NUMEL floats alive
    assert count(opt, exclude=ps) == 4 * NUMEL + 8 * NUMEL


def test_views_and_copies_of_the_parameters():
    ps = _params()
    opt = FakeOptimizer(ps, "attribute")
    opt._local = [p.detach()[1:] for p in ps] + [p.grad.view(-1) for p in ps]  # the model's memory: not counted
    opt._copies = [p.detach().clone() for p in ps]  # a copy is the optimizer's: counted
    assert per_param(opt) == 8.0


def test_cycles_end_and_the_counted_state_is_not_modified():
    ps = _params()
    opt = FakeOptimizer(ps, "nested dict")
    opt._self = opt
    opt._cache["back"] = opt._cache
    assert per_param(opt) == 4.0 and opt._cache["back"] is opt._cache


def test_wrapper_subclasses_count_their_inner_tensors():
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    ps = _params()
    opt = FakeOptimizer(ps, "attribute")
    opt._w0 = two_tensor.TwoTensor(torch.zeros(NUMEL), torch.zeros(NUMEL))  # as a DTensor holds its local shard
    assert per_param(opt) == 8.0


def test_meta_tensors_hold_no_memory_and_sparse_ones_are_refused():
    ps = _params()
    opt = FakeOptimizer(ps, "attribute")
    opt._w0 = torch.empty(10 ** 9, device="meta")
    assert per_param(opt) == 0.0
    opt._w0 = torch.zeros(NUMEL).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        per_param(opt)


def test_no_parameters_is_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=0.1)
    with pytest.raises(ValueError, match="no elements"):
        per_param(opt)


# ---- our optimizers: the figures that are not about to change (issue 23 changes the line searches') ----
def _closure(ps):
    def closure():
        return sum((p * p).sum() for p in ps)
    return closure


@pytest.mark.parametrize("make,expected", [
    (lambda ps: sk.AdamW(ps, lr=1e-3, backend="reference"), 8.0),
    (lambda ps: sk.SVI(ps, lr=1e-3, base="sgd", backend="reference"), 4.0),
    (lambda ps: sk.SVI(ps, lr=1e-3, base="adam", backend="reference"), 8.0),
])
def test_our_plain_optimizers_keep_what_their_torch_peers_keep(make, expected):
    ps = _params()
    opt = _stepped(make(ps))
    assert per_param(opt) == pytest.approx(expected, abs=8 * len(SIZES) / NUMEL)


@pytest.mark.parametrize("make,at_least,at_most", [
    (lambda ps: sk.ArmijoSGD(ps, backend="reference"), 0.0, 4.0),
    (lambda ps: sk.AdamSLS(ps, backend="reference"), 8.0, 16.0),
    (lambda ps: sk.SaLSA(ps, backend="reference"), 8.0, 16.0),
    (lambda ps: sk.LayerwiseAdamSLS([{"params": [p]} for p in ps], warmup_steps=2, backend="reference"), 8.0, 16.0),
])
def test_line_searches_keep_their_moments_and_at_most_today_s_state_warm_up_included(make, at_least, at_most):
    ps = _params()
    opt = make(ps)
    closure = _closure(ps)
    seen = []
    for _ in range(4):
        opt.zero_grad()
        opt.step(closure)
        seen.append(per_param(opt))
    scalars = 8 * len(SIZES) / NUMEL  # a few bytes of per-tensor scalars at most
    assert all(at_least <= s <= at_most + scalars for s in seen), seen
