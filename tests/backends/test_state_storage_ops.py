"""Optimizer state in another dtype than the params (issue 24): every backend's ops on the new
(param, state) dtype pairs, with and without ``state_seed`` (stochastic rounding of bf16 state).

- Each backend's stored state equals the reference backend's bit for bit (the random bits are one
  formula in every backend), params and sums within the usual tolerance of the reference. The
  coefficients (beta1 = beta2 = momentum = 0.5, a loss scale of 4) make every float32 state value
  exact up to one rounding, so FMA contraction or operation order cannot move it: what is compared
  is the store. Odd and zero sizes, many tensors, one tensor over two chunks (32768 elements).
- The reference against a float64 oracle: state within one bf16 step (a half step to nearest).
- The rounding: unbiased over many draws, always one of the two neighbouring bf16 values; the bits
  follow (seed, tensor index, list, flat index), not how the call is split into chunks or blocks.
- Why SR (docs): with beta2 = 0.999 a bf16 v stored to nearest never decays, SR tracks the fp32 v.
- A pair outside the spec is refused, naming the list, before anything is written.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from backend_params import device_for
from svi_kernels.backends import get, reference
from svi_kernels.backends.state_storage import fmix32, sr_bits, sr_key, stochastic_round_bf16
from tensor_factory import random_list

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
NEW_PAIRS = [(F32, BF16), (F16, F32), (BF16, F32), (BF16, BF16)]  # (BF16, BF16): today's, rounded by the seed now
SIZES = [1, 7, 0, 70001, 33, 2, 129, 0, 5, 1000, 3, 17]  # 70001: over two chunks of 32768
SEED = 123456789
TOL = {F32: (2e-5, 2e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}


def ops_of(backend):
    """The backend's ops; the compiled ones skip until they take state_seed (issue 24's C++ side)."""
    if backend in ("cpu", "cuda"):
        from svi_kernels.backends import compiled
        if "state_seed" not in inspect.signature(compiled.adam_step).parameters:
            pytest.skip("compiled kernels predate state_seed")
    return get(backend)


def make(pair, device, seed=0, sizes=SIZES):
    """params, grads (param dtype); exp_avgs, exp_avg_sqs, max_exp_avg_sqs (state dtype); w0, dirs."""
    tdt, sdt = pair
    gen = torch.Generator().manual_seed(seed)
    lists = dict(p=random_list(sizes, tdt, device, "n", gen), g=random_list(sizes, tdt, device, "n", gen),
                 m=random_list(sizes, sdt, device, "small", gen), v=random_list(sizes, sdt, device, "pos", gen),
                 vmax=random_list(sizes, sdt, device, "pos", gen))
    lists["w0"] = [torch.zeros_like(p) for p in lists["p"]]
    lists["d"] = [torch.zeros_like(p) for p in lists["p"]]
    return lists


def clone(lists):
    return {k: [t.clone() for t in ts] for k, ts in lists.items()}


# Exact-coefficient arguments (see the module doc).
ADAM = dict(lr=1e-2, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.01, decoupled=True)
BC = dict(bias_correction1=0.75, bias_correction2_sqrt=math.sqrt(0.75))
# weight_decay 0.5: g + wd * p is exact then, as with 0.01 it is not: the AVX2/AVX-512 CPU builds contract
# it into one FMA (one rounding, the reference two) and the float32 momentum buffer would differ in the last bit.
SGD = dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.5)


def _steps(n, device):
    return [torch.tensor(3.0 + i, device=device) for i in range(n)]


def _amp(device):
    return dict(lr=torch.tensor(1e-2, device=device), grad_scale=torch.tensor(4.0, device=device),
                found_inf=torch.tensor(0.0, device=device))


# op -> (call(ops, lists, seed, device) returning the sums or None, the lists it writes)
def _adam_step(o, L, seed, dev):
    o.adam_step(L["p"], L["g"], L["m"], L["v"], **ADAM, **BC, state_seed=seed)


def _adam_amsgrad(o, L, seed, dev):
    o.adam_step(L["p"], L["g"], L["m"], L["v"], **ADAM, **BC, max_exp_avg_sqs=L["vmax"], state_seed=seed)


def _adam_tensor(o, L, seed, dev):
    kw = dict(ADAM, **_amp(dev))
    o.adam_step_tensor(L["p"], L["g"], L["m"], L["v"], _steps(len(L["p"]), dev), correct_bias=True,
                       max_exp_avg_sqs=L["vmax"], state_seed=seed, **kw)


def _sgd(o, L, seed, dev):
    o.sgd_momentum_step(L["p"], L["g"], L["m"], **SGD, state_seed=seed)


def _sgd_tensor(o, L, seed, dev):
    o.sgd_momentum_step_tensor(L["p"], L["g"], L["m"], **dict(SGD, **_amp(dev)), state_seed=seed)


def _save(o, L, seed, dev):
    return o.ls_save_adam(L["p"], L["g"], L["m"], L["v"], L["w0"], L["d"], beta1=0.5, beta2=0.5, eps=1e-8,
                          bias_correction2_sqrt=BC["bias_correction2_sqrt"], state_seed=seed)


def _save_in_place(o, L, seed, dev):
    return o.ls_save_adam(L["p"], L["g"], L["m"], L["v"], [], [], beta1=0.5, beta2=0.5, eps=1e-8,
                          bias_correction2_sqrt=BC["bias_correction2_sqrt"], state_seed=seed)


def _etas(L):
    return [0.01 * (i + 1) for i in range(len(L["p"]))]


def _trial(o, L, seed, dev):
    o.ls_trial_adam(L["p"], L["g"], L["g"], L["v"], _etas(L), eps=1e-8,
                    bias_correction2_sqrt=BC["bias_correction2_sqrt"])


def _final(o, L, seed, dev):
    o.ls_final_adam(L["p"], L["g"], L["m"], L["v"], _etas(L), eps=1e-8, **BC)


def _final_from_trial(o, L, seed, dev):
    o.ls_final_adam_from_trial(L["p"], L["g"], L["m"], L["v"], _etas(L), trial_eta=0.3, eps=1e-8, **BC)


WRITERS = {"adam_step": (_adam_step, "pmv"), "adam_step_amsgrad": (_adam_amsgrad, "pmv+"),
           "adam_step_tensor": (_adam_tensor, "pgmv+"), "sgd_momentum_step": (_sgd, "pm"),
           "sgd_momentum_step_tensor": (_sgd_tensor, "pgm"), "ls_save_adam": (_save, "mvwd"),
           "ls_save_adam_in_place": (_save_in_place, "mv")}
READERS = {"ls_trial_adam": (_trial, "p"), "ls_final_adam": (_final, "p"),
           "ls_final_adam_from_trial": (_final_from_trial, "p")}
_LIST = {"p": "p", "g": "g", "m": "m", "v": "v", "+": "vmax", "w": "w0", "d": "d"}
CASES = ([(op, seed) for op in WRITERS for seed in (None, SEED)] + [(op, None) for op in READERS])


def _assert_lists(got, want, name, exact, dtype):
    for i, (a, b) in enumerate(zip(got, want)):
        a = a.detach().cpu()
        if exact:
            bad = (a.view(torch.int16 if a.element_size() == 2 else torch.int32) !=
                   b.view(torch.int16 if b.element_size() == 2 else torch.int32))
            assert not bad.any(), (f"{name}[{i}] (numel {a.numel()}): {int(bad.sum())} elements differ from the "
                                   f"reference's bits, first at {int(bad.nonzero()[0])}")
        else:
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name}[{i}]: {m}")


@pytest.mark.parametrize("pair", NEW_PAIRS, ids=lambda p: f"{str(p[0])[6:]}+{str(p[1])[6:]}")
@pytest.mark.parametrize("op,seed", CASES, ids=[f"{op}-{'sr' if s else 'nearest'}" for op, s in CASES])
def test_backend_equals_reference(backend, op, seed, pair):
    if backend == "reference":
        pytest.skip("the reference is the oracle of this test")
    impl = ops_of(backend)
    dev = device_for(backend)
    call, written = {**WRITERS, **READERS}[op]
    ours = make(pair, dev, seed=7)
    want = clone({k: [t.cpu() for t in ts] for k, ts in ours.items()})
    sums = call(impl, ours, seed, dev)
    want_sums = call(reference, want, seed, "cpu")
    for key in written:
        name = _LIST[key]
        # state lists (m, v, vmax) and the w0 copy bit for bit; params, grads and directions to tolerance
        _assert_lists(ours[name], want[name], name, exact=key in "mv+w", dtype=pair[0])
    if sums is not None:
        torch.testing.assert_close(sums.cpu(), want_sums, rtol=1e-4, atol=1e-6)


def _oracle_case(op, pair, seed):
    lists = make(pair, "cpu", seed=3)
    exact = {k: [t.double() for t in ts] for k, ts in clone(lists).items()}
    call, written = {**WRITERS, **READERS}[op]
    call(reference, lists, seed, "cpu")
    call(reference, exact, None, "cpu")
    return lists, exact, written


@pytest.mark.parametrize("pair", NEW_PAIRS, ids=lambda p: f"{str(p[0])[6:]}+{str(p[1])[6:]}")
@pytest.mark.parametrize("op,seed", CASES, ids=[f"{op}-{'sr' if s else 'nearest'}" for op, s in CASES])
def test_reference_against_float64(op, seed, pair):
    tdt, sdt = pair
    lists, exact, written = _oracle_case(op, pair, seed)
    for key in written:
        name = _LIST[key]
        if key in "mv+" and sdt == BF16:  # one bf16 step (2^-7 relative) with SR, half of it to nearest
            rtol, atol = (2.0 ** -7 if seed is not None else 2.0 ** -8) * 1.01, 1e-6
        elif key in "mv+":
            rtol, atol = 2e-6, 1e-7
        else:
            rtol, atol = TOL[tdt]
        for i, (a, b) in enumerate(zip(lists[name], exact[name])):
            torch.testing.assert_close(a.double(), b.to(a.dtype).double() if key not in "mv+" else b,
                                       rtol=rtol, atol=atol, msg=lambda m: f"{name}[{i}]: {m}")


def _r_bits_by_the_spec(seed, t, l, i):
    """The spec's bits in plain Python uint32 arithmetic (docs: issue 24), independent of the package's helpers."""
    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)
    key = fmix((seed + t * 0x9E3779B9) & 0xFFFFFFFF)
    return fmix((key + l * 0x7F4A7C15 + i * 0x9E3779B1) & 0xFFFFFFFF) >> 16


def test_sr_bits_are_the_spec_bits():
    assert fmix32(1) == 0x514E28B7  # MurmurHash3's published fmix32(1)
    for seed, t, l, i in [(0, 0, 0, 0), (SEED, 3, 1, 70000), (2 ** 31 - 1, 11, 2, 123457), (5, 0, 0, 2 ** 20)]:
        assert sr_bits(sr_key(seed, t), l, torch.tensor([i])).item() == _r_bits_by_the_spec(seed, t, l, i)
    x = torch.tensor([1.0 + 2 ** -9, -3.0e-5, float("nan"), float("inf")])
    r = torch.tensor([_r_bits_by_the_spec(SEED, 2, 1, i) for i in range(4)])
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    want = (((u + r) & 0xFFFFFFFF) >> 16)[:2]
    got = stochastic_round_bf16(x, SEED, 2, 1)
    assert got.view(torch.int16)[:2].to(torch.int64).bitwise_and(0xFFFF).tolist() == want.tolist()
    assert torch.isnan(got[2]) and got[3] == float("inf")


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(backend):
    """momentum 0, lr 0: the stored buffer is the SR of the float32 gradient. Each tensor holds one
    value 4096 times; the flat index gives each copy its own bits (many draws in one call)."""
    impl = ops_of(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(5)
    values = torch.cat([torch.randn(6, generator=gen), -torch.rand(2, generator=gen) * 1e-3])
    n = 4096
    stored = []
    for seed in (1, 2):
        grads = [torch.full((n,), float(x), device=dev) for x in values]
        bufs = [torch.zeros(n, dtype=BF16, device=dev) for _ in values]
        params = [torch.zeros(n, device=dev) for _ in values]
        impl.sgd_momentum_step(params, grads, bufs, lr=0.0, momentum=0.0, nesterov=False, weight_decay=0.0,
                               state_seed=seed)
        stored.append(torch.stack([b.cpu() for b in bufs]))
    stored = torch.cat(stored, dim=1)  # [values, 2n]
    u = values.view(torch.int32).to(torch.int64)[:, None]
    below = (u >> 16).to(torch.int16)  # the neighbour towards zero; +1 is the one away from zero
    bits = stored.view(torch.int16)
    assert ((bits == below) | (bits == below + 1)).all(), "SR stored a value that is not a neighbour"
    lo = below.view(BF16).double()
    step = (below + 1).view(BF16).double() - lo  # signed
    frac = (values.double()[:, None] - lo) / step
    mean = stored.double().mean(dim=1, keepdim=True)
    stderr = step.abs() * torch.sqrt(frac * (1 - frac) / stored.shape[1])
    assert ((mean - values.double()[:, None]).abs() <= 5 * stderr + 1e-12).all(), (mean, values)
    # the bits of each draw differ between seeds (a fixed seed would be a fixed rounding)
    assert not torch.equal(stored[:, :n], stored[:, n:])


def _sr_adam(impl, params, dev, seed):
    m = [torch.zeros(p.numel(), dtype=BF16, device=dev) for p in params]
    v = [torch.zeros(p.numel(), dtype=BF16, device=dev) for p in params]
    impl.adam_step([p.clone() for p in params], [p.clone() for p in params], m, v, lr=0.0, beta1=0.9, beta2=0.999,
                   eps=1e-8, weight_decay=0.0, decoupled=True, state_seed=seed, **BC)
    return [t.cpu() for t in m + v]


def test_sr_bits_follow_the_flat_index_not_the_split(backend):
    """A tensor's rounding depends on (seed, its index in the call, list, element index): the same in
    a call whose other tensors change the chunks and block size, different at another index or seed."""
    impl = ops_of(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(5000, generator=gen).to(dev)
    small, big = torch.randn(3, generator=gen).to(dev), torch.randn(70001, generator=gen).to(dev)
    with_small = _sr_adam(impl, [a, small], dev, SEED)
    with_big = _sr_adam(impl, [a, big], dev, SEED)
    for i in (0, 2):  # a's exp_avg and exp_avg_sq
        assert torch.equal(with_small[i].view(torch.int16), with_big[i].view(torch.int16))
    moved = _sr_adam(impl, [small, a], dev, SEED)  # a is tensor 1 now: other bits
    assert not torch.equal(moved[1].view(torch.int16), with_small[0].view(torch.int16))
    other_seed = _sr_adam(impl, [a, small], dev, SEED + 1)
    assert not torch.equal(other_seed[0].view(torch.int16), with_small[0].view(torch.int16))
    # and the reference's function is the one that gave these bits
    m_a = stochastic_round_bf16((0.1 * a).cpu(), SEED, 0, 0)
    assert torch.equal(m_a.view(torch.int16), with_small[0].view(torch.int16))


def test_sr_bits_follow_the_memory_order_of_a_channels_last_tensor(backend):
    """A dense tensor in another layout (channels_last) is walked in memory order by the kernels: the
    reference draws each element's bits by its memory offset too, so both store the same bits (and a
    contiguous tensor's memory offset is its flat index)."""
    impl = ops_of(backend)
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(5)

    def lists():
        shape = (3, 5, 7, 9)
        p, g = (torch.randn(shape, generator=gen).to(dev).to(memory_format=torch.channels_last) for _ in range(2))
        m = torch.zeros(shape, dtype=BF16, device=dev).to(memory_format=torch.channels_last)
        v = torch.zeros(shape, dtype=BF16, device=dev).to(memory_format=torch.channels_last)
        return [p], [g], [m], [v]

    want = lists()
    gen.manual_seed(5)
    got = lists()
    try:
        impl.adam_step(*got, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                       state_seed=SEED, **BC)
    except (RuntimeError, ValueError) as exc:  # a backend that takes only contiguous tensors says so
        assert "contiguous" in str(exc)
        pytest.skip(f"{backend} takes contiguous tensors only")
    reference.adam_step(*want, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                        state_seed=SEED, **BC)
    for k in (2, 3):
        assert torch.equal(got[k][0].cpu().view(torch.int16), want[k][0].cpu().view(torch.int16))
    logical = stochastic_round_bf16((0.1 * want[1][0]).cpu(), SEED, 0, 0)  # bits by the logical index
    assert not torch.equal(logical.view(torch.int16), want[2][0].cpu().view(torch.int16))


def test_bf16_v_to_nearest_sticks_sr_tracks_fp32(backend):
    """The measured reason for SR: v <- 0.999 v + 0.001 g^2 from v = 1 with g^2 = 0.5 moves v by 0.05 %
    a step, under half a bf16 step (0.2 %): to nearest v stays 1.0; with SR its mean follows fp32's v."""
    impl = ops_of(backend)
    dev = device_for(backend)
    n, steps = 4096, 200
    g = [torch.full((n,), math.sqrt(0.5), device=dev)]
    state = {dt_seed: ([torch.zeros(n, dtype=dt_seed[0], device=dev)], [torch.ones(n, dtype=dt_seed[0], device=dev)])
             for dt_seed in ((F32, False), (BF16, False), (BF16, True))}
    for k in range(steps):
        for (dt, sr), (m, v) in state.items():
            impl.adam_step([torch.zeros(n, device=dev)], g, m, v, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
                           weight_decay=0.0, decoupled=True, state_seed=k if sr else None, **BC)
    v32 = state[(F32, False)][1][0].cpu().double().mean().item()
    nearest = state[(BF16, False)][1][0].cpu().double()
    sr_mean = state[(BF16, True)][1][0].cpu().double().mean().item()
    assert abs(v32 - (0.5 + 0.5 * 0.999 ** steps)) < 1e-4
    assert (nearest == 1.0).all(), "round-to-nearest bf16 v moved (it should be stuck at 1.0)"
    assert abs(sr_mean - v32) < 2e-3 * v32, (sr_mean, v32)
    assert abs(1.0 - v32) > 0.05


BAD = [  # (param dtype, {list: state dtype}, the list the error names)
    (F32, {"m": F16, "v": F16}, "exp_avgs"),
    (F64, {"m": BF16, "v": BF16}, "exp_avgs"),
    (F16, {"m": BF16, "v": BF16}, "exp_avgs"),
    (F32, {"m": BF16, "v": F32}, "exp_avg_sqs"),
]


def _bad_lists(tdt, state, dev):
    gen = torch.Generator().manual_seed(2)
    sizes = [5, 3]
    L = dict(p=random_list(sizes, tdt, dev, "n", gen), g=random_list(sizes, tdt, dev, "n", gen))
    for key in "mv":
        L[key] = random_list(sizes, state.get(key, tdt), dev, "pos", gen)
    return L


@pytest.mark.parametrize("op", ["adam_step", "adam_step_tensor", "ls_save_adam", "ls_final_adam"])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_pair_outside_the_spec_is_refused_before_writing(backend, op, case):
    impl = ops_of(backend)
    dev = device_for(backend)
    tdt, state, name = BAD[case]
    L = _bad_lists(tdt, state, dev)
    before = clone(L)
    call = {"adam_step": _adam_step, "adam_step_tensor": _adam_tensor, "ls_save_adam": _save_in_place,
            "ls_final_adam": _final}[op]
    if op == "adam_step_tensor":
        L["vmax"] = []
        call = lambda o, L, s, d: o.adam_step_tensor(  # noqa: E731
            L["p"], L["g"], L["m"], L["v"], _steps(2, d), correct_bias=True, state_seed=s, **dict(ADAM, **_amp(d)))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
        call(impl, L, 1, dev)
    for key in "pgmv":
        for a, b in zip(L[key], before[key]):
            assert torch.equal(a, b), f"{key} written before the error"


@pytest.mark.parametrize("buffer_dtype", [F16, F64])
def test_sgd_momentum_buffer_pair_is_refused(backend, buffer_dtype):
    impl = ops_of(backend)
    dev = device_for(backend)
    p, g = [torch.ones(3, device=dev)], [torch.ones(3, device=dev)]
    with pytest.raises((ValueError, TypeError, RuntimeError), match="momentum_buffers"):
        impl.sgd_momentum_step(p, g, [torch.zeros(3, dtype=buffer_dtype, device=dev)], **SGD, state_seed=1)
    assert torch.equal(p[0], torch.ones(3, device=dev))
