"""The Triton backend against the plain-PyTorch reference: the 7 fused ops, many tensors, launch
counts, the pointer-table cache and the SVI activation backward.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors
through the interpreter; with one, the same tests run the compiled kernels on CUDA tensors.
"""
import math

import pytest
import torch

from svi_kernels.backends import reference
from svi_kernels.backends import triton as backend

ok, why = backend.available()
if not ok:
    pytest.skip(f"Triton backend unavailable: {why}", allow_module_level=True)

import svi_kernels.triton as sk_triton  # noqa: E402
from svi_kernels.triton import runtime, table  # noqa: E402
from svi_kernels.triton.svi_backward import ACTIVATIONS, act_backward, act_backward_torch  # noqa: E402

DEVICE = torch.device("cpu" if runtime.interpreting() else "cuda")
LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SIZES = (0, 1, 7, 4099)
LARGE = 278011  # odd, so the last block is a masked tail (the apex test size)

BETA1, BETA2, STEP = 0.9, 0.999, 3
BC1, BC2_SQRT = 1 - BETA1 ** STEP, math.sqrt(1 - BETA2 ** STEP)

# op -> (tensor lists in call order, lists that hold squares (kept >= 0), lists the op writes,
#        takes per-tensor etas, keyword arguments)
OPS = {
    "adam_step": (("params", "grads", "exp_avgs", "exp_avg_sqs"), {3}, (0, 2, 3), False,
                  dict(lr=1e-2, beta1=BETA1, beta2=BETA2, eps=1e-8, weight_decay=0.05, decoupled=True,
                       bias_correction1=BC1, bias_correction2_sqrt=BC2_SQRT)),
    "sgd_momentum_step": (("params", "grads", "momentum_buffers"), set(), (0, 2), False,
                          dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "ls_save_sgd": (("params", "grads", "w0"), set(), (2,), False, {}),
    "ls_save_adam": (("params", "grads", "exp_avgs", "exp_avg_sqs", "w0", "dirs"), {3}, (2, 3, 4, 5), False,
                     dict(beta1=BETA1, beta2=BETA2, eps=1e-8, bias_correction2_sqrt=BC2_SQRT)),
    "ls_trial_sgd": (("params", "w0", "grads"), set(), (0,), True, {}),
    "ls_trial_adam": (("params", "w0", "grads", "exp_avg_sqs"), {3}, (0,), True,
                      dict(eps=1e-8, bias_correction2_sqrt=BC2_SQRT)),
    "ls_final_adam": (("params", "w0", "exp_avgs", "exp_avg_sqs"), {3}, (0,), True,
                      dict(eps=1e-8, bias_correction1=BC1, bias_correction2_sqrt=BC2_SQRT)),
}

# |triton - fp64 reference| <= atol + rtol * |reference|: one rounding to the storage dtype plus
# a few fp32 (fp64) roundings of the compute.
TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2),
       torch.float64: (1e-14, 1e-13)}


def make_lists(op, sizes, dtype, seed=0, device=DEVICE):
    names, squares, _, _, _ = OPS[op]
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for i, _ in enumerate(names):
        tensors = []
        for n in sizes:
            t = torch.randn(n, generator=gen, dtype=torch.float64)
            if i in squares:
                t = t * t * 1e-2 + 1e-3  # second moments; kept away from 0 so fp16 results stay finite
            tensors.append(t.to(device=device, dtype=dtype))
        lists.append(tensors)
    return lists


def etas_for(n):
    return [0.25 * (1 + i % 3) for i in range(n)]


def call(module, op, lists, etas=None):
    _, _, _, takes_etas, kwargs = OPS[op]
    fn = getattr(module, op)
    if takes_etas:
        return fn(*lists, etas if etas is not None else etas_for(len(lists[0])), **kwargs)
    return fn(*lists, **kwargs)


def clone(lists, dtype=None):
    return [[t.detach().clone().to(dtype or t.dtype) for t in lst] for lst in lists]


def _exact_sqrt(x):
    return x.double().sqrt().to(x.dtype)  # correctly rounded for fp32 (torch's CPU sqrt is not)


def header_oracle(op, lists, etas, kwargs):
    """update_math.h transcribed with torch fp32 element ops (each rounds once, no FMA) and a
    correctly rounded sqrt, written back with round-to-nearest-even: what the kernels must
    reproduce bit for bit for fp32/fp16/bf16 inputs. Computed on the CPU: torch's CUDA division by
    a Python number multiplies by its reciprocal, which is not one correctly rounded division."""
    k = dict(kwargs)
    f = [[t.float().cpu() for t in lst] for lst in lists]
    out = [[None] * len(lst) for lst in lists]
    sums = []
    for i in range(len(lists[0])):
        if op == "adam_step":
            p, g, m, v = (x[i] for x in f)
            decay, step_size = 1.0 - k["lr"] * k["weight_decay"], k["lr"] / k["bias_correction1"]
            p = p * decay
            m = m + (1.0 - k["beta1"]) * (g - m)
            v = k["beta2"] * v + (1.0 - k["beta2"]) * (g * g)
            denom = _exact_sqrt(v) / k["bias_correction2_sqrt"] + k["eps"]
            out[0][i], out[2][i], out[3][i] = p - step_size * (m / denom), m, v
        elif op == "sgd_momentum_step":
            p, g, b = (x[i] for x in f)
            g = g + k["weight_decay"] * p
            b = k["momentum"] * b + g
            out[0][i], out[2][i] = p - k["lr"] * (g + k["momentum"] * b), b
        elif op == "ls_save_sgd":
            out[2][i] = f[0][i]
            sums.append((f[1][i] * f[1][i]).double().sum())
        elif op == "ls_save_adam":
            p, g, m, v, _, _ = (x[i] for x in f)
            m = m + (1.0 - k["beta1"]) * (g - m)
            v = k["beta2"] * v + (1.0 - k["beta2"]) * (g * g)
            denom = _exact_sqrt(v) / k["bias_correction2_sqrt"] + k["eps"]
            out[2][i], out[3][i], out[4][i], out[5][i] = m, v, p, g / denom
            sums.append(((g * g) / denom).double().sum())
        elif op == "ls_trial_sgd":
            _, w0, g = (x[i] for x in f)
            out[0][i] = w0 - float(etas[i]) * g
        else:  # ls_trial_adam (d = g) and ls_final_adam (d = m, eta / bc1)
            _, w0, d, v = (x[i] for x in f)
            eta = float(etas[i]) / (k["bias_correction1"] if op == "ls_final_adam" else 1.0)
            denom = _exact_sqrt(v) / k["bias_correction2_sqrt"] + k["eps"]
            out[0][i] = w0 - eta * (d / denom)
    return out, (torch.stack(sums).float() if sums else None)


def check_parity(op, sizes, dtype, seed=0, etas=None):
    """Triton vs the reference on fp64 copies and on same-dtype copies (tolerances), and vs the
    header transcription bit for bit."""
    _, _, written, takes_etas, kwargs = OPS[op]
    lists = make_lists(op, sizes, dtype, seed)
    ref64, ref_same = clone(lists, torch.float64), clone(lists)
    if takes_etas and etas is None:
        etas = etas_for(len(sizes))
    exact, exact_sums = header_oracle(op, lists, etas, kwargs) if dtype != torch.float64 else (None, None)
    out = call(backend, op, lists, etas)
    out64 = call(reference, op, ref64, etas)
    out_same = call(reference, op, ref_same, etas)
    atol, rtol = TOL[dtype]
    for li in written:
        for got, exp64, exp_same in zip(lists[li], ref64[li], ref_same[li]):
            assert got.dtype == dtype and got.device.type == DEVICE.type
            torch.testing.assert_close(got.double(), exp64, atol=atol, rtol=rtol)
            if got.numel():
                scale = 4 * torch.finfo(dtype).eps * max(1.0, exp_same.abs().max().item())
                torch.testing.assert_close(got, exp_same, atol=scale, rtol=0)
        if exact is not None:
            for i, (got, want) in enumerate(zip(lists[li], exact[li])):
                assert torch.equal(got.cpu(), want.to(dtype)), (op, dtype, li, i, (got.double().cpu() - want.double()).abs().max())
    if out64 is not None:
        assert out.dtype == torch.float32 and out.shape == (len(sizes),) and out.device.type == DEVICE.type
        torch.testing.assert_close(out.double().cpu(), out64.double().cpu(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.cpu(), out_same.cpu(), rtol=1e-5, atol=1e-6)
        if exact_sums is not None:
            torch.testing.assert_close(out.cpu(), exact_sums.cpu(), rtol=1e-5, atol=1e-6)
    else:
        assert out is None


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(OPS))
def test_parity_small_sizes(op, dtype):
    check_parity(op, SIZES, dtype)


@pytest.mark.parametrize("op", sorted(OPS))
def test_parity_large_tensor_fp32(op):
    check_parity(op, (LARGE, 5), torch.float32, seed=1)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_parity_large_tensor_low_precision_adam(dtype):
    check_parity("adam_step", (LARGE,), dtype, seed=2)


@pytest.mark.parametrize("op", sorted(OPS))
def test_parity_small_blocks(op, monkeypatch):
    """Tiny blocks and chunks: every tensor spans several programs and several block steps, with
    full blocks, masked tails and tensors of exactly one block/chunk."""
    monkeypatch.setattr(runtime, "block_shape", lambda largest=0: (32, 128))
    check_parity(op, (0, 1, 31, 32, 33, 128, 129, 300, 0), torch.float32, seed=3)
    check_parity(op, (5, 160), torch.bfloat16, seed=4)


@pytest.mark.parametrize("decoupled,weight_decay,maximize",
                         [(True, 0.0, False), (False, 0.1, False), (True, 0.1, True), (False, 0.1, True)])
def test_adam_modes(decoupled, weight_decay, maximize):
    kwargs = dict(OPS["adam_step"][4], decoupled=decoupled, weight_decay=weight_decay, maximize=maximize)
    lists = make_lists("adam_step", (7, 1000), torch.float32)
    ref = clone(lists, torch.float64)
    backend.adam_step(*lists, **kwargs)
    reference.adam_step(*ref, **kwargs)
    for got, exp in zip(lists[0] + lists[2] + lists[3], ref[0] + ref[2] + ref[3]):
        torch.testing.assert_close(got.double(), exp, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("nesterov,weight_decay,maximize",
                         [(False, 0.0, False), (True, 0.0, True), (False, 0.1, True)])
def test_sgd_modes(nesterov, weight_decay, maximize):
    kwargs = dict(lr=0.05, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)
    lists = make_lists("sgd_momentum_step", (7, 1000), torch.float32)
    ref = clone(lists, torch.float64)
    backend.sgd_momentum_step(*lists, **kwargs)
    reference.sgd_momentum_step(*ref, **kwargs)
    for got, exp in zip(lists[0] + lists[2], ref[0] + ref[2]):
        torch.testing.assert_close(got.double(), exp, atol=2e-6, rtol=1e-5)


def test_adamw_matches_torch_optim_over_steps():
    """Five steps of the fused kernel with host-side bias corrections == torch.optim.AdamW."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).to(DEVICE) for n in (3, 100, 0, 517)]
    ours = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in params]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        backend.adam_step(ours, grads, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                          decoupled=True, bias_correction1=1 - 0.9 ** step,
                          bias_correction2_sqrt=math.sqrt(1 - 0.99 ** step))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ many tensors, launches
def test_many_small_tensors_one_launch():
    sizes = [(i * 37) % 23 for i in range(310)]  # 310 tensors, several of them empty
    for op in ("adam_step", "ls_trial_sgd"):
        sk_triton.reset_launch_count()
        check_parity(op, sizes, torch.float32, seed=6)
        assert sk_triton.total_launches() == 1, dict(sk_triton.launch_count)


@pytest.mark.parametrize("op", sorted(OPS))
def test_one_launch_per_call_whatever_the_tensor_count(op):
    kernel = f"{op}_kernel"
    for n_tensors in (1, 64):
        lists = make_lists(op, [3 + i % 5 for i in range(n_tensors)], torch.float32)
        sk_triton.reset_launch_count()
        call(backend, op, lists)
        call(backend, op, lists)
        assert dict(sk_triton.launch_count) == {kernel: 2}, (n_tensors, dict(sk_triton.launch_count))


def test_launch_grid_covers_every_chunk_of_many_tensors():
    """Recorded (not run) launches: 300 tensors are one launch whose grid is their chunk count."""
    block, chunk = runtime.block_shape(100)
    sizes = [1 + (i % 100) for i in range(300)]
    for op in OPS:
        lists = make_lists(op, sizes, torch.bfloat16)
        with runtime.capture() as launches:
            call(backend, op, lists)
        assert len(launches) == 1
        kernel, args, _ = launches[0]
        chunks = args[1]
        assert kernel.__name__ == f"{op}_kernel"
        assert chunks.shape == (sum(-(-n // chunk) for n in sizes), 3)


def test_empty_lists_and_zero_size_tensors_launch_nothing():
    for op in OPS:
        for sizes in ((), (0, 0)):
            lists = make_lists(op, sizes, torch.float32)
            sk_triton.reset_launch_count()
            out = call(backend, op, lists)
            assert sk_triton.total_launches() == 0
            if op.startswith("ls_save"):
                assert out.dtype == torch.float32 and out.shape == (len(sizes),)
                assert not out.any()


# ------------------------------------------------------------------------------------ tables
def test_table_cache_reused_across_calls_and_rebuilt_on_change():
    table.clear_cache()
    lists = make_lists("sgd_momentum_step", (10, 2000, 3), torch.float32)
    kwargs = OPS["sgd_momentum_step"][4]
    for _ in range(3):
        backend.sgd_momentum_step(*lists, **kwargs)
    # Same tensors: the whole group (checks and both tables) is reused.
    assert table.stats["group_builds"] == 1 and table.stats["group_hits"] == 2
    assert table.stats["pointer_builds"] == 1 and table.stats["chunk_builds"] == 1
    # New gradient tensors of the same sizes: new pointers, same chunk layout.
    lists[1] = [g.clone() for g in lists[1]]
    backend.sgd_momentum_step(*lists, **kwargs)
    assert table.stats["group_builds"] == 2
    assert table.stats["pointer_builds"] == 2 and table.stats["chunk_builds"] == 1
    # Other sizes: both rebuilt.
    backend.sgd_momentum_step(*make_lists("sgd_momentum_step", (11,), torch.float32), **kwargs)
    assert table.stats["pointer_builds"] == 3 and table.stats["chunk_builds"] == 2
    ptrs, aligned = table.pointer_table(lists, DEVICE)
    assert ptrs.dtype == torch.int64 and ptrs.shape == (3, 3) and ptrs.device.type == DEVICE.type
    assert ptrs[1, 1].item() == lists[1][1].data_ptr() and aligned


def _python_lines_of_repeated_group(n_tensors: int) -> int:
    """Python lines executed by a Group built a second time over the same tensors."""
    import sys
    lists = make_lists("ls_trial_sgd", (5, 70, 3) * (n_tensors // 3), torch.float32)
    first = table.Group(lists, written=(0,))
    first.tables(first.block_shape()[1])  # the first call builds the tables
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        group = table.Group(lists, written=(0,))
        group.tables(group.block_shape()[1])
    finally:
        sys.settrace(None)
    assert group.numels == tuple(t.numel() for t in lists[0])
    return lines


def test_group_cache_hit_does_no_per_tensor_python():
    """A repeated call reads its tensors only through C-level map() calls: the Python lines it
    runs do not grow with the number of tensors."""
    table.clear_cache()
    few, many = _python_lines_of_repeated_group(6), _python_lines_of_repeated_group(600)
    assert table.stats["group_hits"] == 2
    assert many <= few + 5, (few, many)  # 100x the tensors; a per-tensor loop adds >= 600 lines


@pytest.mark.parametrize("fresh", ["new_grads_alive", "set_to_none"])
def test_group_cache_never_uses_stale_pointers(fresh):
    """Each step brings new gradient tensors (as zero_grad(set_to_none=True) does): the update
    must read the new ones. A cache keyed on anything but the addresses (e.g. the params, or the
    list lengths) would read the previous step's gradients, kept alive here with other values."""
    table.clear_cache()
    p, w0, g = make_lists("ls_trial_sgd", (33, 4100, 1), torch.float32)
    etas = [0.5, 0.25, 2.0]
    old_grads = []
    for step in range(3):
        if fresh == "new_grads_alive":
            old_grads.append(g)  # keep the previous gradients' memory (and values) alive
        g = [torch.full_like(t, float(step + 1)) for t in g]
        backend.ls_trial_sgd(p, w0, g, etas)
        for pi, wi, gi, eta in zip(p, w0, g, etas):
            assert torch.equal(pi, wi - eta * gi), f"step {step} used stale gradients"
    if fresh == "new_grads_alive":
        assert table.stats["group_builds"] == 3  # three sets of addresses


def test_chunk_table_rows():
    chunks = table.chunk_table((5, 0, 9), 4, torch.device("cpu"))
    assert chunks.tolist() == [[0, 0, 4], [0, 4, 5], [2, 0, 4], [2, 4, 8], [2, 8, 9]]


def test_etas_as_device_tensor_and_per_tensor_values():
    lists = make_lists("ls_trial_adam", (50, 3, 20), torch.float32)
    other = clone(lists)
    etas = [0.5, 2.0, 0.0]
    backend.ls_trial_adam(*lists, etas, **OPS["ls_trial_adam"][4])
    backend.ls_trial_adam(*other, torch.tensor(etas, device=DEVICE), **OPS["ls_trial_adam"][4])
    for a, b in zip(lists[0], other[0]):
        assert torch.equal(a, b)
    # eta = 0 leaves p = w0 exactly
    assert torch.equal(lists[0][2], lists[1][2])
    with pytest.raises(ValueError, match="per-tensor"):
        backend.ls_trial_sgd(*make_lists("ls_trial_sgd", (4, 4), torch.float32), [0.1])


def test_non_contiguous_tensors_are_updated_in_place():
    gen = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    base = rand(40, 30)
    # tensor 0: transposed views in every list (same dense layout: run in place, no staging);
    # tensor 1: a strided param (not dense) next to contiguous grads (staged and written back);
    # tensor 2: a transposed param with contiguous grads (layouts differ: staged).
    p = [base.t(), rand(60, 40)[::2], rand(40, 30).t()]
    g = [rand(40, 30).t(), rand(30, 40), rand(30, 40)]
    buf = [rand(40, 30).t(), rand(30, 40), rand(30, 40)]
    ref = [[t.double() for t in lst] for lst in (p, g, buf)]
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0)
    backend.sgd_momentum_step(p, g, buf, **kwargs)
    reference.sgd_momentum_step(*ref, **kwargs)
    for got, exp in zip(p + buf, ref[0] + ref[2]):
        torch.testing.assert_close(got.double(), exp, atol=1e-6, rtol=1e-6)
    assert p[0].data_ptr() == base.data_ptr()


def test_misaligned_views_take_the_unhinted_path():
    """Views at odd offsets (e.g. params carved out of one flat buffer) are not 16-byte aligned:
    the kernels then drop the alignment hints (no 128-bit accesses) and stay correct."""
    flat = make_lists("adam_step", (1 + 4099 + 300,), torch.float32)
    lists = [[lst[0][1:4100], lst[0][4100:]] for lst in flat]
    assert not table.pointer_table(lists, DEVICE)[1]
    with runtime.capture() as launches:
        call(backend, "adam_step", lists)
    assert launches[0][2]["ALIGNED"] is False
    ref = clone(lists, torch.float64)
    call(backend, "adam_step", lists)
    call(reference, "adam_step", ref)
    for li in (0, 2, 3):
        for got, exp in zip(lists[li], ref[li]):
            torch.testing.assert_close(got.double(), exp, atol=2e-6, rtol=1e-5)


def test_rejects_mixed_dtypes_and_mismatched_sizes():
    p = [torch.zeros(4, device=DEVICE)]
    with pytest.raises(TypeError, match="one dtype"):
        backend.ls_save_sgd(p, [torch.zeros(4, device=DEVICE, dtype=torch.float16)], [torch.zeros(4, device=DEVICE)])
    with pytest.raises(ValueError, match="numel"):
        backend.ls_save_sgd(p, [torch.zeros(5, device=DEVICE)], [torch.zeros(4, device=DEVICE)])


def test_refuses_tensors_on_the_wrong_device():
    if runtime.interpreting():
        pytest.skip("under the interpreter CPU tensors are the right device")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        backend.ls_save_sgd([torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)])


# ------------------------------------------------------------------------------------ SVI backward
_ACT = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu,
}
# Autograd in the same dtype is itself only this close to the fp64 derivative (e.g. tanh-GELU
# near z = -4.6, where 1 + tanh cancels, is off by 2e-6 in fp32).
_ACT_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (1e-3, 2e-3),
            torch.bfloat16: (8e-3, 1.6e-2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_backward_matches_autograd(activation, dtype):
    gen = torch.Generator().manual_seed(8)
    z = (torch.randn(33, 65, generator=gen) * 4).to(DEVICE, dtype)
    z.view(-1)[:4] = torch.tensor([0.0, -0.0, 30.0, -30.0])  # the kink of relu and saturated tails
    g = torch.randn(33, 65, generator=gen).to(DEVICE, dtype)
    zz = z.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_ACT[activation](zz), zz, g)
    sk_triton.reset_launch_count()
    got = act_backward(z, g, activation)
    assert sk_triton.launch_count["act_backward_kernel"] == 1
    assert got.shape == z.shape and got.dtype == dtype
    atol, rtol = _ACT_TOL[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(act_backward_torch(z, g, activation), expected, atol=atol, rtol=rtol)


def test_act_backward_edge_cases():
    empty = torch.zeros(0, 3, device=DEVICE)
    assert act_backward(empty, empty, "gelu").shape == (0, 3)
    z = torch.randn(8, 6, device=DEVICE).t()  # non-contiguous input
    g = torch.randn(6, 8, device=DEVICE)
    torch.testing.assert_close(act_backward(z, g, "silu"), act_backward_torch(z, g, "silu"), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown activation"):
        act_backward(z, g, "softplus")
    # mixed dtypes (e.g. under autocast) take the PyTorch path, which promotes like autograd
    mixed = act_backward(z, g.double(), "tanh")
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, act_backward_torch(z.double(), g.double(), "tanh"), atol=1e-6, rtol=1e-6)
    # a broadcast (stride-0) gradient, as from y.sum().backward()
    z2 = torch.randn(5, 7, device=DEVICE)
    g2 = torch.ones(1, device=DEVICE).expand(5, 7)
    torch.testing.assert_close(act_backward(z2, g2, "gelu"), act_backward_torch(z2, g2, "gelu"), atol=1e-6, rtol=1e-5)
