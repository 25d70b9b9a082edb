"""The CPU ops' one-pass list check (csrc/cpu/multi_tensor.h): a defect anywhere in any list, far
from the start, still gets check_fused_group's precise error, and no tensor is modified first."""
from __future__ import annotations

import pytest
import torch

from svi_kernels.backends import backends

CPU = backends()["cpu"]
pytestmark = pytest.mark.skipif(not CPU["available"], reason=f"cpu backend: {CPU['reason']}")

N = 300  # tensors per list; the defect sits near the end
BAD = N - 7
ADAM_KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
               bias_correction1=0.1, bias_correction2_sqrt=0.05, maximize=False)


def lists(count):
    gen = torch.Generator().manual_seed(0)
    return [[torch.rand(5, generator=gen) + 0.1 for _ in range(N)] for _ in range(count)]


def non_contiguous(t):
    return torch.empty(t.numel() * 2, dtype=t.dtype)[::2]


DEFECTS = {
    "not contiguous": (non_contiguous, r"\[{i}\] is not contiguous"),
    "dtype": (lambda t: t.double(), r"\[{i}\] has dtype Double but params\[0\] has Float"),
    "numel": (lambda t: torch.zeros(t.numel() + 1), r"\[{i}\] has [56] elements but params\[{i}\] has [56]"),
    "sparse": (lambda t: t.to_sparse(), r"\[{i}\] has layout Sparse"),
}

# op name, number of lists, list names in schema order, call
OPS = {
    "adam_step": (4, ("params", "grads", "exp_avgs", "exp_avg_sqs"),
                  lambda cpu, ls: cpu.adam_step(*ls, **ADAM_KW)),
    "adam_step amsgrad": (5, ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
                          lambda cpu, ls: cpu.adam_step(*ls[:4], max_exp_avg_sqs=ls[4], **ADAM_KW)),
    "sgd_momentum_step": (3, ("params", "grads", "momentum_buffers"),
                          lambda cpu, ls: cpu.sgd_momentum_step(*ls, lr=0.1, momentum=0.9, nesterov=False,
                                                                weight_decay=0.0)),
    "ls_save_adam": (6, ("params", "grads", "exp_avgs", "exp_avg_sqs", "w0", "dirs"),
                     lambda cpu, ls: cpu.ls_save_adam(*ls, beta1=0.9, beta2=0.999, eps=1e-8,
                                                      bias_correction2_sqrt=1.0)),
    "ls_trial_sgd": (3, ("params", "w0", "grads"), lambda cpu, ls: cpu.ls_trial_sgd(*ls, [0.1] * N)),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_late_defect_in_every_list_is_named(cpu, op, defect):
    count, names, call = OPS[op]
    make_bad, pattern = DEFECTS[defect]
    for k in range(count):
        ls = lists(count)
        ls[k][BAD] = make_bad(ls[k][BAD])
        before = [t.clone() for t in ls[0]]
        # numels are compared with params': a bad params[BAD] is reported on the next list
        named = names[1] if (k == 0 and defect == "numel") else names[k]
        with pytest.raises(RuntimeError, match=rf"svi_kernels::.*{named}" + pattern.format(i=BAD)):
            call(cpu, ls)
        unchanged = [torch.equal(a, b) for i, (a, b) in enumerate(zip(ls[0], before)) if i != BAD]
        assert all(unchanged), "params changed before the error"


def test_unsupported_first_dtype_is_named(cpu):
    p, g, w0 = ([torch.arange(4)] * 3 for _ in range(3))
    with pytest.raises(RuntimeError, match=r"params\[0\] has dtype Long; supported dtypes"):
        cpu.ls_save_sgd(p, g, w0)


def test_many_valid_tensors_still_update(cpu):
    # The fast path accepts what check_fused_group accepts: every tensor is updated.
    p, g, b = lists(3)
    expect = [x - 0.1 * (0.9 * bi + gi) for x, gi, bi in zip(p, g, b)]
    cpu.sgd_momentum_step(p, g, b, lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0)
    for got, want in zip(p, expect):
        torch.testing.assert_close(got, want)
