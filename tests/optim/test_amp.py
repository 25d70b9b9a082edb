"""AMP (torch.amp.GradScaler) and capturable mode of AdamW and SVI.

GradScaler hands ``grad_scale`` and ``found_inf`` to optimizers with ``_step_supports_amp_scaling``;
ours unscale the gradients inside the fused kernel (written back, as torch's fused optimizers do)
and skip a step with inf/nan gradients without a host sync. These run on CPU tensors, with
``torch.amp.GradScaler("cpu")``, against torch's fused optimizers under the same scaler.
"""
import copy

import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS, batch, tiny_mlp


def _loss(model, seed):
    x, y = batch(seed)
    return torch.nn.functional.cross_entropy(model(x), y)


def _amp_step(model, opt, scaler, seed, poison=False):
    opt.zero_grad()
    scaler.scale(_loss(model, seed)).backward()
    if poison:  # an overflow in one gradient: GradScaler must skip the whole step
        next(model.parameters()).grad.view(-1)[3] = float("inf")
    scaler.step(opt)
    scaler.update()


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}
    return params, state


def _assert_same(model_a, opt_a, model_b, opt_b, rtol=1e-5, atol=1e-6, grads=True):
    for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=n)
        if grads:
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=f"{n}.grad")
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol * 0.1, msg=k)


def test_grad_scaler_cpu_uses_the_fused_contract():
    """torch 2.13's GradScaler("cpu") sets grad_scale/found_inf on our optimizers and skips unscale_."""
    model = tiny_mlp()
    opt = sk.AdamW(model.parameters(), lr=1e-2)
    seen = {}
    original = opt.step

    def spy(*a, **k):
        seen["grad_scale"], seen["found_inf"] = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
        return original(*a, **k)

    opt.step = spy
    scaler = torch.amp.GradScaler("cpu")
    _amp_step(model, opt, scaler, seed=1)
    assert float(seen["grad_scale"]) == 2.0 ** 16 and float(seen["found_inf"]) == 0.0
    assert not hasattr(opt, "grad_scale")  # GradScaler removes them after the step


CASES = {
    "AdamW": (lambda ps, b: sk.AdamW(ps, lr=1e-2, weight_decay=0.02, backend=b),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.02, fused=True)),
    "SVI-sgd": (lambda ps, b: sk.SVI(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, backend=b),
                lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True)),
    "SVI-adam": (lambda ps, b: sk.SVI(ps, lr=1e-2, base="adam", weight_decay=1e-3, backend=b),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3, fused=True)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_fused_under_grad_scaler(backend, case):
    make_ours, make_torch = CASES[case]
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    o1, o2 = make_ours(list(m1.parameters()), backend), make_torch(list(m2.parameters()))
    s1, s2 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for i in range(4):
        _amp_step(m1, o1, s1, seed=i)
        _amp_step(m2, o2, s2, seed=i)
        _assert_same(m1, o1, m2, o2)  # grads too: unscaled in place like torch's fused kernels
    assert s1.get_scale() == s2.get_scale()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_inf_gradient_skips_the_step(backend, case):
    make_ours, make_torch = CASES[case]
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    o1, o2 = make_ours(list(m1.parameters()), backend), make_torch(list(m2.parameters()))
    s1, s2 = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for i in range(2):
        _amp_step(m1, o1, s1, seed=i)
        _amp_step(m2, o2, s2, seed=i)
    params, state = _snapshot(m1, o1)
    scaled_grads = None

    def poisoned_step(model, opt, scaler):
        nonlocal scaled_grads
        opt.zero_grad()
        scaler.scale(_loss(model, 7)).backward()
        next(model.parameters()).grad.view(-1)[3] = float("inf")
        scaled_grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()

    poisoned_step(m1, o1, s1)
    for p, before in zip(m1.parameters(), params):
        assert torch.equal(p, before)
    for i, p in enumerate(m1.parameters()):
        for k, v in o1.state[p].items():
            assert torch.equal(v, state[i][k]), f"state {k} of param {i} changed on a skipped step"
    for p, g in zip(m1.parameters(), scaled_grads):  # a skipped step does not even unscale (as torch's fused)
        assert torch.equal(p.grad, g)
    assert s1.get_scale() == 2.0 ** 15
    poisoned_step(m2, o2, s2)
    # and training goes on identically afterwards
    for i in range(8, 10):
        _amp_step(m1, o1, s1, seed=i)
        _amp_step(m2, o2, s2, seed=i)
    _assert_same(m1, o1, m2, o2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unscale_then_clip_then_step(backend):
    """scaler.unscale_(opt) first (to clip): found_inf is set, grad_scale is not; same as torch's fused."""
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    o1 = sk.AdamW(m1.parameters(), lr=1e-2, backend=backend)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, fused=True)
    for model, opt in ((m1, o1), (m2, o2)):
        scaler = torch.amp.GradScaler("cpu")
        for i in range(3):
            opt.zero_grad()
            scaler.scale(_loss(model, i)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
    _assert_same(m1, o1, m2, o2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_amp_run_equals_unscaled_run(backend):
    """fp32 with a power-of-two scale: scaling and unscaling are exact, so AMP changes nothing at all."""
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    o1 = sk.AdamW(m1.parameters(), lr=1e-2, backend=backend)
    o2 = sk.AdamW(m2.parameters(), lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler("cpu")
    for i in range(3):
        _amp_step(m1, o1, scaler, seed=i)
        o2.zero_grad()
        _loss(m2, i).backward()
        o2.step()
    _assert_same(m1, o1, m2, o2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_svi_field_under_grad_scaler(backend):
    """svi.attach + GradScaler: the field of the scaled loss is unscaled in the SVI step."""
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    h1, h2 = sk.svi.attach(m1), sk.svi.attach(m2)
    o1, o2 = sk.SVI(m1.parameters(), lr=0.05, backend=backend), sk.SVI(m2.parameters(), lr=0.05, backend=backend)
    scaler = torch.amp.GradScaler("cpu")
    for i in range(3):
        _amp_step(m1, o1, scaler, seed=i)
        o2.zero_grad()
        _loss(m2, i).backward()
        o2.step()
    h1.remove()
    h2.remove()
    _assert_same(m1, o1, m2, o2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("make", [
    lambda ps, b: sk.AdamW(ps, lr=torch.tensor(1e-2), capturable=True, backend=b),
    lambda ps, b: sk.SVI(ps, lr=torch.tensor(1e-2), capturable=True, backend=b),
    lambda ps, b: sk.SVI(ps, lr=torch.tensor(1e-2), base="adam", capturable=True, backend=b),
], ids=["AdamW", "SVI-sgd", "SVI-adam"])
def test_no_host_read_in_step(backend, make, count_reads):
    """capturable and GradScaler steps read nothing back (what a CUDA graph needs)."""
    model = tiny_mlp()
    opt = make(list(model.parameters()), backend)
    scaler = torch.amp.GradScaler("cpu")
    for i in range(2):
        opt.zero_grad()
        _loss(model, i).backward()
        count_reads["n"] = 0
        opt.step()
        assert count_reads["n"] == 0
        opt.zero_grad()
        scaler.scale(_loss(model, i)).backward()
        count_reads["n"] = 0
        scaler.step(opt)
        assert count_reads["n"] == 0
        scaler.update()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["AdamW", "SVI-sgd", "SVI-adam"])
def test_capturable_matches_float_path(backend, case):
    make = {
        "AdamW": lambda ps, **k: sk.AdamW(ps, weight_decay=0.02, backend=backend, **k),
        "SVI-sgd": lambda ps, **k: sk.SVI(ps, weight_decay=1e-3, backend=backend, **k),
        "SVI-adam": lambda ps, **k: sk.SVI(ps, base="adam", weight_decay=1e-3, backend=backend, **k),
    }[case]
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    o1 = make(list(m1.parameters()), lr=torch.tensor(1e-2), capturable=True)
    o2 = make(list(m2.parameters()), lr=torch.tensor(1e-2))
    sched1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)  # changes the lr tensor in place
    sched2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    for i in range(5):
        for model, opt, sched in ((m1, o1, sched1), (m2, o2, sched2)):
            opt.zero_grad()
            _loss(model, i).backward()
            opt.step()
            sched.step()
    exact = backend == "cpu"  # same double arithmetic in the C++ kernel as on the host
    _assert_same(m1, o1, m2, o2, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)
    for p in m1.parameters():
        if "step" in o1.state[p]:
            step = o1.state[p]["step"]
            assert step.dtype == torch.float32 and step.dim() == 0 and step.device == p.device
            assert float(step) == 5.0


def test_capturable_state_dict_round_trip():
    """torch's layout: a capturable state_dict loads into a float-path optimizer and back."""
    m1 = tiny_mlp()
    o1 = sk.AdamW(m1.parameters(), lr=1e-2, capturable=True)
    for i in range(2):
        o1.zero_grad()
        _loss(m1, i).backward()
        o1.step()
    m2 = copy.deepcopy(m1)
    o2 = sk.AdamW(m2.parameters(), lr=1e-2)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    assert o2.state_dict()["param_groups"][0]["capturable"] is True  # torch keeps the saved group flags
    o3 = torch.optim.AdamW(copy.deepcopy(m1).parameters(), lr=1e-2)
    o3.load_state_dict(copy.deepcopy(o1.state_dict()))
    assert set(o3.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("case", ["AdamW", "SVI-sgd", "SVI-adam"])
def test_cuda_graph_captures_the_step(backend, case):
    """capturable=True: the whole step() is captured in a CUDA graph; replays match eager steps."""
    if not sk.backends()[backend]["available"]:
        pytest.skip(sk.backends()[backend]["reason"])
    make = {
        "AdamW": lambda ps, lr: sk.AdamW(ps, lr=lr, capturable=True, backend=backend),
        "SVI-sgd": lambda ps, lr: sk.SVI(ps, lr=lr, capturable=True, backend=backend),
        "SVI-adam": lambda ps, lr: sk.SVI(ps, lr=lr, base="adam", capturable=True, backend=backend),
    }[case]
    m1 = tiny_mlp().cuda()
    m2 = copy.deepcopy(m1)
    lr1, lr2 = torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")
    o1, o2 = make(list(m1.parameters()), lr1), make(list(m2.parameters()), lr2)
    grads = []
    for i in range(4):
        m1.zero_grad()
        _loss_cuda = torch.nn.functional.cross_entropy(m1(batch(i)[0].cuda()), batch(i)[1].cuda())
        _loss_cuda.backward()
        grads.append([p.grad.clone() for p in m1.parameters()])
    for p, g in zip(m1.parameters(), grads[0]):
        p.grad = g.clone()
    for p, g in zip(m2.parameters(), grads[0]):
        p.grad = g.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o1.step()  # warm-up step: creates state, compiles kernels
    torch.cuda.current_stream().wait_stream(s)
    o2.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o1.step()
    for i in range(1, 4):
        lr1.fill_(1e-2 / i)
        lr2.fill_(1e-2 / i)
        for p1, p2, g in zip(m1.parameters(), m2.parameters(), grads[i]):
            p1.grad.copy_(g)
            p2.grad.copy_(g)
        graph.replay()
        o2.step()
    torch.cuda.synchronize()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grad_scaler_cuda_matches_torch_fused(backend):
    if not sk.backends()[backend]["available"]:
        pytest.skip(sk.backends()[backend]["reason"])
    m1 = tiny_mlp().cuda()
    m2 = copy.deepcopy(m1)
    o1 = sk.AdamW(m1.parameters(), lr=1e-2, backend=backend)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, fused=True)
    s1, s2 = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    for i in range(4):
        for model, opt, scaler in ((m1, o1, s1), (m2, o2, s2)):
            x, y = batch(i)
            opt.zero_grad()
            scaler.scale(torch.nn.functional.cross_entropy(model(x.cuda()), y.cuda())).backward()
            if i == 2:
                next(model.parameters()).grad.view(-1)[0] = float("nan")
            scaler.step(opt)
            scaler.update()
    _assert_same(m1, o1, m2, o2)
    assert all(o1.state[p]["step"].device == p.device for p in m1.parameters())
    assert float(o1.state[next(m1.parameters())]["step"]) == 3.0
