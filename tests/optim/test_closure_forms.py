"""The line searches' closure forms (svi_kernels/optim/_closure.py): loss only, closure(backwards), and
torch's convention (the closure zeroes the gradients, calls backward and returns the loss, as LBFGS and
PyTorch Lightning call it). Every form takes the loss-only form's steps to the bit, over several steps
with backtracking, whichever way the closure zeroes the gradients."""
import gc
import threading
import weakref

import pytest
import torch

import svi_kernels as sk
from svi_kernels.optim import _closure

from helpers import one_thread  # noqa: F401
from test_search_schedule import _groups, _model

pytestmark = pytest.mark.usefixtures("one_thread")

MAKERS = {
    # large first steps: every step backtracks at least once, so trials run
    "ArmijoSGD": lambda ps: sk.ArmijoSGD(ps, init_step_size=50.0),
    "AdamSLS": lambda ps: sk.AdamSLS(ps, init_step_size=5.0),
    "SaLSA": lambda ps: sk.SaLSA(ps, init_step_size=5.0),
    "LayerwiseAdamSLS": lambda ps: sk.LayerwiseAdamSLS(ps, init_step_size=5.0, warmup_steps=2),
}
STEPS = 5


def _data(k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def loss_only(model, opt, x, y):
    opt.zero_grad()  # step() backpropagates into .grad
    return lambda: _loss(model, x, y)


def backwards_zeroing(set_to_none):
    """issue 27: closure(backwards) that zeroes the gradients itself."""
    def make(model, opt, x, y):
        def closure(backwards=False):
            if backwards:
                opt.zero_grad(set_to_none=set_to_none)
            loss = _loss(model, x, y)
            if backwards:
                loss.backward()
            return loss
        return closure
    return make


def torch_convention(set_to_none=True, as_number=False, enable_grad=False, module_zero_grad=False):
    """LBFGS's closure; ``enable_grad``: decorated like Lightning's (grad mode on whatever the caller's)."""
    def make(model, opt, x, y):
        def closure():
            (model if module_zero_grad else opt).zero_grad(set_to_none=set_to_none)
            loss = _loss(model, x, y)
            loss.backward()
            return loss.item() if as_number else loss
        return torch.enable_grad()(closure) if enable_grad else closure
    return make


FORMS = {
    "backwards, zero_grad()": backwards_zeroing(True),
    "backwards, zero_grad(set_to_none=False)": backwards_zeroing(False),
    "torch": torch_convention(),
    "torch, zero_grad(set_to_none=False)": torch_convention(set_to_none=False),
    "torch, model.zero_grad()": torch_convention(module_zero_grad=True),
    "torch, returns a float": torch_convention(as_number=True),
    "torch, enable_grad (Lightning)": torch_convention(enable_grad=True),
}


def _run(name, form, steps=STEPS):
    model = _model()
    opt = MAKERS[name](_groups(model, name))
    grads, backwards = [], []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: backwards.append(1))  # backwards that ran
    for k in range(steps):
        x, y = _data(k)
        opt.step(FORMS.get(form, loss_only)(model, opt, x, y))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(backwards) == steps
    return model, opt, grads


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(MAKERS))
def test_form_takes_the_loss_only_steps(name, form):
    """Same parameters, state and gradients (the step's: trials leave them alone) as the loss-only form,
    bit for bit; one backward per step (trials pay none)."""
    m1, o1, g1 = _run(name, "loss only")
    m2, o2, g2 = _run(name, form)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for s1, s2 in zip(g1, g2):
        assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for k, v in o1.state[p1].items():
            assert torch.equal(v, o2.state[p2][k]) if isinstance(v, torch.Tensor) else v == o2.state[p2][k]
    ls1, ls2 = o1.ls_state, o2.ls_state
    assert ls1["n_backwards"] == ls2["n_backwards"] == STEPS
    assert ls1["n_forwards"] == ls2["n_forwards"] > STEPS  # trials ran
    assert ls1["step_sizes"] == ls2["step_sizes"]


@pytest.mark.parametrize("name", list(MAKERS))
def test_backwards_closure_with_gradients_replaced_by_a_hook(name):
    """A closure(backwards) whose gradients end up as new tensors assigned to .grad (as a hook or a
    trainer may do) called backward: accepted, step after step."""
    model = _model()
    opt = MAKERS[name](_groups(model, name))
    x, y = _data(0)

    def closure(backwards=False):
        loss = _loss(model, x, y)
        if backwards:
            grads = torch.autograd.grad(loss, list(model.parameters()))
            for p, g in zip(model.parameters(), grads):
                p.grad = g
        return loss

    for _ in range(3):
        opt.step(closure)
    assert opt.ls_state["step"] == 3


@pytest.mark.parametrize("name", list(MAKERS))
def test_backwards_closure_that_does_not_call_backward_is_refused_with_gradients_present(name):
    """Gradients from an earlier step, untouched by a closure that ignores ``backwards``: refused."""
    model = _model()
    opt = MAKERS[name](_groups(model, name))
    x, y = _data(0)
    opt.step(backwards_zeroing(True)(model, opt, x, y))
    snap = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="did not call backward"):
        opt.step(lambda backwards=False: _loss(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snap))
    assert opt.ls_state["step"] == 1


def test_gradient_marks_hold_no_gradient_alive():
    """The marks refer to the gradients weakly: zero_grad() frees them, and a new gradient (even one
    that reuses the freed one's address) reads as changed."""
    model = _model()
    _loss(model, *_data(0)).backward()
    params = list(model.parameters())
    old = weakref.ref(params[0].grad)
    marks = _closure.grad_marks(params)
    model.zero_grad()
    gc.collect()
    assert old() is None
    _loss(model, *_data(0)).backward()
    assert _closure.grads_changed(marks, params)
    marks = _closure.grad_marks(params)
    assert not _closure.grads_changed(marks, params)
    params[-1].grad.zero_()
    assert _closure.grads_changed(marks, params)


def test_trial_turns_backward_off_in_its_own_thread_only():
    """backward_off: a no-op here, torch's backward in another thread, torch's again after it (even when
    the body raises)."""
    real = torch.autograd.backward
    w = torch.ones(2, requires_grad=True)
    seen = {}

    def other():
        (w * 2).sum().backward()
        seen["grad"] = w.grad.clone()

    with pytest.raises(KeyError):
        with _closure.backward_off():
            (w * 3).sum().backward()
            assert w.grad is None
            t = threading.Thread(target=other)
            t.start()
            t.join()
            raise KeyError
    assert torch.equal(seen["grad"], torch.full((2,), 2.0))
    assert torch.autograd.backward is real


@pytest.mark.parametrize("name", list(MAKERS))
def test_trial_that_raises_puts_the_gradients_back(name):
    """A torch-convention closure that raises during a trial: the error comes through, the step's
    gradients are back on the parameters, backward works again."""
    model = _model()
    opt = MAKERS[name](_groups(model, name))
    x, y = _data(0)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("trial")
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(KeyError, match="trial"):
        opt.step(closure)
    assert all(p.grad is not None for p in model.parameters())
    assert torch.autograd.backward is _closure.torch.autograd.backward
    _loss(model, x, y).backward()


@pytest.mark.parametrize("name", list(MAKERS))
def test_loss_that_does_not_depend_on_the_parameters_is_a_no_op_step(name):
    """As torch's optimizers: nothing to differentiate, no gradient, nothing moves (with a warning)."""
    model = _model()
    opt = MAKERS[name](_groups(model, name))
    snap = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="does not require grad"):
        opt.step(lambda: torch.tensor(2.0, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snap))
