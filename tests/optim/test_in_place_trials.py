"""In-place trials (issue 23, svi_kernels/optim/trial_points.py), optimizer level:

- every trial point and every step's end point of every line search (PLASLS: each criterion and strategy)
  is within the stated rounding bound of the same step taken from a kept w0 (``keep_start_point=True``,
  the release's bits: tests/optim/test_release_fixtures.py);
- the memory an optimizer holds, counted from the live tensors: ArmijoSGD 0, the Adam line searches
  8 B/param (fp32), warm-up included; keep_start_point adds 4 B/param;
- a closure that raises during the search leaves the parameters at the start point (bit for bit with
  keep_start_point) and the line-search state as it was, and the next step runs.
"""
import copy
import math

import pytest
import torch

import svi_kernels as sk
from helpers import LS_BACKENDS, batch, one_thread, tiny_mlp  # noqa: F401
from ls_fixtures import TRIALED, coupled_problem

pytestmark = pytest.mark.usefixtures("one_thread")

U64 = 2.0 ** -53  # unit roundoff of float64 (storage and compute of the float64 problems)


def _recording(ps, f, trials):
    def closure():
        if not torch.is_grad_enabled():
            trials.append(torch.cat([p.detach().clone() for p in ps]))
        return f(ps)
    return closure


def _direction_bound(opt, ps, step_t):
    """Per element: the largest |d| of the directions a step may move along (g; g / denom; m_hat / denom)."""
    out = []
    for p in ps:
        g = p.grad.detach().abs()
        st = opt.state.get(p, {})
        if "exp_avg_sq" not in st:
            out.append(g)
            continue
        beta1, beta2 = opt.param_groups[0]["betas"]
        denom = (st["exp_avg_sq"] / (1 - beta2 ** step_t)).sqrt() + opt.param_groups[0]["eps"]
        out.append(torch.maximum(g / denom, (st["exp_avg"] / (1 - beta1 ** step_t)).abs() / denom))
    return torch.cat(out)


@pytest.mark.parametrize("backend", LS_BACKENDS)
@pytest.mark.parametrize("name", sorted(TRIALED))
def test_trial_points_within_the_bound_of_the_kept_start_point(name, backend):
    ps, f = coupled_problem(seed=5)
    opt = TRIALED[name](ps, backend=backend)
    for _ in range(5):
        twin_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        twin = TRIALED[name](twin_ps, backend=backend, keep_start_point=True)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        etas_before = list(opt.ls_state["step_sizes"])
        got, want = [], []
        opt.zero_grad()
        opt.step(_recording(ps, f, got))
        twin.zero_grad()
        twin.step(_recording(twin_ps, lambda ws: f(ws), want))
        assert len(got) == len(want), "the same number of trials"
        assert opt.ls_state["n_backtracks"] == twin.ls_state["n_backtracks"]
        t_bias = twin.ls_state["step"] + (1 if name.startswith("SaLSA") else 0)
        d = _direction_bound(twin, twin_ps, t_bias)
        eta_max = max(etas_before + list(opt.ls_state["step_sizes"])) * 2.0  # (grown before the step)
        biggest = torch.cat([p.detach().abs() for p in twin_ps])
        points = list(zip(got, want)) + [(torch.cat([p.detach() for p in ps]), torch.cat([p.detach() for p in twin_ps]))]
        for k, (a, b) in enumerate(points, start=1):
            biggest = torch.maximum(biggest, b.abs())
            bound = (k + 3) * 2 * U64 * biggest + 8 * U64 * eta_max * d
            err = (a - b).abs()
            assert bool((err <= bound).all()), f"point {k}: {float((err / bound).max()):.2f} x the bound"
        # the twin's step is the kept-w0 step; carry on from the in-place one
    assert sum(opt.ls_state["n_backtracks"]) >= 0


# ------------------------------------------------------------------------------------------ memory
def _held_bytes(opt, exclude):
    """Bytes of every tensor storage reachable from the optimizer (state, plans, scratch attributes),
    not counting the storages of ``exclude`` (parameters and gradients)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen_objs, storages = set(), {}

    def visit(x):
        if id(x) in seen_objs:
            return
        seen_objs.add(id(x))
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            if st.data_ptr() not in skip and st.nbytes():
                storages[st.data_ptr()] = st.nbytes()
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(k)
                visit(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                visit(v)
        elif type(x).__module__.startswith("svi_kernels") and hasattr(x, "__dict__"):
            visit(vars(x))
    visit(vars(opt))
    return sum(storages.values())


MEMORY = {  # name -> (factory(groups of params, keep), B/param in fp32 without and with keep_start_point)
    "ArmijoSGD": (lambda gs, keep: sk.ArmijoSGD([p for g in gs for p in g], init_step_size=5.0,
                                                keep_start_point=keep), 0),
    "AdamSLS": (lambda gs, keep: sk.AdamSLS([p for g in gs for p in g], init_step_size=5.0,
                                            keep_start_point=keep), 8),
    "SaLSA": (lambda gs, keep: sk.SaLSA([p for g in gs for p in g], keep_start_point=keep), 8),
    "SaLSA-momentum": (lambda gs, keep: sk.SaLSA([p for g in gs for p in g], momentum_direction=True,
                                                 keep_start_point=keep), 8),
    "LayerwiseAdamSLS-cycle": (lambda gs, keep: sk.LayerwiseAdamSLS(
        [{"params": g} for g in gs], warmup_steps=2, init_step_size=5.0, keep_start_point=keep), 8),
    "LayerwiseAdamSLS-paper-all": (lambda gs, keep: sk.LayerwiseAdamSLS(
        [{"params": g} for g in gs], warmup_steps=2, init_step_size=5.0, strategy="all", criterion="paper",
        keep_start_point=keep), 8),
}


@pytest.mark.parametrize("keep", [False, True], ids=["in-place", "keep_start_point"])
@pytest.mark.parametrize("name", sorted(MEMORY))
def test_optimizer_memory_from_the_live_tensors(name, keep):
    model = tiny_mlp(hidden=33)
    params = list(model.parameters())
    groups = [params[:2], params[2:4], params[4:]]
    factory, per_param = MEMORY[name]
    opt = factory(groups, keep)
    n = sum(p.numel() for p in params)
    for i in range(5):  # LayerwiseAdamSLS: two warm-up steps, then three cycle steps
        x, y = batch(seed=i)
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        held = _held_bytes(opt, params + [p.grad for p in params])
        assert held == (per_param + 4 * keep) * n, f"step {i + 1}: {held / n:.2f} B/param"
    assert opt.ls_state["total_backtracks"] > 0 or name.startswith("SaLSA")  # trials moved the parameters


def test_memory_count_sees_a_buffer():
    """_held_bytes counts a tensor the optimizer keeps anywhere (here a scratch dict attribute)."""
    model = tiny_mlp()
    params = list(model.parameters())
    opt = sk.ArmijoSGD(params)
    opt._extra = {"buf": torch.zeros(10)}
    assert _held_bytes(opt, params) == 40


# --------------------------------------------------------------------------------- failure restore
class Boom(RuntimeError):
    pass


FAILING = {  # name -> factory(params, keep)
    "ArmijoSGD": lambda ps, keep: sk.ArmijoSGD(ps, init_step_size=50.0, keep_start_point=keep),
    "AdamSLS": lambda ps, keep: sk.AdamSLS(ps, init_step_size=50.0, keep_start_point=keep),
    "SaLSA": lambda ps, keep: sk.SaLSA(ps, init_step_size=50.0, search="every", keep_start_point=keep),
    "LayerwiseAdamSLS-code-cycle": lambda ps, keep: sk.LayerwiseAdamSLS(
        [{"params": [p]} for p in ps], warmup_steps=1, init_step_size=50.0, keep_start_point=keep),
    "LayerwiseAdamSLS-paper-all": lambda ps, keep: sk.LayerwiseAdamSLS(
        [{"params": [p]} for p in ps], warmup_steps=1, init_step_size=50.0, strategy="all", criterion="paper",
        keep_start_point=keep),
}


@pytest.mark.parametrize("keep", [False, True], ids=["in-place", "keep_start_point"])
@pytest.mark.parametrize("backend", LS_BACKENDS)
@pytest.mark.parametrize("name", sorted(FAILING))
def test_a_closure_that_raises_mid_search_leaves_the_start_point(name, backend, keep):
    ps, f = coupled_problem(seed=6)
    opt = FAILING[name](ps, keep)
    for p in opt.param_groups:
        p["backend"] = backend
    for _ in range(2):  # past the warm-up: LayerwiseAdamSLS's cycle moves group 0 before searching group 1
        opt.zero_grad()
        opt.step(lambda: f(ps))
    opt.ls_state["step_sizes"] = [1e4] * len(opt.param_groups)  # so that the next search backtracks
    start = [p.detach().clone() for p in ps]
    ls_before = copy.deepcopy(opt.ls_state)
    calls = {"trials": 0}

    def closure():
        if not torch.is_grad_enabled():
            calls["trials"] += 1
            if calls["trials"] == 3:  # after two trials (a backtrack) have moved the parameters
                raise Boom("the data loader failed")
        return f(ps)
    opt.zero_grad()
    with pytest.raises(Boom):
        opt.step(closure)
    assert calls["trials"] == 3
    assert opt.ls_state == ls_before  # step sizes, counters and averages as before the step
    # the bound of docs/kernels.md: two trials and the way back (K = 3), eta_1 = the grown 1e4
    d = _direction_bound(opt, ps, opt.ls_state["step"] + (2 if name == "SaLSA" else 1))
    w0 = torch.cat(start)
    eta_1 = 1.1e4
    bound = 5 * 2 * U64 * (w0.abs() + eta_1 * d) + 8 * U64 * eta_1 * d
    got = torch.cat([p.detach() for p in ps])
    if keep:
        assert torch.equal(got, w0)
    else:
        assert bool(((got - w0).abs() <= bound).all()), float(((got - w0).abs() / bound).max())
        assert not torch.equal(got, w0) or name == "LayerwiseAdamSLS-paper-all"  # the test can fail
    opt.zero_grad()
    opt.step(lambda: f(ps))  # and the optimizer carries on
    assert opt.ls_state["step"] == ls_before["step"] + 1


def test_keep_start_point_must_be_a_bool():
    ps, _ = coupled_problem()
    with pytest.raises(TypeError, match="keep_start_point must be True or False"):
        sk.AdamSLS(ps, keep_start_point="yes")


@pytest.mark.parametrize("name", ["ArmijoSGD", "AdamSLS"])
def test_keep_start_point_can_be_switched_and_frees_the_copies(name):
    ps, f = coupled_problem(seed=7)
    opt = TRIALED[name](ps, keep_start_point=True)
    opt.zero_grad()
    opt.step(lambda: f(ps))
    assert len(opt._w0) == len(ps)
    opt.keep_start_point = False
    opt.zero_grad()
    opt.step(lambda: f(ps))
    assert not getattr(opt, "_w0", None)
    assert math.isfinite(float(f(ps).detach()))


# ------------------------------------------------------------------------------ scratch in a step
class NewStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Sizes of the storages the ops create outside the closure (new outputs, not views or in-place)."""

    def __init__(self):
        super().__init__()
        self.active = True
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.sizes.append(t.untyped_storage().nbytes())
        return out


SCRATCH = {
    "ArmijoSGD": lambda ps, b: sk.ArmijoSGD(ps, init_step_size=50.0, backend=b),
    "AdamSLS": lambda ps, b: sk.AdamSLS(ps, init_step_size=50.0, backend=b),
    "SaLSA-momentum": lambda ps, b: sk.SaLSA(ps, init_step_size=50.0, momentum_direction=True, backend=b),
    "LayerwiseAdamSLS-paper-all": lambda ps, b: sk.LayerwiseAdamSLS(
        [{"params": ps[:2]}, {"params": ps[2:]}], warmup_steps=1, init_step_size=50.0, strategy="all",
        criterion="paper", backend=b),
}


@pytest.mark.parametrize("backend", LS_BACKENDS)
@pytest.mark.parametrize("name", sorted(SCRATCH))
def test_no_parameter_sized_scratch_in_a_step(name, backend):
    """The compiled ops allocate the per-tensor sums only; the reference backend temporaries of one
    tensor at a time (never more than the largest parameter in its compute dtype)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))
    params = list(model.parameters())
    opt = SCRATCH[name](params, backend)
    x, y = torch.randn(32, 128), torch.randint(0, 4, (32,))
    mode = NewStorages()

    def closure(backwards=False):
        mode.active = False  # the model's own allocations are not the optimizer's
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if backwards:
            loss.backward()
        mode.active = True
        return loss
    for i in range(3):
        mode.sizes.clear()  # (the first step creates the moments: state, not scratch)
        opt.zero_grad()
        with mode:
            opt.step(closure)
    assert opt.ls_state["total_backtracks"] > 0
    largest = max(p.numel() for p in params) * 4
    if backend == "cpu" and name != "SaLSA-momentum":  # (its sum of g * m_hat / denom is torch ops, per tensor)
        assert max(mode.sizes) <= 64 * len(params), f"{max(mode.sizes)} B allocated at once"
    else:
        assert max(mode.sizes) <= largest, f"{max(mode.sizes)} B > the largest parameter's {largest} B"


@pytest.mark.parametrize("backend", LS_BACKENDS)
def test_a_trial_point_that_overflows_is_refused_without_a_kept_start_point(backend):
    """fp32: a trial at eta = 1e38 overflows to inf; in place it could not be moved back, so the step
    says so (FloatingPointError naming keep_start_point); with the start point kept the search backtracks
    from w0 as the release did."""
    def run(keep):
        p = torch.nn.Parameter(torch.tensor([3.0, -1.0, 2.0]))
        opt = sk.ArmijoSGD([p], init_step_size=1e38, beta_b=0.1, backend=backend, keep_start_point=keep)
        opt.zero_grad()
        opt.step(lambda: 0.5 * (p.double() ** 2).sum().float() * 10.0)
        return p, opt
    with pytest.raises(FloatingPointError, match="keep_start_point=True"):
        run(False)
    p, opt = run(True)
    assert bool(torch.isfinite(p).all()) and opt.ls_state["found"] == [True] and opt.ls_state["n_backtracks"][0] > 0
