"""``state_dtype="int8"`` (issue 24 phase 2, svi_kernels/optim/state_storage.py) on every optimizer that keeps
state: blockwise 8-bit moments (int8 codes of m and momentum buffers, uint8 codes of v) with one float32 scale
per ``state_block_size`` elements (the codec of svi_kernels/backends/state_storage.py).

- the state keys and dtypes, for fp32/bf16/fp16 parameters and fp32 masters; the group's block size;
- memory from the live tensors: <= 2.1 B/param for AdamW and each Adam line search (fp32 parameters);
- training with int8 state follows fp32 state on a small problem (tolerances stated in the tests);
- state_dict round trips exactly, resume is bit-identical, checkpoints convert between fp32/bf16 and int8;
- every bad input is refused before anything changes; other settings call the ops exactly as before.

Run on the reference backend; on the compiled CPU kernels and Triton (interpreter) once their ops take the
int8 keywords (skipped before).
"""
import copy
import importlib
import inspect

import pytest
import torch

import svi_kernels as sk
from helpers import CPU_BACKENDS, batch, one_thread, tiny_mlp  # noqa: F401
from svi_kernels.backends import backends, compiled
from svi_kernels.backends import state_storage as codec
from svi_kernels.optim import state_storage
from test_in_place_trials import _held_bytes
from test_state_dtype import (FACTORIES, LINE_SEARCHES, _same_state, _setup, _state_keys, _train,
                              check_grad_scaler, check_resume_is_bit_identical, check_torch_compile_matches_eager,
                              check_trains_like_fp32_state)

pytestmark = pytest.mark.usefixtures("one_thread")

BF16, F32, F16, F64 = torch.bfloat16, torch.float32, torch.float16, torch.float64
INT8 = "int8"
CODES = {"exp_avg": torch.int8, "momentum_buffer": torch.int8, "exp_avg_sq": torch.uint8,
         "max_exp_avg_sq": torch.uint8}


def _backend_param(name):
    if name == "cpu":
        if not backends()["cpu"]["available"]:
            return pytest.param("cpu", id="cpu", marks=pytest.mark.skip(reason=backends()["cpu"]["reason"]))
        if ("exp_avg_scales" not in inspect.signature(compiled.adam_step).parameters
                or "exp_avg_scales" not in str(torch.ops.svi_kernels.adam_step.default._schema)):  # (built before)
            return pytest.param("cpu", id="cpu", marks=pytest.mark.skip(reason="compiled kernels predate int8 state"))
        return pytest.param("cpu", id="cpu")
    triton = [b for b in CPU_BACKENDS if b.id == "triton"]
    module = importlib.import_module("svi_kernels.backends.triton")
    if triton and "exp_avg_scales" not in inspect.signature(module.adam_step).parameters:
        return pytest.param("triton", id="triton", marks=pytest.mark.skip(reason="Triton kernels predate int8 state"))
    return triton[0] if triton else pytest.param("triton", id="triton", marks=pytest.mark.skip(reason="no triton"))


BACKENDS = [pytest.param("reference", id="reference"), _backend_param("cpu"), _backend_param("triton")]


def _check_int8_state(opt, params, keys, block):
    for p in params:
        st = opt.state[p]
        for k in keys:
            assert st[k].dtype == CODES[k] and st[k].shape == p.shape and st[k].is_contiguous(), k
            scale = st[k + "_scale"]
            assert scale.dtype == F32 and scale.shape == (-(-p.numel() // block),), k


# ------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("param_dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_int8_state_keys_dtypes_and_block_size(name, param_dtype):
    model, opt = _setup(name, "reference", dtype=param_dtype, state_dtype=INT8, state_block_size=32)
    _train(model, opt, name, 3, dtype=param_dtype)
    _check_int8_state(opt, list(model.parameters()), _state_keys(name), 32)
    assert {g["state_dtype"] for g in opt.param_groups} == {INT8}
    assert {g["state_block_size"] for g in opt.param_groups} == {32}
    if name in LINE_SEARCHES:  # a fresh optimizer's state_dict creates missing moments the same way
        fresh = FACTORIES[name](list(tiny_mlp(dtype=param_dtype).parameters()), "reference", state_dtype="INT8")
        fresh.state_dict()
        _check_int8_state(fresh, [p for g in fresh.param_groups for p in g["params"]], _state_keys(name), 256)


@pytest.mark.parametrize("name", ["AdamW", "SVI-sgd", "SVI-adam"])
def test_master_weights_with_int8_state(name):
    """bf16 parameters, fp32 masters, int8 state: codes of the master's shape; resume bit-identical."""
    model, opt = _setup(name, "reference", dtype=BF16, master_weights=True, state_dtype=INT8)
    _train(model, opt, name, 3, dtype=BF16)
    _check_int8_state(opt, list(model.parameters()), _state_keys(name), 256)
    assert all(opt.state[p]["master_param"].dtype == F32 for p in model.parameters())
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, name, 3, start=3, dtype=BF16)
    model2, opt2 = _setup(name, "reference", dtype=BF16, master_weights=True, state_dtype=INT8)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    _train(model2, opt2, name, 3, start=3, dtype=BF16)
    _same_state(opt, opt2, model, model2)


def _wide_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 3))


@pytest.mark.parametrize("name", ["AdamW", "AdamSLS", "SaLSA", "LayerwiseAdamSLS"])
def test_int8_state_holds_at_most_2_1_bytes_per_param(name):
    """Counted from every tensor reachable from the optimizer (test_in_place_trials._held_bytes): 1 B of code
    per value of m and v, 4 B per block of 256 (per tensor, the last block short), AdamW's 4-byte step
    counter per tensor; <= 2.1 B/param (2 + 8/256 = 2.03 for large tensors)."""
    model = _wide_mlp()
    params = list(model.parameters())
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), torch.randint(0, 3, (32,))
    opt = FACTORIES[name](params, "reference", state_dtype=INT8)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    n = sum(p.numel() for p in params)
    counters = 4 * len(params) if name == "AdamW" else 0
    blocks = sum(-(-p.numel() // 256) for p in params)
    held = _held_bytes(opt, params + [p.grad for p in params])
    assert held == 2 * n + 2 * 4 * blocks + counters
    assert held / n <= 2.1, f"{held / n:.3f} B/param"


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_int8_state_trains_like_fp32_state(name, backend):
    """12 steps on one batch: the loss decrease with int8 state within 10 % of fp32 state's (bf16: 5 %), AdamW
    and SVI's parameters within 15 % of the largest move (bf16: 3 %)."""
    check_trains_like_fp32_state(name, backend, INT8, loss_tol=0.10, move_tol=0.15)


@pytest.mark.parametrize("name", ["AdamW", "SVI-sgd", "AdamSLS"])
def test_the_stored_state_is_the_codec_of_the_fp32_update(name):
    """One step from zero state: the stored codes and scales are exactly the codec's encoding of the fp32
    state after the same step (the ops' format, with the group's block size)."""
    model32, opt32 = _setup(name, "reference")
    model8, opt8 = _setup(name, "reference", state_dtype=INT8, state_block_size=64)
    _train(model32, opt32, name, 1), _train(model8, opt8, name, 1)
    for p32, p8 in zip(model32.parameters(), model8.parameters()):
        for k in _state_keys(name):
            codes, scales = codec.encode_int8(opt32.state[p32][k], CODES[k] == torch.int8, 64)
            assert torch.equal(opt8.state[p8][k], codes) and torch.equal(opt8.state[p8][k + "_scale"], scales), k


# --------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_with_int8_state_is_bit_identical(name, backend, tmp_path):
    saved, opt2 = check_resume_is_bit_identical(name, backend, tmp_path, state_dtype=INT8, state_block_size=128)
    assert saved["opt"]["param_groups"][0][state_storage.CALLS_KEY] == 0  # (int8 state draws no seeds)
    _check_int8_state(opt2, [p for g in opt2.param_groups for p in g["params"]], _state_keys(name), 128)


@pytest.mark.parametrize("param_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trips_exactly(name, param_dtype):
    """torch casts every state tensor of a floating parameter to its dtype on load (codes and scales too,
    bf16 scales would lose bits): they come back as saved."""
    model, opt = _setup(name, "reference", dtype=param_dtype, state_dtype=INT8)
    _train(model, opt, name, 3, dtype=param_dtype)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = FACTORIES[name](list(model.parameters()), "reference", state_dtype=INT8)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        assert opt2.state[p].keys() == opt.state[p].keys()
        for k, v in opt.state[p].items():
            assert opt2.state[p][k].dtype == v.dtype and torch.equal(opt2.state[p][k], v), k


@pytest.mark.parametrize("source", [None, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_float_checkpoint_into_int8_optimizer_and_back(name, source):
    """An fp32 (bf16) state checkpoint loads into an int8 optimizer encoded with its block size (nearest in the
    code domain); its int8 checkpoint loads into an fp32 optimizer decoded exactly."""
    model, opt = _setup(name, "reference", state_dtype=source)
    _train(model, opt, name, 3)
    sd = copy.deepcopy(opt.state_dict())
    opt8 = FACTORIES[name](list(model.parameters()), "reference", state_dtype=INT8, state_block_size=64)
    opt8.load_state_dict(sd)
    saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
    params = [p for g in opt8.param_groups for p in g["params"]]
    for i, p in zip(saved_ids, params):
        for k in _state_keys(name):
            codes, scales = codec.encode_int8(sd["state"][i][k].float(), CODES[k] == torch.int8, 64)
            assert torch.equal(opt8.state[p][k], codes) and torch.equal(opt8.state[p][k + "_scale"], scales), k
    assert {(g["state_dtype"], g["state_block_size"]) for g in opt8.param_groups} == {(INT8, 64)}
    _train(model, opt8, name, 2, start=3)  # and it goes on from there

    sd8 = copy.deepcopy(opt8.state_dict())
    back = FACTORIES[name](list(model.parameters()), "reference")
    back.load_state_dict(sd8)
    for p in params:
        for k in _state_keys(name):
            want = codec.decode_int8(opt8.state[p][k], opt8.state[p][k + "_scale"], 64)
            assert back.state[p][k].dtype == F32 and torch.equal(back.state[p][k], want), k
            assert k + "_scale" not in back.state[p]
    assert {g["state_dtype"] for g in back.param_groups} == {None}
    # and encoded again: the codes it came from (the codec is idempotent on its own values)
    again = FACTORIES[name](list(model.parameters()), "reference", state_dtype=INT8, state_block_size=64)
    again.load_state_dict(copy.deepcopy(back.state_dict()))
    for p in params:
        for k in _state_keys(name):
            assert torch.equal(again.state[p][k], opt8.state[p][k]), k


def test_int8_checkpoint_into_another_block_size():
    """Decoded with the checkpoint's block size, encoded with this optimizer's."""
    model, opt = _setup("AdamW", "reference", state_dtype=INT8, state_block_size=32)
    _train(model, opt, "AdamW", 3)
    opt2 = FACTORIES["AdamW"](list(model.parameters()), "reference", state_dtype=INT8, state_block_size=256)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert {g["state_block_size"] for g in opt2.param_groups} == {256}
    for p in model.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            values = codec.decode_int8(opt.state[p][k], opt.state[p][k + "_scale"], 32)
            codes, scales = codec.encode_int8(values, CODES[k] == torch.int8, 256)
            assert torch.equal(opt2.state[p][k], codes) and torch.equal(opt2.state[p][k + "_scale"], scales)


def test_setting_changed_between_steps_converts_the_state():
    model, opt = _setup("AdamW", "reference")
    _train(model, opt, "AdamW", 2)
    for g in opt.param_groups:
        g["state_dtype"] = INT8
    _train(model, opt, "AdamW", 2, start=2)
    _check_int8_state(opt, list(model.parameters()), ("exp_avg", "exp_avg_sq"), 256)
    for g in opt.param_groups:
        g["state_dtype"] = None
    _train(model, opt, "AdamW", 1, start=4)
    assert {opt.state[p]["exp_avg"].dtype for p in model.parameters()} == {F32}
    assert not any("exp_avg_scale" in opt.state[p] for p in model.parameters())


def test_block_size_changed_between_steps_is_refused_before_anything_changes():
    model, opt = _setup("AdamW", "reference", state_dtype=INT8)
    _train(model, opt, "AdamW", 2)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["state_block_size"] = 64
    with pytest.raises(ValueError, match="state_block_size changed"):
        _train(model, opt, "AdamW", 1, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for k, st in before["state"].items():
        assert all(torch.equal(opt.state_dict()["state"][k][key], v) for key, v in st.items())


# ------------------------------------------------------------------------------------------- errors
OPTIMIZER_CLASSES = {"AdamW": sk.AdamW, "SVI": sk.SVI, "AdamSLS": sk.AdamSLS, "SaLSA": sk.SaLSA,
                     "LayerwiseAdamSLS": sk.LayerwiseAdamSLS}


@pytest.mark.parametrize("cls", list(OPTIMIZER_CLASSES.values()), ids=list(OPTIMIZER_CLASSES))
def test_bad_int8_settings_are_refused(cls):
    p = torch.nn.Parameter(torch.zeros(3))
    for bad in (0, 16, 100, 8192, 256.0, True, "256"):
        with pytest.raises(ValueError, match="Invalid state_block_size"):
            cls([p], state_dtype=INT8, state_block_size=bad)
    with pytest.raises(ValueError, match="Invalid state_block_size"):  # in a param group too
        cls([{"params": [p], "state_dtype": INT8, "state_block_size": 48}])
    with pytest.raises(ValueError, match="int8 state is kept for float32, float16 and bfloat16"):
        cls([torch.nn.Parameter(torch.zeros(3, dtype=F64))], state_dtype=INT8)
    with pytest.raises(ValueError, match="complex"):
        cls([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], state_dtype=INT8)
    cls([p], state_dtype="INT8", state_block_size=4096)


def test_refused_int8_param_group_changes_nothing():
    model, opt = _setup("AdamW", "reference", state_dtype=INT8)
    _train(model, opt, "AdamW", 2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="int8 state is kept"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=F64))]})
    assert len(opt.param_groups) == len(before["param_groups"])
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]


def _damaged(sd, how):
    sd = copy.deepcopy(sd)
    st = next(v for k, v in sd["state"].items() if isinstance(k, int))
    if how == "no scale":
        del st["exp_avg_scale"]
    elif how == "short scale":
        st["exp_avg_scale"] = st["exp_avg_scale"][:0]
    elif how == "codes shape":
        st["exp_avg"] = st["exp_avg"].reshape(-1)[:1]
    elif how == "codes dtype":
        st["exp_avg_sq"] = st["exp_avg_sq"].to(torch.int8)
    elif how == "block size":
        sd["param_groups"][0]["state_block_size"] = 100
    return sd


@pytest.mark.parametrize("how", ["no scale", "short scale", "codes shape", "codes dtype", "block size"])
@pytest.mark.parametrize("name", ["AdamW", "SVI-adam", "AdamSLS"])
def test_a_checkpoint_whose_int8_state_does_not_fit_is_refused_before_anything_changes(name, how):
    model, opt = _setup(name, "reference", state_dtype=INT8)
    _train(model, opt, name, 2)
    bad = _damaged(opt.state_dict(), how)
    target_model, target = _setup(name, "reference", state_dtype=INT8, state_block_size=64)
    _train(target_model, target, name, 1)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="load_state_dict: parameter 0 .*int8 state"):
        target.load_state_dict(bad)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        if isinstance(k, int):
            assert all(torch.equal(after["state"][k][key], v) for key, v in st.items())


# ----------------------------------------------------------------------------------------- the ops
def _spy_keywords(monkeypatch):
    """Every call of the state ops on the reference backend: (op name, sorted int8 keywords it got)."""
    module = importlib.import_module("svi_kernels.backends.reference")
    calls = []
    ops = ("adam_step", "adam_step_tensor", "sgd_momentum_step", "sgd_momentum_step_tensor", "ls_save_adam",
           "ls_trial_adam", "ls_final_adam", "ls_final_adam_from_trial")
    for op in ops:
        original = getattr(module, op)

        def spy(*a, _op=op, _original=original, **k):
            calls.append((_op, tuple(sorted(x for x in k if x.endswith("_scales") or x == "block_size")),
                          k.get("block_size")))
            return _original(*a, **k)
        monkeypatch.setattr(module, op, spy)
    return calls


@pytest.mark.parametrize("state_dtype", [None, F32, BF16], ids=["none", "fp32", "bf16"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_other_settings_call_the_ops_without_int8_keywords(name, state_dtype, monkeypatch):
    calls = _spy_keywords(monkeypatch)
    model, opt = _setup(name, "reference", state_dtype=state_dtype)
    _train(model, opt, name, 3)
    assert calls and all(kw == () for _op, kw, _b in calls), calls


@pytest.mark.parametrize("name", list(FACTORIES))
def test_int8_state_reaches_every_op_with_its_scales_and_block_size(name, monkeypatch):
    calls = _spy_keywords(monkeypatch)
    model, opt = _setup(name, "reference", state_dtype=INT8, state_block_size=512)
    _train(model, opt, name, 3)
    assert calls and all(kw and b == 512 for _op, kw, b in calls), calls
    want = {"SVI-sgd": ("block_size", "momentum_buffer_scales"),
            "AdamW-amsgrad": ("block_size", "exp_avg_scales", "exp_avg_sq_scales", "max_exp_avg_sq_scales")}
    for op, kw, _b in calls:
        if op in ("adam_step", "sgd_momentum_step", "ls_save_adam", "ls_final_adam", "ls_final_adam_from_trial"):
            assert kw == want.get(name, ("block_size", "exp_avg_scales", "exp_avg_sq_scales")), (op, kw)
        else:  # ls_trial_adam reads g and v only
            assert kw == ("block_size", "exp_avg_sq_scales"), (op, kw)


def test_grad_scaler_with_int8_state():
    """The tensor path (GradScaler) with int8 state: a step with an overflowing gradient changes nothing
    (codes and scales), and training follows the float path closely."""
    model, opt = check_grad_scaler(state_dtype=INT8)
    _check_int8_state(opt, list(model.parameters()), ("exp_avg", "exp_avg_sq"), 256)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), _backend_param("cpu")])
@pytest.mark.parametrize("name", ["AdamW", "SVI-adam", "SVI-sgd"])
def test_torch_compile_with_int8_state_matches_eager_without_recompiling(name, backend):
    """int8 state draws no seeds: the step compiles (the tensor path) with the codes, scales and block size."""
    check_torch_compile_matches_eager(name, backend, state_dtype=INT8)


def test_salsa_momentum_sums_with_int8_state_read_the_decoded_moments():
    """SaLSA(momentum_direction=True)'s S = sum(g * m_hat / (sqrt(v_hat) + eps)) (PyTorch ops, not a kernel)
    from int8 moments: the decoded values (float32), within float32 rounding of float64 on them (read as
    codes, S would be off by orders of magnitude)."""
    from svi_kernels.optim._line_search import DeviceSums, StepTensors
    from svi_kernels.optim.adamw import adam_scalars
    model, opt = _setup("SaLSA", "reference", state_dtype=INT8, momentum_direction=True, state_block_size=32)
    _train(model, opt, "SaLSA", 3)
    step = opt.ls_state["step"] + 2
    t = StepTensors(opt, with_moments=True)
    got = opt._momentum_sums(t, step, DeviceSums(t, [])).parts
    bc1, bc2_sqrt = adam_scalars(step, 0.9, 0.999, True)
    assert got and {m.dtype for m in t.exp_avgs} == {torch.int8}
    for pos, sums in got:
        for i, s in zip(pos, sums.tolist()):
            m = codec.decode_int8(t.exp_avgs[i], t.exp_avg_scales[i], 32).double()
            v = codec.decode_int8(t.exp_avg_sqs[i], t.exp_avg_sq_scales[i], 32).double()
            g = t.grads[i].double()
            want = float((g * m / (v.sqrt() / bc2_sqrt + 1e-8)).sum() / bc1)
            assert s == pytest.approx(want, rel=2e-5, abs=1e-12)


# -------------------------------------------------------------------------------------- the step plan
@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference-served"), _backend_param("cpu")])
@pytest.mark.parametrize("name", ["AdamW", "AdamW-amsgrad", "SVI-sgd", "SVI-adam", "AdamSLS", "SaLSA"])
def test_step_plan_with_int8_state_gives_the_bits_of_the_general_path(name, backend, monkeypatch):
    """The step plan (from the second step) holds the code lists, the scale lists and the block size, and
    steps bit for bit as the general path. AdamW/SVI plan the compiled backend only: "reference-served"
    hands the plan the reference module to check the plan's bookkeeping without a rebuilt extension."""
    from svi_kernels.backends import reference
    from svi_kernels.optim import step_plan
    if backend == "reference":
        original = step_plan._single_compiled_bucket
        monkeypatch.setattr(step_plan, "_single_compiled_bucket",
                            lambda *a, **k: original(*a, **k) and reference)
        monkeypatch.setattr(step_plan.bucketing._backends, "resolve", lambda name, device: "cpu")
        monkeypatch.setattr(step_plan.bucketing._backends, "get", lambda name: reference)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(step_plan, "ENABLED", enabled)
        model, opt = _setup(name, backend, state_dtype=INT8, state_block_size=64)
        _train(model, opt, name, 4)
        runs.append((model, opt))
    _same_state(runs[0][1], runs[1][1], runs[0][0], runs[1][0])
    plans = [v for v in runs[0][1].__dict__["_step_plans"].values() if isinstance(v, step_plan.GroupPlan)]
    assert plans
    if name not in LINE_SEARCHES:
        assert all(plan.int8["block_size"] == 64 for plan in plans)
