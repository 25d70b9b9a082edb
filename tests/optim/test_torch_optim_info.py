"""torch's own optimizer contract, applied to ours with torch's OptimizerInfo inputs (imported from
torch.testing._internal.common_optimizers, which ships in the torch wheel; never copied here):
sk.AdamW as torch.optim.AdamW, sk.SVI as torch.optim.SGD, sk.SVI(base="adam") as torch.optim.Adam.

Every error input raises torch's exception type with torch's message; every sample input (with
torch's foreach/fused/differentiable variants) follows torch's trajectory within torch's default
tolerances on every CPU backend; complex parameters, sparse SGD gradients, differentiable steps
(gradcheck), numeric ``step`` checkpoints and fused=True on meta parameters behave as in torch.
The line searches get an OptimizerInfo of their own (closure-requiring, like torch's LBFGS entry).
"""
import copy
import functools
import io
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal import common_optimizers as co

import svi_kernels as sk
from helpers import CPU_BACKENDS

TORCH_INFO = {info.optim_cls.__name__: info for info in co.optim_db}


class SVIAdam(sk.SVI):
    """sk.SVI(base="adam") under the name torch's Adam entry is tested with."""

    def __init__(self, params, **kwargs):
        super().__init__(params, base="adam", **kwargs)


OURS = {"AdamW": sk.AdamW, "SGD": sk.SVI, "Adam": SVIAdam}
# SVI's defaults follow the SVI paper (momentum 0.95, Nesterov); torch's SGD inputs assume torch's.
TORCH_DEFAULTS = {"SGD": dict(momentum=0.0, nesterov=False)}
NAMES = list(OURS)


def all_inputs(name, skip=()):
    """torch's sample inputs for the CPU, each also with foreach / fused / differentiable set."""
    return co._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, TORCH_INFO[name], skip=skip)


def ours(name, params, kwargs, backend=None):
    return OURS[name](params, **{**TORCH_DEFAULTS.get(name, {}), **kwargs, "backend": backend})


def params_like_torchs_tests(dtype=torch.float32, complex_=False):
    """A matrix, a non-contiguous vector, a one-element 0-d tensor and an empty one."""
    g = torch.Generator().manual_seed(0)
    cdt = torch.complex64 if complex_ else dtype
    return [torch.randn(6, 5, generator=g, dtype=cdt), torch.randn(7, 2, generator=g, dtype=dtype)[:, 0],
            torch.randn((), generator=g, dtype=dtype), torch.empty(0, dtype=dtype)]


def run_steps(opt, params, n=5, seed=1):
    """n steps on fixed gradients; at step 2 the first parameter has none (a no-op for it)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        for j, p in enumerate(params):
            p.grad = None if (i == 2 and j == 0) else torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


def assert_same_state(opt_a, opt_b, params_a, params_b, **tol):
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pb, pa, **tol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for k, v in sa.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(sb[k].to(v.device), v, **tol)


@pytest.mark.parametrize("name", NAMES)
def test_error_inputs_as_torch(name):
    """Each of torch's error inputs: the same exception (or warning) type, a message containing torch's."""
    errors = TORCH_INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert len(errors) >= 7
    for err in errors:
        inp = err.optimizer_error_input
        cls = functools.partial(ours, name)
        if err.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            act = lambda: cls(inp.params, inp.kwargs)  # noqa: E731
        else:
            opt = cls(inp.params, inp.kwargs)
            act = opt.step
        ctx = (pytest.warns(err.error_type, match=err.error_regex) if issubclass(err.error_type, Warning)
               else pytest.raises(err.error_type, match=err.error_regex))
        with ctx:
            act()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_trajectory_as_torch(name, backend):
    """Every sample input, plain and with foreach / fused / differentiable: torch's trajectory
    (parameters and state) within torch's default float32 tolerances."""
    for inp in all_inputs(name):
        params_t, params_o = params_like_torchs_tests(), params_like_torchs_tests()
        # torch's ground truth is its for-loop (its test_optim says so); torch 2.13's fused CPU kernel
        # moreover mis-updates non-contiguous parameters, so fused=True is compared with fused=False.
        opt_t = TORCH_INFO[name].optim_cls(params_t, **{**inp.kwargs, "fused": False})
        opt_o = ours(name, params_o, copy.deepcopy(inp.kwargs), backend)
        run_steps(opt_t, params_t)
        run_steps(opt_o, params_o)
        assert_same_state(opt_t, opt_o, params_t, params_o)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_complex_as_torch(name, backend):
    """Complex parameters (mixed with a real one) move as torch moves them; the state stays complex."""
    for inp in all_inputs(name, skip=("differentiable", "fused")):
        params_t, params_o = params_like_torchs_tests(complex_=True), params_like_torchs_tests(complex_=True)
        opt_t = TORCH_INFO[name].optim_cls(params_t, **inp.kwargs)
        opt_o = ours(name, params_o, copy.deepcopy(inp.kwargs), backend)
        run_steps(opt_t, params_t, n=3)
        run_steps(opt_o, params_o, n=3)
        assert_same_state(opt_t, opt_o, params_t, params_o)
        assert opt_o.state[params_o[0]][next(iter(k for k in opt_o.state[params_o[0]] if k != "step"))].is_complex()


@pytest.mark.parametrize("kwargs", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.3),
                                    dict(momentum=0.9, nesterov=True, maximize=True)])
def test_sparse_gradients_as_torch_sgd(kwargs):
    """nn.Embedding(sparse=True): SVI's SGD base takes the sparse gradient as torch.optim.SGD does."""
    embs = []
    for _ in range(2):
        torch.manual_seed(0)
        embs.append(torch.nn.Embedding(12, 4, sparse=True))
    opt_t = torch.optim.SGD(embs[0].parameters(), lr=0.1, **kwargs)
    opt_o = sk.SVI(embs[1].parameters(), lr=0.1, **{"nesterov": False, **kwargs})
    for step in range(4):
        idx = torch.tensor([step, 3, 7, 3])
        for emb, opt in ((embs[0], opt_t), (embs[1], opt_o)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        torch.testing.assert_close(embs[1].weight, embs[0].weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("capturable", [False, True])
def test_dampening_kernels_as_torch_sgd(backend, capturable):
    """dampening in the fused kernels (float and tensor paths): torch's SGD, whose buffer takes its first
    step undamped; a parameter that joins later starts its own buffer the same way."""
    kw = dict(lr=0.05, momentum=0.8, dampening=0.4, weight_decay=0.01)
    params_t, params_o = params_like_torchs_tests(), params_like_torchs_tests()
    opt_t = torch.optim.SGD(params_t, **kw)
    opt_o = sk.SVI(params_o, nesterov=False, capturable=capturable, backend=backend, **kw)
    run_steps(opt_t, params_t, n=6)
    run_steps(opt_o, params_o, n=6)
    assert_same_state(opt_t, opt_o, params_t, params_o)


def _one_step(name, kwargs, p, grad, state):
    """One differentiable step from the given state; returns the new parameter and state tensors."""
    p = p.clone()
    p.grad = grad
    opt = OURS[name]([p], differentiable=True, **kwargs)
    opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    opt.step()
    return (p,) + tuple(v for k, v in opt.state[p].items() if k != "step")


@pytest.mark.parametrize("name,amsgrad", [("AdamW", False), ("AdamW", True), ("Adam", False), ("SGD", False)])
def test_differentiable_gradcheck(name, amsgrad):
    """differentiable=True: gradients flow through the step to the parameter, its gradient, the state
    and a tensor lr (and tensor betas), checked with torch.autograd.gradcheck as torch checks its own."""
    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.rand(*shape, generator=g, dtype=dt).requires_grad_()  # noqa: E731
    p, grad, lr = leaf(7), leaf(7), torch.tensor(0.01, dtype=dt, requires_grad=True)
    if name == "SGD":
        names = ["momentum_buffer"]
        kwargs = dict(momentum=0.9, dampening=0.2, weight_decay=0.1, nesterov=False)
    else:
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        kwargs = dict(weight_decay=0.1, amsgrad=amsgrad)
    tensors = [leaf(7) for _ in names]

    def fn(p, grad, lr, *state_tensors):
        state = dict(zip(names, state_tensors))
        if name != "SGD":
            state["step"] = torch.tensor(5.0, dtype=dt)
        return _one_step(name, {**kwargs, "lr": lr}, p, grad, state)

    assert torch.autograd.gradcheck(fn, (p, grad, lr, *tensors))
    if name != "SGD":  # tensor betas stay in the graph too
        b1, b2 = torch.tensor(0.9, dtype=dt, requires_grad=True), torch.tensor(0.99, dtype=dt, requires_grad=True)
        fn_b = lambda b1, b2, *st: _one_step(name, {**kwargs, "betas": (b1, b2)}, p.detach(), grad.detach(),  # noqa
                                             {**dict(zip(names, st)), "step": torch.tensor(5.0, dtype=dt)})
        assert torch.autograd.gradcheck(fn_b, (b1, b2, *tensors))


@pytest.mark.parametrize("name", NAMES)
def test_numeric_step_checkpoint_loads(name):
    """A state_dict whose ``step`` is a Python number (older torch) loads; the step becomes a tensor."""
    params = params_like_torchs_tests()
    opt = ours(name, params, {})
    run_steps(opt, params, n=2)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = st["step"].item()
    opt.load_state_dict(sd)
    run_steps(opt, params, n=1)
    assert all(isinstance(st["step"], torch.Tensor) for st in opt.state.values() if "step" in st)


@pytest.mark.parametrize("name", NAMES)
def test_fused_true_on_meta_params_raises_at_step(name):
    """fused=True on parameters no kernel serves: torch's RuntimeError when their state is created."""
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    opt = ours(name, model.parameters(), {"fused": True})
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()


# ------------------------------------------------------------------------------------ line searches
def _ls_inputs(extra):
    def inputs(device, dtype=None):
        return [co.OptimizerInput(params=None, kwargs={}, desc="default")] + [
            co.OptimizerInput(params=None, kwargs=dict(kw), desc=desc) for desc, kw in extra]
    return inputs


def _not_applicable(reason, *tests):
    return tuple(co.DecorateInfo(pytest.mark.skip(reason=reason), "TestOptimRenewed", t) for t in tests)


# Generic tests of torch's test_optim.py that do not apply to a line search, and why: there is no lr,
# and step() needs a closure. Those whose closure calls backward itself (torch's convention) or returns a
# constant apply: they are run below (test_line_search_torch_closure_*) and by the generic contract.
LS_NOT_APPLICABLE = (
    _not_applicable("no lr: the step size is searched", "test_tensor_lr", "test_param_groups_lr",
                    "test_load_state_dict_post_hook")
    + _not_applicable("step() without a closure", "test_param_groups_weight_decay"))


def line_search_infos():
    """OptimizerInfo entries for the line searches, shaped like torch's LBFGS entry: the step needs a
    closure, no foreach/fused/differentiable, no complex parameters, no LR scheduler (no lr). The
    torch tests listed in LS_NOT_APPLICABLE do not apply."""
    infos = [(sk.ArmijoSGD, [("small init", dict(init_step_size=0.5, c=0.2))]),
             (sk.AdamSLS, [("betas", dict(betas=(0.8, 0.99), init_step_size=0.05))]),
             (sk.LayerwiseAdamSLS, [("warmup", dict(warmup_steps=1))])]
    if hasattr(sk, "SaLSA"):
        infos.append((sk.SaLSA, [("c", dict(c=0.3))]))
    return [co.OptimizerInfo(cls, optim_inputs_func=_ls_inputs(extra), scheduler_inputs=(), supported_impls=(),
                             not_og_supported_flags=(), supports_complex=False, step_requires_closure=True,
                             skips=LS_NOT_APPLICABLE)
            for cls, extra in infos]


LS_INFOS = {info.name: info for info in line_search_infos()}


CLOSURE_FORMS = ("loss only", "torch's")


def _ls_setup(info, kwargs, named=False, seed=0, form="loss only"):
    """A small model, its optimizer and a closure: ours (the loss only) or torch's (zero_grad, backward,
    the loss)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    opt = info.optim_cls(model.named_parameters() if named else model.parameters(), **kwargs)
    if form == "loss only":
        return model, opt, (lambda: model(x).pow(2).mean())

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss
    return model, opt, closure


def _ls_step(opt, closure):
    opt.zero_grad()  # the line searches add a loss-only closure's gradient to .grad, as backward() does
    return opt.step(closure)


@pytest.mark.parametrize("name", list(LS_INFOS))
def test_line_search_scheduler_error_says_searched(name):
    model, opt, _ = _ls_setup(LS_INFOS[name], {})
    with pytest.raises(KeyError, match="step size is searched.*init_step_size"):
        StepLR(opt, step_size=1)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    opt.load_state_dict(opt.state_dict())
    with pytest.raises(KeyError, match="step size is searched"):
        opt.param_groups[-1]["lr"]
    assert copy.deepcopy(opt).param_groups[0].get("lr") is None


@pytest.mark.parametrize("form", CLOSURE_FORMS)
@pytest.mark.parametrize("name", list(LS_INFOS))
def test_line_search_generic_contract(name, form):
    """torch's generic optimizer checks that apply to any optimizer: printing, step hooks (local and
    global, in torch's order), state_dict hooks, state_dict round trips (named params, weights_only
    torch.load), deepcopy, a step with no gradients is a no-op, two param groups each searched; with
    our closure and with torch's."""
    info = LS_INFOS[name]
    for inp in info.optim_inputs_func("cpu"):
        model, opt, closure = _ls_setup(info, inp.kwargs, form=form)
        repr(opt)
        calls = []
        handles = [register_optimizer_step_pre_hook(lambda *a: calls.append(0)),
                   opt.register_step_pre_hook(lambda *a: calls.append(1)),
                   opt.register_step_post_hook(lambda *a: calls.append(2)),
                   register_optimizer_step_post_hook(lambda *a: calls.append(5))]
        opt.step(closure)
        for h in handles:
            h.remove()
        opt.step(closure)
        assert calls == [0, 1, 2, 5]
        opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("hooked", 1))
        assert opt.state_dict()["state"]["hooked"] == 1
        del opt.state["hooked"]
        opt._optimizer_state_dict_pre_hooks.clear()
        opt.register_load_state_dict_post_hook(lambda o: calls.append("loaded"))
        opt.load_state_dict(opt.state_dict())
        assert calls[-1] == "loaded"
        public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
        assert public(copy.deepcopy(opt)) == public(opt)

        # state_dict round trips, plain and named, through torch.save / torch.load(weights_only=True)
        for named0, named1 in ((False, False), (True, False), (False, True), (True, True)):
            model_a, opt_a, closure_a = _ls_setup(info, inp.kwargs, named=named0, form=form)
            for _ in range(3):
                _ls_step(opt_a, closure_a)
            model_b, opt_b, closure_b = _ls_setup(info, inp.kwargs, named=named1, form=form)
            model_b.load_state_dict(model_a.state_dict())
            buf = io.BytesIO()
            torch.save(opt_a.state_dict(), buf)
            buf.seek(0)
            opt_b.load_state_dict(torch.load(buf, weights_only=True))
            for _ in range(3):
                torch.testing.assert_close(_ls_step(opt_a, closure_a), _ls_step(opt_b, closure_b))
            for pa, pb in zip(model_a.parameters(), model_b.parameters()):
                torch.testing.assert_close(pa, pb)

        # no gradients anywhere: nothing moves
        frozen = [torch.randn(2, 3) for _ in range(2)]
        before = [p.clone() for p in frozen]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info.optim_cls(frozen, **inp.kwargs).step(lambda: torch.tensor(1.0))
        assert all(torch.equal(a, b) for a, b in zip(before, frozen))

        # two param groups: each searched on its own, the loss goes down
        model, _, closure = _ls_setup(info, inp.kwargs, form=form)  # (torch's zeroes the same parameters)
        opt = info.optim_cls([{"params": model[0].parameters()}, {"params": model[2].parameters()}], **inp.kwargs)
        start = closure().item()
        for _ in range(5):
            _ls_step(opt, closure)
        assert closure().item() < start
        assert len(opt.ls_state["step_sizes"]) == 2


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("name", list(LS_INFOS))
def test_line_search_torch_closure_goes_right_direction(name, contiguous):
    """torch's test_forloop_goes_right_direction: weight (10, 5) and bias, contiguous or not, 20 steps
    with torch's closure (zero_grad, backward, the loss): the loss goes down."""
    info = LS_INFOS[name]
    for inp in info.optim_inputs_func("cpu"):
        torch.manual_seed(0)
        shape_w, shape_b = ((10, 5), (10,)) if contiguous else ((10, 5, 2), (10, 2))
        weight, bias = torch.nn.Parameter(torch.randn(shape_w)), torch.nn.Parameter(torch.randn(shape_b))
        w, b = (weight, bias) if contiguous else (weight[..., 0], bias[..., 0])
        x = torch.randn(5)
        opt = info.optim_cls([weight, bias], **inp.kwargs)

        def closure():
            opt.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            return loss

        start = closure().item()
        for _ in range(20):
            opt.step(closure)
        assert closure().item() < start
        assert opt.ls_state["n_backwards"] == 20


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_tree, a, b))
    return a == b


@pytest.mark.parametrize("name", list(LS_INFOS))
def test_line_search_torch_closure_state_dict_deterministic(name):
    """torch's test_state_dict_deterministic and test_can_load_older_state_dict: an optimizer loaded from
    another's (deep-copied) state_dict steps as the other does with torch's closure, and their state_dicts
    stay equal."""
    info = LS_INFOS[name]
    for inp in info.optim_inputs_func("cpu"):
        model_a, opt_a, closure_a = _ls_setup(info, inp.kwargs, form="torch's")
        for _ in range(4):
            opt_a.step(closure_a)
        model_b, opt_b, closure_b = _ls_setup(info, inp.kwargs, form="torch's")
        model_b.load_state_dict(model_a.state_dict())
        sd = copy.deepcopy(opt_a.state_dict())
        opt_b.load_state_dict(sd)
        for _ in range(4):
            torch.testing.assert_close(opt_a.step(closure_a), opt_b.step(closure_b))
            for pa, pb in zip(model_a.parameters(), model_b.parameters()):
                torch.testing.assert_close(pa, pb)
        assert _same_tree(opt_a.state_dict(), opt_b.state_dict())


@pytest.mark.parametrize("name", list(LS_INFOS))
def test_line_search_constant_closure_is_a_no_op(name):
    """torch's test_step_is_noop_for_zero_grads and test_step_is_noop_when_params_have_no_grad: a closure
    returning a constant (shape [1]) moves nothing, with or without requires_grad; test_non_empty_state:
    with random gradients present the step runs and leaves state behind."""
    info = LS_INFOS[name]
    for inp in info.optim_inputs_func("cpu"):
        for requires_grad in (True, False):
            param = torch.randn(5, 1, requires_grad=requires_grad)
            old = param.detach().clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info.optim_cls([param], **inp.kwargs).step(lambda: torch.tensor([1.0]))
            assert torch.equal(param.detach(), old)
        model = torch.nn.Linear(3, 2)
        for p in model.parameters():
            p.grad = torch.rand_like(p)
        opt = info.optim_cls(model.parameters(), **inp.kwargs)
        with pytest.warns(UserWarning, match="does not require grad"):
            opt.step(lambda: torch.tensor(1.0))
        assert opt.ls_state["step"] == 1
        assert all(len(opt.state[p]) > 0 for p in model.parameters()) or name == "ArmijoSGD"
