"""``state_dtype=`` (issue 24, svi_kernels/optim/state_storage.py) on every optimizer that keeps state:

- the state tensors get the asked dtype (beside fp32/fp16/bf16 parameters, with and without fp32 masters);
- memory from the live tensors: fp32 parameters with bf16 state hold 4 B/param (AdamW: + its step counters);
- training with bf16 state follows fp32 state closely, and the seeds reach the kernels (bf16 v follows the
  fp32 v under stochastic rounding where rounded to nearest it sticks);
- state_dict round trips, bit-identical resume (the seed counter travels with it), an fp32-state checkpoint
  into a bf16-state optimizer and back;
- every bad input refused before anything changes;
- ``state_dtype=None`` (and float32 beside fp32 parameters) calls the ops exactly as before: no state_seed.

Run on the reference backend, on the compiled CPU kernels once they take ``state_seed``, and on Triton
through its interpreter.
"""
import copy
import importlib
import inspect

import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS, batch, one_thread, tiny_mlp  # noqa: F401
from svi_kernels.backends import backends, compiled
from svi_kernels.optim import state_storage
from test_in_place_trials import _held_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

BF16, F32, F16, F64 = torch.bfloat16, torch.float32, torch.float16, torch.float64


def _cpu_param():
    if not backends()["cpu"]["available"]:
        return pytest.param("cpu", id="cpu", marks=pytest.mark.skip(reason=backends()["cpu"]["reason"]))
    if "state_seed" not in inspect.signature(compiled.adam_step).parameters:
        return pytest.param("cpu", id="cpu", marks=pytest.mark.skip(reason="compiled kernels predate state_seed"))
    return pytest.param("cpu", id="cpu")


# (Triton through its interpreter, as helpers.CPU_BACKENDS runs it)
BACKENDS = [pytest.param("reference", id="reference"), _cpu_param()] + [b for b in CPU_BACKENDS if b.id == "triton"]
LINE_SEARCHES = ("AdamSLS", "SaLSA", "LayerwiseAdamSLS")


def _groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:4]}, {"params": ps[4:]}]


FACTORIES = {  # name -> factory(params, backend, **kw)
    "AdamW": lambda ps, b, **kw: sk.AdamW(ps, lr=1e-2, backend=b, **kw),
    "AdamW-amsgrad": lambda ps, b, **kw: sk.AdamW(ps, lr=1e-2, amsgrad=True, backend=b, **kw),
    "SVI-sgd": lambda ps, b, **kw: sk.SVI(ps, lr=1e-2, backend=b, **kw),
    "SVI-adam": lambda ps, b, **kw: sk.SVI(ps, lr=1e-2, base="adam", backend=b, **kw),
    "AdamSLS": lambda ps, b, **kw: sk.AdamSLS(ps, init_step_size=1.0, n_batches_per_epoch=4, backend=b, **kw),
    "SaLSA": lambda ps, b, **kw: sk.SaLSA(ps, backend=b, **kw),
    "LayerwiseAdamSLS": lambda ps, b, **kw: sk.LayerwiseAdamSLS(_groups(ps), warmup_steps=2, init_step_size=1.0,
                                                                n_batches_per_epoch=4, backend=b, **kw),
}
STATE_KEYS = {"SVI-sgd": ("momentum_buffer",), "AdamW-amsgrad": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def _state_keys(name):
    return STATE_KEYS.get(name, ("exp_avg", "exp_avg_sq"))


def _train(model, opt, name, steps, start=0, dtype=F32, one_batch=False):
    """Steps on batch ``i`` (or batch 0 every time: ``one_batch``); returns the losses."""
    losses = []
    for i in range(start, start + steps):
        x, y = batch(seed=0 if one_batch else i, dtype=dtype)
        opt.zero_grad()

        def closure():
            return torch.nn.functional.cross_entropy(model(x).float(), y)
        if name in LINE_SEARCHES:
            losses.append(float(opt.step(closure).detach()))
        else:
            loss = closure()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def _setup(name, backend, dtype=F32, seed=0, **kw):
    model = tiny_mlp(seed=seed, dtype=dtype)
    return model, FACTORIES[name](list(model.parameters()), backend, **kw)


def _same_state(opt_a, opt_b, model_a, model_b):
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("param_dtype,state_dtype,want", [
    (F32, None, F32), (F32, F32, F32), (F32, BF16, BF16),
    (BF16, None, BF16), (BF16, F32, F32), (BF16, BF16, BF16),
    (F16, None, F16), (F16, F32, F32),
], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_has_the_asked_dtype(name, param_dtype, state_dtype, want):
    model, opt = _setup(name, "reference", dtype=param_dtype, state_dtype=state_dtype)
    _train(model, opt, name, 3, dtype=param_dtype)
    for p in model.parameters():
        assert p.dtype == param_dtype
        for k in _state_keys(name):
            assert opt.state[p][k].dtype == want, k
    if name in LINE_SEARCHES:  # a fresh optimizer's state_dict creates missing moments: the same dtype
        fresh = FACTORIES[name](list(tiny_mlp(dtype=param_dtype).parameters()), "reference", state_dtype=state_dtype)
        assert {v["exp_avg"].dtype for v in fresh.state_dict()["state"].values()} == {want}


@pytest.mark.parametrize("param_dtype,state_dtype,want", [(BF16, None, F32), (BF16, BF16, BF16), (F16, BF16, BF16),
                                                          (BF16, F32, F32)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name", ["AdamW", "SVI-sgd", "SVI-adam"])
def test_master_weights_keep_fp32_masters_beside_the_state_dtype(name, param_dtype, state_dtype, want):
    model, opt = _setup(name, "reference", dtype=param_dtype, master_weights=True, state_dtype=state_dtype)
    _train(model, opt, name, 2, dtype=param_dtype)
    for p in model.parameters():
        st = opt.state[p]
        assert st["master_param"].dtype == F32 and p.dtype == param_dtype
        assert {st[k].dtype for k in _state_keys(name)} == {want}


# ------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("name", ["AdamW", "AdamSLS", "SaLSA", "LayerwiseAdamSLS"])
def test_bf16_state_holds_4_bytes_per_param(name):
    """Counted from every tensor reachable from the optimizer (test_in_place_trials._held_bytes): the bf16
    moments, plus AdamW's 4-byte step counter per parameter tensor; 8 B/param with fp32 state."""
    held = {}
    for state_dtype in (None, BF16):
        model, opt = _setup(name, "reference", state_dtype=state_dtype)
        params = list(model.parameters())
        _train(model, opt, name, 4)
        held[state_dtype] = _held_bytes(opt, params + [p.grad for p in params])
    n = sum(p.numel() for p in model.parameters())
    counters = 4 * len(params) if name == "AdamW" else 0
    assert held[None] == 8 * n + counters
    assert held[BF16] == 4 * n + counters, f"{(held[BF16] - counters) / n:.2f} B/param"


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_bf16_state_trains_like_fp32_state(name, backend):
    check_trains_like_fp32_state(name, backend, BF16, loss_tol=0.05, move_tol=0.03)


def check_trains_like_fp32_state(name, backend, state_dtype, loss_tol, move_tol, steps=12):
    """``steps`` on one batch: the final loss within ``loss_tol`` of fp32 state's loss decrease; AdamW/SVI's
    parameters within ``move_tol`` of the largest move (lr * steps) of fp32 state's."""
    model32, opt32 = _setup(name, backend)
    model16, opt16 = _setup(name, backend, state_dtype=state_dtype)
    l32, l16 = _train(model32, opt32, name, steps, one_batch=True), _train(model16, opt16, name, steps, one_batch=True)
    assert l32[-1] < l32[0] and l16[-1] < l16[0]
    assert abs(l16[-1] - l32[-1]) <= loss_tol * (l32[0] - l32[-1]), (l16, l32)
    if name not in LINE_SEARCHES:  # (a search may pick another step size: no parameter-wise bound)
        for a, b in zip(model16.parameters(), model32.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=move_tol * 1e-2 * steps)
        assert any(not torch.equal(a, b) for a, b in zip(model16.parameters(), model32.parameters()))


def _second_moment_after_decay(state_dtype, monkeypatch=None):
    """AdamW's v of a parameter whose gradient drops from 1 to 0.1: fp32 v decays by 0.999 a step."""
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = sk.AdamW([p], lr=1e-6, weight_decay=0.0, backend="reference", state_dtype=state_dtype)
    for i in range(300):
        p.grad = torch.full_like(p, 1.0 if i < 50 else 0.1)
        opt.step()
    return opt.state[p]["exp_avg_sq"].float()


def test_bf16_v_follows_fp32_v_only_with_the_seeds(monkeypatch):
    """Why bf16 state is stored with stochastic rounding, at the optimizer level: v <- 0.999 v + 0.001 g^2
    changes v by less than half a bf16 ulp, so rounded to nearest (the ops called without state_seed) v
    stays where it was; with the optimizer's seeds its mean follows the fp32 v."""
    want = _second_moment_after_decay(None)
    sr = _second_moment_after_decay(BF16)
    assert abs(sr.mean().item() / want.mean().item() - 1) < 0.01
    monkeypatch.setattr(state_storage, "seed_kwarg", lambda *a: {})  # the same optimizer without seeds
    nearest = _second_moment_after_decay(BF16)
    assert nearest.mean().item() > 1.15 * want.mean().item(), "round to nearest should stick above the fp32 v"


# --------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_with_bf16_state_is_bit_identical(name, backend, tmp_path):
    saved, opt2 = check_resume_is_bit_identical(name, backend, tmp_path, state_dtype=BF16)
    assert saved["opt"]["param_groups"][0][state_storage.CALLS_KEY] == 3
    assert opt2.param_groups[0][state_storage.CALLS_KEY] == 6


def check_resume_is_bit_identical(name, backend, tmp_path, **kw):
    """3 steps, a checkpoint through torch.save, 3 more; a fresh optimizer resumed from it takes the same 3
    steps bit for bit. Returns (the checkpoint, the resumed optimizer)."""
    model, opt = _setup(name, backend, **kw)
    _train(model, opt, name, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, name, 3, start=3)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, opt2 = _setup(name, backend, seed=7, **kw)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, name, 3, start=3)
    _same_state(opt, opt2, model, model2)
    return saved, opt2


def test_resume_without_the_counter_draws_other_bits():
    """The counter matters: a checkpoint whose counter is reset resumes with other rounding bits (the
    test above would pass without it otherwise)."""
    name = "AdamW"
    model, opt = _setup(name, "reference", state_dtype=BF16)
    _train(model, opt, name, 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, name, 3, start=3)
    del saved["param_groups"][0][state_storage.CALLS_KEY]
    model2, opt2 = _setup(name, "reference", state_dtype=BF16)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0][state_storage.CALLS_KEY] == 0
    _train(model2, opt2, name, 3, start=3)
    assert any(not torch.equal(opt.state[a]["exp_avg_sq"], opt2.state[b]["exp_avg_sq"])
               for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_fp32_checkpoint_into_bf16_optimizer_and_back(name):
    model, opt32 = _setup(name, "reference")
    _train(model, opt32, name, 3)
    sd32 = copy.deepcopy(opt32.state_dict())
    opt16 = FACTORIES[name](list(model.parameters()), "reference", state_dtype=BF16)
    opt16.load_state_dict(sd32)
    saved_ids = [i for g in sd32["param_groups"] for i in g["params"]]
    params = [p for g in opt16.param_groups for p in g["params"]]
    for i, p in zip(saved_ids, params):
        for k in _state_keys(name):
            got, was = opt16.state[p][k], sd32["state"][i][k]
            assert got.dtype == BF16 and torch.equal(got, was.to(BF16)), k  # rounded to nearest
    assert [g["state_dtype"] for g in opt16.param_groups] == [BF16] * len(opt16.param_groups)
    if name not in LINE_SEARCHES:
        assert all(torch.equal(opt16.state[p].get("step", p), opt32.state[p].get("step", p)) for p in params)
    else:
        assert opt16.ls_state == opt32.ls_state
    _train(model, opt16, name, 2, start=3)  # and it goes on from there

    sd16 = copy.deepcopy(opt16.state_dict())
    back = FACTORIES[name](list(model.parameters()), "reference")
    back.load_state_dict(sd16)
    for p in params:
        for k in _state_keys(name):
            assert back.state[p][k].dtype == F32 and torch.equal(back.state[p][k], opt16.state[p][k].float()), k
    assert [g["state_dtype"] for g in back.param_groups] == [None] * len(back.param_groups)


def test_master_weights_with_bf16_state_resume_bit_identically():
    model, opt = _setup("AdamW", "reference", dtype=BF16, master_weights=True, state_dtype=BF16)
    _train(model, opt, "AdamW", 3, dtype=BF16)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, "AdamW", 3, start=3, dtype=BF16)
    model2, opt2 = _setup("AdamW", "reference", dtype=BF16, master_weights=True, state_dtype=BF16)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    assert {opt2.state[p]["master_param"].dtype for p in model2.parameters()} == {F32}
    _train(model2, opt2, "AdamW", 3, start=3, dtype=BF16)
    _same_state(opt, opt2, model, model2)


def test_setting_changed_between_steps_converts_the_state():
    model, opt = _setup("AdamW", "reference")
    _train(model, opt, "AdamW", 2)
    before = {p: opt.state[p]["exp_avg"].clone() for p in model.parameters()}
    opt.param_groups[0]["state_dtype"] = BF16
    _train(model, opt, "AdamW", 1, start=2)
    assert {opt.state[p]["exp_avg"].dtype for p in model.parameters()} == {BF16}
    assert any(not torch.equal(opt.state[p]["exp_avg"].float(), before[p]) for p in model.parameters())


# ------------------------------------------------------------------------------------------ seeds
def _spy_ops(monkeypatch, backend="reference"):
    """Every call of the ops that write state: (op name, its state_seed or the string 'absent')."""
    module = importlib.import_module(f"svi_kernels.backends.{backend}")
    calls = []
    for op in ("adam_step", "adam_step_tensor", "sgd_momentum_step", "sgd_momentum_step_tensor", "ls_save_adam"):
        original = getattr(module, op)

        def spy(*a, _op=op, _original=original, **k):
            calls.append((_op, k.get("state_seed", "absent")))
            return _original(*a, **k)
        monkeypatch.setattr(module, op, spy)
    return calls


@pytest.mark.parametrize("param_dtype,state_dtype", [(F32, None), (F32, F32), (BF16, None), (BF16, F32)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_no_seed_unless_bf16_state(name, param_dtype, state_dtype, monkeypatch):
    """state_dtype None / float32: the ops are called as before (no state_seed keyword), and float32 state
    beside fp32 parameters gives the bits of state_dtype=None."""
    calls = _spy_ops(monkeypatch)
    model, opt = _setup(name, "reference", dtype=param_dtype, state_dtype=state_dtype)
    _train(model, opt, name, 3, dtype=param_dtype)
    assert calls and {s for _, s in calls} == {"absent"}
    if state_dtype == F32 and param_dtype == F32:
        model0, opt0 = _setup(name, "reference")
        _train(model0, opt0, name, 3)
        _same_state(opt, opt0, model, model0)


@pytest.mark.parametrize("param_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_bf16_state_draws_a_new_seed_for_every_launch(name, param_dtype, monkeypatch):
    calls = _spy_ops(monkeypatch)
    model, opt = _setup(name, "reference", dtype=param_dtype, state_dtype=BF16)
    _train(model, opt, name, 4, dtype=param_dtype)
    seeds = [s for _, s in calls]
    assert len(seeds) >= 4 and "absent" not in seeds
    assert all(isinstance(s, int) and 0 <= s < 2 ** 31 for s in seeds)
    assert len(set(seeds)) == len(seeds), "a seed was used twice"
    if param_dtype == BF16:  # bf16 parameters: state_dtype=bf16 rounds stochastically, None to nearest
        model0, opt0 = _setup(name, "reference", dtype=BF16)
        _train(model0, opt0, name, 4, dtype=BF16)
        assert any(not torch.equal(opt.state[a][k], opt0.state[b][k]) for a, b in
                   zip(model.parameters(), model0.parameters()) for k in _state_keys(name))


def test_seeds_are_the_same_for_every_instance_and_differ_by_step():
    """What every rank computes alike (no randomness from the process): the seeds of two optimizers on
    the same parameters agree call by call."""
    draws = []
    for _ in range(2):
        opt = sk.AdamW([{"params": [torch.nn.Parameter(torch.zeros(3))]},
                        {"params": [torch.nn.Parameter(torch.zeros(3))]}], state_dtype=BF16)
        draws.append([[s.next(g) for g in opt.param_groups] for s in (state_storage.step_seeds(opt)
                                                                       for _ in range(3))])
    assert draws[0] == draws[1]
    flat = [s for step in draws[0] for s in step]
    assert len(set(flat)) == len(flat)
    assert state_storage.step_seeds(sk.AdamW([torch.nn.Parameter(torch.zeros(3))])) is state_storage.NO_SEEDS


def test_grad_scaler_with_bf16_state():
    """The tensor path (GradScaler) with bf16 state: the seeds reach adam_step_tensor, a step with an
    overflowing gradient changes nothing, and training follows the float path closely."""
    model, opt = check_grad_scaler(state_dtype=BF16)
    assert {opt.state[p]["exp_avg"].dtype for p in model.parameters()} == {BF16}


def check_grad_scaler(**kw):
    """AdamW under a GradScaler (the tensor path): a step with an inf in a gradient changes no state tensor,
    the others follow the float path within 1e-3. Returns (model, optimizer)."""
    model, opt = _setup("AdamW", "reference", **kw)
    ref_model, ref_opt = _setup("AdamW", "reference", **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for i in range(4):
        x, y = batch(seed=i)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if i == 2:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
            before = [copy.deepcopy(opt.state[p]) for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if i == 2:
            for p, st in zip(model.parameters(), before):
                assert all(torch.equal(opt.state[p][k], st[k]) for k in st if k != "step")
        else:
            _train(ref_model, ref_opt, "AdamW", 1, start=i)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    return model, opt


@pytest.mark.parametrize("name", ["AdamW", "SVI-adam"])
def test_torch_compile_with_bf16_state_matches_eager_without_recompiling(name):
    """A compiled training step: the seed-drawing step runs outside the graph, so no graph per step."""
    check_torch_compile_matches_eager(name, "reference", state_dtype=BF16)


def check_torch_compile_matches_eager(name, backend, **kw):
    """6 steps of a compiled training step (dynamo, graphs run eagerly) give the bits of eager steps, and
    nothing recompiles after the third."""
    model, opt = _setup(name, backend, **kw)
    ref_model, ref_opt = _setup(name, backend, **kw)
    x, y = batch()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def train_step(m, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    torch._dynamo.reset()
    compiled_step = torch.compile(train_step, backend=counting_backend)
    after_warmup = None
    for i in range(6):
        compiled_step(model, opt)
        train_step(ref_model, ref_opt)
        if i == 2:
            after_warmup = len(graphs)
    assert len(graphs) == after_warmup, "recompiled after warm-up"
    _same_state(opt, ref_opt, model, ref_model)


# ------------------------------------------------------------------------------------------- errors
OPTIMIZER_CLASSES = {"AdamW": sk.AdamW, "SVI": sk.SVI, "AdamSLS": sk.AdamSLS, "SaLSA": sk.SaLSA,
                     "LayerwiseAdamSLS": sk.LayerwiseAdamSLS}


@pytest.mark.parametrize("cls", list(OPTIMIZER_CLASSES.values()), ids=list(OPTIMIZER_CLASSES))
def test_bad_values_are_refused(cls):
    p = torch.nn.Parameter(torch.zeros(3))
    cls([p], state_dtype="int8")  # (issue 24 phase 2: tests/optim/test_state_dtype_int8.py)
    for bad in (torch.float16, torch.float64, "bfloat16", 2, torch.int8):
        with pytest.raises(ValueError, match="Invalid state_dtype.*supported: None"):
            cls([p], state_dtype=bad)
    with pytest.raises(ValueError, match="Invalid state_dtype 'int4'.*supported: None"):  # in a param group too
        cls([{"params": [p], "state_dtype": "int4"}])
    # keyword-only (LayerwiseAdamSLS passes it on to AdamSLS by keyword)
    signature = inspect.signature(sk.AdamSLS if cls is sk.LayerwiseAdamSLS else cls)
    assert signature.parameters["state_dtype"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("cls", list(OPTIMIZER_CLASSES.values()), ids=list(OPTIMIZER_CLASSES))
def test_parameter_dtypes_without_a_kernel_are_refused(cls):
    with pytest.raises(ValueError, match="float64 parameters keep float64 state"):
        cls([torch.nn.Parameter(torch.zeros(3, dtype=F64))], state_dtype=F32)
    with pytest.raises(ValueError, match="float16 parameters cannot keep bfloat16 state"):
        cls([torch.nn.Parameter(torch.zeros(3, dtype=F16))], state_dtype=BF16)
    cls([torch.nn.Parameter(torch.zeros(3, dtype=F64))])  # (None: today's state)
    cls([torch.nn.Parameter(torch.zeros(3, dtype=F16))], state_dtype=F32)


def test_fp16_params_take_bf16_state_beside_fp32_masters():
    p = torch.nn.Parameter(torch.zeros(3, dtype=F16))
    sk.AdamW([p], master_weights=True, state_dtype=BF16)
    with pytest.raises(ValueError, match="float16 parameters cannot keep bfloat16 state"):
        sk.AdamW([p], master_weights=False, state_dtype=BF16)


@pytest.mark.parametrize("cls", [sk.AdamW, sk.SVI])
def test_capturable_and_differentiable_refuse_bf16_state(cls):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="capturable=True with state_dtype=torch.bfloat16 .*replayed CUDA graph"):
        cls([p], capturable=True, state_dtype=BF16)
    cls([p], capturable=True, state_dtype=F32)
    with pytest.raises(ValueError, match="differentiable=True"):
        cls([p], differentiable=True, state_dtype=F32)


@pytest.mark.parametrize("name", ["AdamW", "SVI-sgd", "AdamSLS"])
def test_refused_param_group_changes_nothing(name):
    model, opt = _setup(name, "reference", state_dtype=BF16)
    _train(model, opt, name, 2)
    groups_before, sd_before = len(opt.param_groups), copy.deepcopy(opt.state_dict())
    extra = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="float64"):
        opt.add_param_group({"params": [extra]})
    with pytest.raises(ValueError, match="state_block_size"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "state_dtype": "int8",
                             "state_block_size": 100})
    assert len(opt.param_groups) == groups_before
    sd = opt.state_dict()
    assert sd["param_groups"] == sd_before["param_groups"]
    _train(model, opt, name, 1, start=2)  # still steps


def test_sparse_gradients_with_a_state_dtype_are_refused_before_anything_changes():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = sk.SVI(emb.parameters(), lr=0.1, state_dtype=F32)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients .*state_dtype"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state


@pytest.mark.parametrize("backend", [_cpu_param()])  # (AdamW/SVI plan the compiled backend only)
@pytest.mark.parametrize("name", ["AdamW", "SVI-sgd", "SVI-adam", "AdamSLS"])
def test_step_plan_gives_the_bits_of_the_general_path(name, backend, monkeypatch):
    """The step plan (compiled backend, from the second step) holds bf16 state lists beside fp32 parameters
    and draws the seeds as the general path does."""
    from svi_kernels.optim import step_plan
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(step_plan, "ENABLED", enabled)
        model, opt = _setup(name, backend, state_dtype=BF16)
        _train(model, opt, name, 4)
        runs.append((model, opt))
    _same_state(runs[0][1], runs[1][1], runs[0][0], runs[1][0])
    assert any(isinstance(v, step_plan.GroupPlan) for v in runs[0][1].__dict__["_step_plans"].values())


def test_salsa_momentum_sums_with_bf16_state_are_computed_in_float32():
    """SaLSA(momentum_direction=True)'s S = sum(g * m_hat / (sqrt(v_hat) + eps)) (PyTorch ops, not a kernel)
    from bf16 moments beside fp32 gradients: within float32 rounding of float64 on the same stored values
    (a bf16 denominator would be off by ~1e-3)."""
    from svi_kernels.optim._line_search import DeviceSums, StepTensors
    from svi_kernels.optim.adamw import adam_scalars
    model, opt = _setup("SaLSA", "reference", state_dtype=BF16, momentum_direction=True)
    _train(model, opt, "SaLSA", 3)
    step = opt.ls_state["step"] + 2
    t = StepTensors(opt, with_moments=True)
    got = opt._momentum_sums(t, step, DeviceSums(t, [])).parts
    bc1, bc2_sqrt = adam_scalars(step, 0.9, 0.999, True)
    for pos, sums in got:
        for i, s in zip(pos, sums.tolist()):
            g, m, v = (x.double() for x in (t.grads[i], t.exp_avgs[i], t.exp_avg_sqs[i]))
            want = float((g * m / (v.sqrt() / bc2_sqrt + 1e-8)).sum() / bc1)
            assert s == pytest.approx(want, rel=2e-5, abs=1e-12)
    assert {m.dtype for m in t.exp_avgs} == {BF16}


@pytest.mark.parametrize("name", ["AdamW", "AdamSLS"])
def test_parameters_turned_float64_are_refused_by_load_and_step(name):
    """Parameters whose dtype changed after construction (model.double()) to one the setting cannot hold:
    load_state_dict and step() raise before anything changes."""
    model, opt = _setup(name, "reference", state_dtype=BF16)
    _train(model, opt, name, 1)
    sd = copy.deepcopy(opt.state_dict())
    model.double()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="float64 parameters keep float64 state"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="float64 parameters keep float64 state"):
        _train(model, opt, name, 1, dtype=F64)
    for p, was in zip(model.parameters(), params):
        assert torch.equal(p, was) and opt.state[p].keys() == before[p].keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in before[p].items())


@pytest.mark.parametrize("name", ["AdamW", "SVI-sgd", "AdamSLS", "LayerwiseAdamSLS"])
def test_per_group_state_dtype(name, monkeypatch):
    """A param group may set its own state_dtype: its state takes it and its launches alone get seeds (the
    line searches bucket the groups apart)."""
    calls = _spy_ops(monkeypatch)
    model = tiny_mlp()
    ps = list(model.parameters())
    groups = _groups(ps)
    groups[1]["state_dtype"] = BF16
    if name == "LayerwiseAdamSLS":
        opt = FACTORIES[name](ps, "reference")
        opt.param_groups[1]["state_dtype"] = BF16  # (its factory makes the groups; changed before any state)
    else:
        opt = FACTORIES[name](groups, "reference")
    _train(model, opt, name, 3)
    for gi, group in enumerate(opt.param_groups):
        want = BF16 if gi == 1 else F32
        assert {opt.state[p][k].dtype for p in group["params"] for k in _state_keys(name)} == {want}
    seeded = [s for _, s in calls if s != "absent"]
    assert seeded and len(seeded) < len(calls), "only the bf16 group's launches take a seed"
