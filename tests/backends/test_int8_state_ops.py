"""Int8 optimizer state (issue 24 phase 2): int8 / uint8 code lists with float32 block scales on the 8 ops
that touch state, and the codec (svi_kernels/backends/state_storage.py: encode_int8, decode_int8).

- Each backend's codes and scales equal the reference's bit for bit, params and sums within the usual
  tolerance. The coefficients (beta1 = beta2 = momentum = 0.5, a loss scale of 4) make each new float32
  state value exact up to one rounding (test_state_storage_ops.py), so FMA contraction cannot move it: what
  is compared is the encode. Odd sizes, short last blocks, many tensors, one tensor over two chunks of
  32768, every block size, float32 / float16 / bfloat16 params.
- The codec against float64: each code is the nearest in the code domain (within half a step of the exact
  code), decode(encode(y)) within the bound that follows, a NaN block decodes to NaN and leaves the other
  blocks alone, an all-zero block to zeros, and a v above (0.5 / 255)^4 of its block's scale never decodes
  to 0 (the fourth-root companding; m's sqrt companding loses values under (0.5 / 127)^2 of its scale).
- Bad input (codes without scales, a scale list of the wrong length / dtype / shape, a bad block size,
  float64 params, mixed codes and floats) is refused before anything is written.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from backend_params import device_for
from svi_kernels.backends import get, reference
from svi_kernels.backends.state_storage import decode_int8, encode_int8, n_blocks
from tensor_factory import random_list

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
I8, U8 = torch.int8, torch.uint8
SIZES = [1, 7, 257, 70001, 33, 512, 129, 0, 5, 1000, 3, 255]  # 70001: over two chunks of 32768
BLOCK_SIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
TOL = {F32: (2e-5, 2e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}
NAN_BITS = 0x7FC00000


def ops_of(backend):
    """The backend's ops; those whose ops predate the int8 keywords skip (the compiled ones until
    csrc/ops_schema.cpp and compiled.py take them)."""
    if backend in ("cpu", "cuda"):
        from svi_kernels.backends import compiled
        if "block_size" not in inspect.signature(compiled.adam_step).parameters:
            pytest.skip("compiled kernels predate int8 state")
    impl = get(backend)
    if "block_size" not in inspect.signature(impl.adam_step).parameters:
        pytest.skip(f"{backend} kernels predate int8 state")
    return impl


def _codes(values, signed, block_size):
    pairs = [encode_int8(x.float(), signed, block_size) for x in values]
    return [q for q, _ in pairs], [s for _, s in pairs]


def make(tdt, device, seed=0, sizes=SIZES, block_size=256):
    """params, grads (param dtype); m (int8 codes), v, vmax (uint8 codes) and their scales; w0, dirs."""
    gen = torch.Generator().manual_seed(seed)
    L = dict(p=random_list(sizes, tdt, device, "n", gen), g=random_list(sizes, tdt, device, "n", gen))
    L["m"], L["ms"] = _codes(random_list(sizes, F32, device, "small", gen), True, block_size)
    L["v"], L["vs"] = _codes(random_list(sizes, F32, device, "pos", gen), False, block_size)
    L["vmax"], L["vmaxs"] = _codes(random_list(sizes, F32, device, "pos", gen), False, block_size)
    L["w0"] = [torch.zeros_like(p) for p in L["p"]]
    L["d"] = [torch.zeros_like(p) for p in L["p"]]
    return L


def clone(L, device=None):
    return {k: [t.clone() if device is None else t.to(device).clone() for t in ts] for k, ts in L.items()}


ADAM = dict(lr=1e-2, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.01, decoupled=True)
BC = dict(bias_correction1=0.75, bias_correction2_sqrt=math.sqrt(0.75))
SGD = dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.5)  # see test_state_storage_ops.py


def _mv(L, B):
    return dict(exp_avg_scales=L["ms"], exp_avg_sq_scales=L["vs"], block_size=B)


def _steps(n, device):
    return [torch.tensor(3.0 + i, device=device) for i in range(n)]


def _amp(device):
    return dict(lr=torch.tensor(1e-2, device=device), grad_scale=torch.tensor(4.0, device=device),
                found_inf=torch.tensor(0.0, device=device))


def _etas(L):
    return [0.01 * (i + 1) for i in range(len(L["p"]))]


# op -> call(ops, lists, block size, device) returning the sums or None
CALLS = {
    "adam_step": lambda o, L, B, d: o.adam_step(L["p"], L["g"], L["m"], L["v"], **ADAM, **BC, **_mv(L, B)),
    "adam_step_amsgrad": lambda o, L, B, d: o.adam_step(
        L["p"], L["g"], L["m"], L["v"], **ADAM, **BC, max_exp_avg_sqs=L["vmax"], max_exp_avg_sq_scales=L["vmaxs"],
        **_mv(L, B)),
    "adam_step_tensor": lambda o, L, B, d: o.adam_step_tensor(
        L["p"], L["g"], L["m"], L["v"], _steps(len(L["p"]), d), correct_bias=True, max_exp_avg_sqs=L["vmax"],
        max_exp_avg_sq_scales=L["vmaxs"], **_mv(L, B), **dict(ADAM, **_amp(d))),
    "sgd_momentum_step": lambda o, L, B, d: o.sgd_momentum_step(
        L["p"], L["g"], L["m"], **SGD, momentum_buffer_scales=L["ms"], block_size=B),
    "sgd_momentum_step_tensor": lambda o, L, B, d: o.sgd_momentum_step_tensor(
        L["p"], L["g"], L["m"], **dict(SGD, **_amp(d)), momentum_buffer_scales=L["ms"], block_size=B),
    "ls_save_adam": lambda o, L, B, d: o.ls_save_adam(
        L["p"], L["g"], L["m"], L["v"], L["w0"], L["d"], beta1=0.5, beta2=0.5, eps=1e-8,
        bias_correction2_sqrt=BC["bias_correction2_sqrt"], **_mv(L, B)),
    "ls_save_adam_in_place": lambda o, L, B, d: o.ls_save_adam(
        L["p"], L["g"], L["m"], L["v"], [], [], beta1=0.5, beta2=0.5, eps=1e-8,
        bias_correction2_sqrt=BC["bias_correction2_sqrt"], **_mv(L, B)),
    "ls_trial_adam": lambda o, L, B, d: o.ls_trial_adam(
        L["p"], L["g"], L["g"], L["v"], _etas(L), eps=1e-8, bias_correction2_sqrt=BC["bias_correction2_sqrt"],
        exp_avg_sq_scales=L["vs"], block_size=B),
    "ls_final_adam": lambda o, L, B, d: o.ls_final_adam(
        L["p"], L["g"], L["m"], L["v"], _etas(L), eps=1e-8, **BC, **_mv(L, B)),
    "ls_final_adam_from_trial": lambda o, L, B, d: o.ls_final_adam_from_trial(
        L["p"], L["g"], L["m"], L["v"], _etas(L), trial_eta=0.3, eps=1e-8, **BC, **_mv(L, B)),
}
# op -> the lists it writes: codes and scales compared bit for bit, the rest to tolerance
WRITES = {"adam_step": "p m ms v vs", "adam_step_amsgrad": "p m ms v vs vmax vmaxs",
          "adam_step_tensor": "p g m ms v vs vmax vmaxs", "sgd_momentum_step": "p m ms",
          "sgd_momentum_step_tensor": "p g m ms", "ls_save_adam": "m ms v vs w0 d",
          "ls_save_adam_in_place": "m ms v vs", "ls_trial_adam": "p", "ls_final_adam": "p",
          "ls_final_adam_from_trial": "p"}
EXACT = {"m", "ms", "v", "vs", "vmax", "vmaxs", "w0"}


def _bits(t):
    t = t.detach().cpu()
    return t.view(torch.int32) if t.dtype == F32 else t.view(torch.int16) if t.element_size() == 2 else t


def assert_lists(got, want, name, tdt):
    for i, (a, b) in enumerate(zip(got, want)):
        if name in EXACT:
            bad = _bits(a) != _bits(b)
            assert not bad.any(), (f"{name}[{i}] (numel {a.numel()}): {int(bad.sum())} elements differ from the "
                                   f"reference's bits, first at {int(bad.nonzero()[0])}")
        else:
            rtol, atol = TOL[tdt]
            torch.testing.assert_close(a.detach().cpu().double(), b.double(), rtol=rtol, atol=atol,
                                       equal_nan=True, msg=lambda m: f"{name}[{i}]: {m}")


def run_against_reference(backend, op, tdt, block_size=256, sizes=SIZES, seed=7, edit=None):
    impl = ops_of(backend)
    dev = device_for(backend)
    ours = make(tdt, dev, seed=seed, sizes=sizes, block_size=block_size)
    if edit is not None:
        edit(ours)
    want = clone(ours, "cpu")
    sums = CALLS[op](impl, ours, block_size, dev)
    want_sums = CALLS[op](reference, want, block_size, "cpu")
    for name in WRITES[op].split():
        assert_lists(ours[name], want[name], name, tdt)
    if sums is not None:
        torch.testing.assert_close(sums.cpu(), want_sums, rtol=1e-4, atol=1e-6, equal_nan=True)
    return ours


@pytest.mark.parametrize("tdt", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("op", list(CALLS))
def test_backend_equals_reference(backend, op, tdt):
    if backend == "reference":
        pytest.skip("the reference is the oracle of this test")
    run_against_reference(backend, op, tdt)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("op", ["adam_step_amsgrad", "sgd_momentum_step"])
def test_every_block_size_equals_reference(backend, op, block_size):
    if backend == "reference":
        pytest.skip("the reference is the oracle of this test")
    run_against_reference(backend, op, F32, block_size, sizes=[1, 31, 33, 4097, 9000, 5, 70001][::-1])


def _nan_and_zero_blocks(L):
    """Tensor 3 (70001 elements): a NaN gradient in its second block; tensor 9 (1000): its first block
    all zero (gradient, state and param), so its new moments are zero there."""
    L["g"][3][300] = float("nan")
    for k in ("p", "g"):
        L[k][9][:256] = 0
    for k in ("m", "v", "vmax"):
        L[k][9][:256] = 0


def test_nan_and_zero_blocks_equal_reference(backend):
    if backend == "reference":
        pytest.skip("the reference is the oracle of this test")
    run_against_reference(backend, "adam_step_amsgrad", F32, edit=_nan_and_zero_blocks)


def test_nan_block_is_nan_and_zero_block_is_zero():
    L = make(F32, "cpu", seed=3)
    _nan_and_zero_blocks(L)
    CALLS["adam_step_amsgrad"](reference, L, 256, "cpu")
    for key in ("m", "v"):
        scales = L[key + "s"]
        assert _bits(scales[3])[1].item() == NAN_BITS, f"{key}: the NaN block's scale is not the canonical NaN"
        assert (L[key][3][256:512] == 0).all()
        decoded = decode_int8(L[key][3], scales[3], 256)
        assert decoded[256:512].isnan().all() and not decoded[:256].isnan().any() and not decoded[512:].isnan().any()
        assert scales[9][0].item() == 0.0 and (L[key][9][:256] == 0).all()
        zero = decode_int8(L[key][9], scales[9], 256)[:256]
        assert (zero == 0).all() and not torch.signbit(zero).any()
    # this step's update used the new (unencoded) moments: only the NaN element's param is NaN; the next
    # step reads the NaN block, as a float32 state holding the NaN would spread it through the block's params
    assert L["p"][3].isnan().nonzero().flatten().tolist() == [300]
    L["g"][3][300] = 0.0
    CALLS["adam_step_amsgrad"](reference, L, 256, "cpu")
    assert L["p"][3].isnan().nonzero().flatten().tolist() == list(range(256, 512))


# ------------------------------------------------------------------------------------- the codec
def _exact_codes(y64, scale64, signed):
    """The code of each value in float64 before rounding: 127 sqrt(|y| / s) or 255 (y / s)^(1/4)."""
    r = (y64.abs() / scale64).clamp(max=1.0)
    return 127 * r.sqrt() if signed else 255 * r.sqrt().sqrt()


def _blocks_of(y, block_size):
    n = y.numel()
    pad = n_blocks(n, block_size) * block_size - n
    return torch.nn.functional.pad(y.double().abs(), (0, pad)).view(-1, block_size).amax(1)


@pytest.mark.parametrize("block_size", [32, 256, 4096])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_are_nearest_in_the_code_domain(signed, block_size):
    gen = torch.Generator().manual_seed(block_size)
    n = 3 * block_size + 17  # a short last block
    # magnitudes over 16 decades, so that each block holds values far below its absmax
    y = torch.randn(n, generator=gen, dtype=F64) * 10.0 ** torch.randint(-8, 8, (n,), generator=gen)
    y = y.float() if signed else (y * y).float()
    q, scales = encode_int8(y, signed, block_size)
    assert q.dtype == (I8 if signed else U8) and scales.dtype == F32
    assert scales.shape == (n_blocks(n, block_size),)
    assert torch.equal(scales.double(), _blocks_of(y, block_size))  # the absmax exactly
    scale64 = scales.double().repeat_interleave(block_size)[:n]
    exact = _exact_codes(y.double(), scale64, signed)
    got = q.to(torch.int64).abs().double()
    assert ((got - exact).abs() <= 0.5 + 1e-4).all(), (got - exact).abs().max()
    if signed:
        assert (q.min() >= -127) and torch.equal(torch.sign(q.to(torch.int64)), torch.sign(y * (got > 0)).long())
    # decode: the float64 formula within a few float32 ulps of the scale
    s = got / (127 if signed else 255)
    want = (s * s if signed else s ** 4) * scale64 * torch.sign(y.double())
    x = decode_int8(q, scales, block_size).double()
    assert ((x - want).abs() <= 4 * 2.0 ** -24 * scale64).all()
    # decode(encode(y)): within half a code step, so |x - y| <= scale ((c + 1/2)^k - c^k) / C^k at the code c
    c = exact
    k, C = (2, 127) if signed else (4, 255)
    bound = scale64 * ((c + 0.5) ** k - c ** k) / C ** k + 4 * 2.0 ** -24 * scale64
    assert ((x - y.double()).abs() <= bound).all()
    back = _exact_codes(x, scale64, signed)
    assert ((back - exact).abs() <= 0.5 + 1e-4).all()


def test_ties_round_half_to_even():
    """Values whose code value 127 sqrt(|y| * 1) is exactly k + 1/2 in float32 (found among the float32
    neighbours of ((k + 1/2) / 127)^2): the even neighbour, for m and for -m."""
    found = 0
    for k in (0, 1, 2, 125, 126):
        y = torch.tensor(((k + 0.5) / 127) ** 2, dtype=F32)
        lo, hi, near = y.clone(), y.clone(), [y]
        for _ in range(200):
            lo, hi = torch.nextafter(lo, torch.tensor(0.0)), torch.nextafter(hi, torch.tensor(2.0))
            near += [lo, hi]
        for t in (c for c in near if (c.double().sqrt().float() * 127).item() == k + 0.5):
            q, _ = encode_int8(torch.tensor([t.item(), -t.item(), 1.0]), True, 32)
            even = k if k % 2 == 0 else k + 1
            assert q[:2].tolist() == [even, -even], (k, t.item(), q)
            found += 1
    assert found >= 5


def test_encode_uses_the_correctly_rounded_sqrt():
    """sqrt(0.2159515768...) in float32 is 0.46470591 (sqrtf, sqrt.rn.f32); torch 2.13's AVX-512 float32 CPU sqrt
    gives 0.46470588, one ulp under, and 255 times that is the tie 118.5 -> 118 where the kernels store 119."""
    y = torch.tensor([0.19088035821914673, 4.0930633544921875])
    q, _ = encode_int8(y, False, 32)
    assert q.tolist() == [119, 255]


def test_small_v_never_decodes_to_zero():
    """A v above (0.5 / 255)^4 of its block's scale keeps a nonzero code (the Adam denominator sqrt(v)
    would otherwise jump to eps); m's sqrt companding keeps values above (0.5 / 127)^2."""
    scale = 3.0
    v_limit = scale * (0.5 / 255) ** 4 * 1.001
    m_limit = scale * (0.5 / 127) ** 2 * 1.001
    for signed, limit in ((False, v_limit), (True, m_limit)):
        y = torch.cat([torch.tensor([scale]), torch.logspace(math.log10(limit), math.log10(scale), 1000)]).float()
        q, scales = encode_int8(y, signed, 1024)
        x = decode_int8(q, scales, 1024)
        assert (x > 0).all(), (signed, y[x <= 0][:5])
        below, _ = encode_int8(torch.tensor([scale, limit / 1.01 / 1.01]), signed, 32)
        assert below[1].item() == 0  # and just under the limit the code is 0: the limit is the stated one


def test_decode_of_every_code():
    """decode of each code 0..255 / -127..127 with scale 1 and a scale of 2^-20 (float32 exact ratios)."""
    for scale in (1.0, 2.0 ** -20):
        q = torch.arange(256).to(U8)
        x = decode_int8(q, torch.tensor([scale]), 256).double()
        s = torch.tensor([torch.tensor(k / 255, dtype=F32).item() for k in range(256)], dtype=F64)
        want = (scale * (s * s).float().double()).float().double() * (s * s).float().double()
        assert torch.equal(x, want.float().double())
        q = torch.arange(-127, 128).to(I8)
        x = decode_int8(q, torch.tensor([scale]), 256)
        assert torch.equal(x[:127], -x.flip(0)[:127]) and x[127].item() == 0.0
        assert x[-1].item() == scale and decode_int8(torch.tensor([255], dtype=U8), torch.tensor([scale]), 32) == scale


def test_roundtrip_is_exact_on_the_codes():
    """encode(decode(q)) == q for every code with its block's scale (the absmax code is the top one)."""
    for signed, lo, hi, dtype in ((True, -127, 128, I8), (False, 0, 256, U8)):
        q = torch.arange(lo, hi).to(dtype)
        x = decode_int8(q, torch.tensor([0.37]), 256)
        q2, s2 = encode_int8(x, signed, 256)
        assert torch.equal(q2, q) and s2.item() == torch.tensor(0.37).item()


# ------------------------------------------------------------------------------------- errors
def _bad_call(impl, L, dev, **over):
    kw = dict(ADAM, **BC, **_mv(L, 256))
    kw.update(over)
    impl.adam_step(L["p"], L["g"], L["m"], L["v"], **kw)


BAD = {  # name -> (how the lists / kwargs are spoiled, a fragment of the error)
    "no exp_avg scales": (lambda L: dict(exp_avg_scales=None), "exp_avg_scales"),
    "no exp_avg_sq scales": (lambda L: dict(exp_avg_sq_scales=None), "exp_avg_sq_scales"),
    "short scale list": (lambda L: dict(exp_avg_scales=L["ms"][:1]), "exp_avg_scales"),
    "float64 scales": (lambda L: dict(exp_avg_sq_scales=[s.double() for s in L["vs"]]), "exp_avg_sq_scales"),
    "wrong scale shape": (lambda L: dict(exp_avg_scales=[s[:0] for s in L["ms"]]), "exp_avg_scales"),
    "block size 100": (lambda L: dict(block_size=100), "block_size"),
    "block size 16": (lambda L: dict(block_size=16), "block_size"),
    "block size 8192": (lambda L: dict(block_size=8192), "block_size"),
    "max scales without max": (lambda L: dict(max_exp_avg_sq_scales=L["vs"]), "max_exp_avg_sq"),
    "uint8 exp_avgs": (lambda L: L.update(m=[q.view(U8) for q in L["m"]]) or {}, "exp_avgs"),
    "float32 exp_avg_sqs": (lambda L: L.update(v=[q.float() for q in L["v"]]) or {}, "exp_avg_sqs"),
    "scales for float state": (lambda L: L.update(m=[q.float() for q in L["m"]], v=[q.float() for q in L["v"]])
                               or {}, "exp_avg_scales"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_int8_input_is_refused_before_writing(backend, case):
    impl = ops_of(backend)
    dev = device_for(backend)
    L = make(F32, dev, seed=2, sizes=[300, 5])
    spoil, fragment = BAD[case]
    over = spoil(L)
    before = clone(L)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=fragment):
        _bad_call(impl, L, dev, **over)
    for key, tensors in L.items():
        for a, b in zip(tensors, before[key]):
            assert torch.equal(a, b), f"{key} written before the error"


def test_float64_params_are_refused(backend):
    impl = ops_of(backend)
    dev = device_for(backend)
    L = make(F64, dev, seed=2, sizes=[300, 5])
    before = clone(L)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="float64|Double"):
        _bad_call(impl, L, dev)
    assert all(torch.equal(a, b) for a, b in zip(L["m"] + L["p"], before["m"] + before["p"]))


def test_sgd_codes_without_scales_are_refused(backend):
    impl = ops_of(backend)
    dev = device_for(backend)
    L = make(F32, dev, seed=2, sizes=[300, 5])
    with pytest.raises((ValueError, TypeError, RuntimeError), match="momentum_buffer_scales"):
        impl.sgd_momentum_step(L["p"], L["g"], L["m"], **SGD)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="block_size"):
        impl.sgd_momentum_step(L["p"], L["g"], L["m"], **SGD, momentum_buffer_scales=L["ms"], block_size=48)


@pytest.mark.parametrize("op", ["adam_step_tensor", "sgd_momentum_step_tensor"])
def test_skipped_step_writes_no_codes_or_scales(backend, op):
    """found_inf != 0 (AMP found an inf): params, codes and scales stay as they were."""
    impl = ops_of(backend)
    dev = device_for(backend)
    L = make(F32, dev, seed=4, sizes=[300, 5, 1000])
    before = clone(L)
    amp = dict(lr=torch.tensor(1e-2, device=dev), grad_scale=torch.tensor(4.0, device=dev),
               found_inf=torch.tensor(1.0, device=dev))
    if op == "adam_step_tensor":
        impl.adam_step_tensor(L["p"], L["g"], L["m"], L["v"], _steps(3, dev), correct_bias=True, **_mv(L, 256),
                              **dict(ADAM, **amp))
    else:
        impl.sgd_momentum_step_tensor(L["p"], L["g"], L["m"], **dict(SGD, **amp), momentum_buffer_scales=L["ms"])
    for key, tensors in L.items():
        for a, b in zip(tensors, before[key]):
            assert torch.equal(a, b), f"{key} written by a skipped step"


# ------------------------------------------------------------------------------------- builds
_CAPABILITIES = ["default", "avx2", "avx512"]  # ATen's spelling (it ignores others with a warning)

# Run in a process of one ATEN_CPU_CAPABILITY: every op and param dtype against the reference (codes
# and scales bit for bit), then all lists the op wrote saved for the cross-build comparison.
_BUILD_SCRIPT = """
import sys, torch
sys.path[:0] = sys.argv[2:4]
import test_int8_state_ops as T
from svi_kernels import _C
out = {"isa": _C.cpu_isa()}
for op in T.CALLS:
    for tdt in (T.F32, T.F16, T.BF16):
        ours = T.run_against_reference("cpu", op, tdt)
        out[f"{op}/{tdt}"] = {name: ours[name] for name in T.WRITES[op].split()}
torch.save(out, sys.argv[1])
"""


def test_every_cpu_build_gives_the_same_bits(tmp_path):
    """The int8 loops are built three times (baseline, AVX2, and AVX-512 with FMA contraction off:
    csrc/cpu/int8_state*.cpp); ATEN_CPU_CAPABILITY picks which one runs, never a wider one than asked.
    Each gives the reference's codes and scales, and all three write the same bits into every list
    (params included, where the reference comparison has a tolerance). A CPU without AVX-512 runs its
    widest build in that process instead (then compared with itself)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    dumps = {}
    for cap in _CAPABILITIES:
        path = str(tmp_path / f"{cap}.pt")
        out = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, path, here, os.path.dirname(here)],
                             env=dict(os.environ, ATEN_CPU_CAPABILITY=cap), cwd=root, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f"ATEN_CPU_CAPABILITY={cap}:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        dumps[cap] = torch.load(path)
        assert dumps[cap]["isa"] in _CAPABILITIES[:_CAPABILITIES.index(cap) + 1], (cap, dumps[cap]["isa"])
    assert dumps["default"]["isa"] == "default"
    base = dumps["default"]
    for cap in _CAPABILITIES[1:]:
        for key, lists in base.items():
            if key == "isa":
                continue
            for name, tensors in lists.items():
                for i, (a, b) in enumerate(zip(tensors, dumps[cap][key][name])):
                    same = torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)
                    assert same, f"{key} {name}[{i}]: the {dumps[cap]['isa']} build differs from the baseline's bits"
