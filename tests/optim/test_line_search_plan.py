"""The line searches' step plan (step_plan.py, _line_search.StepTensors): a planned step leaves the
gradients to the ops' one-pass checks; when a gradient goes bad on a later step (non-contiguous,
another dtype, sparse), the step falls back to the general path: the same result or the same error
as without a plan, and after an error nothing (parameters, moments, ls_state) has moved."""
from __future__ import annotations

import copy

import pytest
import torch

import svi_kernels as sk
from svi_kernels.optim import input_checks
from svi_kernels.optim import step_plan
from svi_kernels.backends import get as get_backend
from helpers import one_thread, tiny_mlp  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not sk.backends()["cpu"]["available"], reason="the plan serves the compiled backend")]

MAKERS = {
    "ArmijoSGD": lambda ps, search, **kw: sk.ArmijoSGD(ps, init_step_size=5.0, n_batches_per_epoch=4, search=search,
                                                       **kw),
    "AdamSLS": lambda ps, search, **kw: sk.AdamSLS(ps, init_step_size=2.0, n_batches_per_epoch=4, search=search, **kw),
    "LayerwiseAdamSLS": lambda ps, search, **kw: sk.LayerwiseAdamSLS(
        [{"params": ps[:2]}, {"params": ps[2:]}], warmup_steps=1, init_step_size=2.0, n_batches_per_epoch=4,
        search=search, **kw),
    "SaLSA": lambda ps, search, **kw: sk.SaLSA(ps, init_step_size=2.0, search=search, **kw),
}
BAD_STEP = 3  # 0-based: with search=2 it is a skipped step, with "every" a searched one


def _bad(kind: str, p: torch.Tensor) -> None:
    if kind == "strided":
        p.grad = p.grad.t().contiguous().t() if p.grad.dim() == 2 else p.grad.repeat(2)[::2]
    elif kind == "double":
        p.grad.data = p.grad.data.double()
    elif kind == "sparse":
        p.grad = p.grad.to_sparse()


def _snapshot(model, opt):
    state = {i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
             for i, p in enumerate(model.parameters()) if p in opt.state}
    return [p.detach().clone() for p in model.parameters()], state, copy.deepcopy(opt.ls_state)


def _same_snapshots(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for k in a[1][i]:
            assert torch.equal(a[1][i][k], b[1][i][k]), (i, k)
    assert a[2] == b[2]


def _run(name, search, kind, which, plans, **kw):
    """Five steps, new gradient tensors each; on BAD_STEP parameter ``which`` gets a bad gradient.
    Returns (snapshot after the run or at the error, error or None, snapshot before the bad step)."""
    step_plan.ENABLED = plans
    try:
        model = tiny_mlp()
        params = list(model.parameters())
        opt = MAKERS[name](params, search, **kw)
        before = None
        for step in range(5):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad(set_to_none=True)
            hook = None
            if step == BAD_STEP:
                before = _snapshot(model, opt)
                hook = params[which].register_post_accumulate_grad_hook(lambda p: _bad(kind, p))
            try:
                opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
            except (RuntimeError, TypeError) as exc:
                return _snapshot(model, opt), exc, before
            finally:
                if hook is not None:
                    hook.remove()
        return _snapshot(model, opt), None, before
    finally:
        step_plan.ENABLED = True


@pytest.mark.parametrize("search", ["every", 2])
@pytest.mark.parametrize("which", [1, 5])  # group 0 / the last group of LayerwiseAdamSLS
@pytest.mark.parametrize("kind", ["strided", "double", "sparse"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_a_gradient_going_bad_gives_the_general_paths_result_or_error(name, kind, which, search):
    general, err_g, before_g = _run(name, search, kind, which, plans=False)
    planned, err_p, before_p = _run(name, search, kind, which, plans=True)
    _same_snapshots(before_g, before_p)
    assert type(err_g) is type(err_p) and str(err_g) == str(err_p)
    if kind == "sparse":
        assert "does not support sparse gradients" in str(err_p)
    if err_p is not None:
        _same_snapshots(planned, before_p)  # refused before anything moved
    _same_snapshots(general, planned)


@pytest.mark.parametrize("search", ["every", 2])
@pytest.mark.parametrize("kind", ["strided", "double", "sparse"])
@pytest.mark.parametrize("name", ["ArmijoSGD", "AdamSLS"])
def test_without_op_checks_the_plan_checks_in_python(name, kind, search):
    """The reference backend's ops write tensor by tensor: its plan checks the gradients in Python."""
    general, err_g, before_g = _run(name, search, kind, 1, plans=False, backend="reference")
    planned, err_p, before_p = _run(name, search, kind, 1, plans=True, backend="reference")
    assert type(err_g) is type(err_p) and str(err_g) == str(err_p)
    if err_p is not None:
        _same_snapshots(planned, before_p)
    _same_snapshots(general, planned)


@pytest.mark.parametrize("search", ["every", 2])
@pytest.mark.parametrize("name", list(MAKERS))
def test_planned_steps_check_gradients_only_in_the_ops(name, search, monkeypatch):
    calls = {"check_params": 0, "grads_pass_checks": 0}

    def counting(fn, key):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    model = tiny_mlp()
    opt = MAKERS[name](list(model.parameters()), search)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    monkeypatch.setattr(input_checks, "check_params", counting(input_checks.check_params, "check_params"))
    monkeypatch.setattr(step_plan, "grads_pass_checks", counting(step_plan.grads_pass_checks, "grads_pass_checks"))
    searched = []
    for _ in range(2):  # with search=2: one searched and one skipped step
        opt.zero_grad(set_to_none=True)
        opt.step(closure)
        searched.append(opt.ls_state["searched"])
    assert calls["check_params"] == 0
    # A skipped step of LayerwiseAdamSLS launches once per group: it checks the gradients in Python
    # first, so that a refusal in a later group cannot leave an earlier one stepped.
    assert calls["grads_pass_checks"] == (1 if name == "LayerwiseAdamSLS" and search == 2 else 0)
    assert searched == ([True, True] if search == "every" else [False, True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_skipped_sgd_step_has_the_bits_of_foreach_add(dtype):
    """ArmijoSGD's planned skipped step runs ls_trial_sgd(p, p, g, eta) (checked by the op) instead of
    torch._foreach_add_(p, g, alpha=-eta): the same bits, odd sizes and vector tails included."""
    cpu = get_backend("cpu")
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 1000, 4097, 65537]
    ps = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    gs = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    for eta in (1.1, 3.7e-3, 1e-6):
        a = [p.clone() for p in ps]
        b = [p.clone() for p in ps]
        torch._foreach_add_(a, gs, alpha=-eta)
        cpu.ls_trial_sgd(b, b, gs, [eta] * len(b))
        for x, y in zip(a, b):
            assert torch.equal(x, y)
