"""AMSGrad (``max_exp_avg_sqs``) in adam_step and adam_step_tensor: every available backend against
the float64 reference, fp32/fp16/bf16, odd and zero sizes (helpers from test_ops_parity)."""
from __future__ import annotations

import math

import pytest
import torch

from svi_kernels.backends import get, reference

from test_ops_parity import DTYPES, SIZES, _device_for, assert_close, f64, lists_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _max_v(v, seed):
    """A running max that is above the new v for some elements and below it for others."""
    gen = torch.Generator().manual_seed(seed)
    return [(x.double().cpu() * (0.5 + torch.rand(x.numel(), generator=gen, dtype=torch.float64)))
            .to(dtype=x.dtype, device=x.device) for x in v]


CASES = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, step=3, maximize=False),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=False, step=7, maximize=True),
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, step=None, maximize=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_adam_step_amsgrad(backend, dtype, case):
    c = dict(CASES[case])
    step = c.pop("step")
    bc1, bc2s = (1.0, 1.0) if step is None else (1 - c["beta1"] ** step, math.sqrt(1 - c["beta2"] ** step))
    dev = _device_for(backend)
    p, g, m, v = lists_for(SIZES, dtype, dev, 50 + case, ["n", "n", "small", "pos"])
    vmax = _max_v(v, 60 + case)
    want = [f64(x) for x in (p, g, m, v, vmax)]
    get(backend).adam_step(p, g, m, v, bias_correction1=bc1, bias_correction2_sqrt=bc2s, max_exp_avg_sqs=vmax, **c)
    reference.adam_step(*want[:4], bias_correction1=bc1, bias_correction2_sqrt=bc2s, max_exp_avg_sqs=want[4], **c)
    for got, ref, name in zip((p, m, v, vmax), (want[0], want[2], want[3], want[4]),
                              ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
        assert_close(got, ref, dtype, name)


def test_reference_amsgrad_is_max_of_v():
    p, g, m, v = lists_for([5, 0, 17], torch.float64, "cpu", 1, ["n", "n", "small", "pos"])
    vmax = _max_v(v, 2)
    old_max = [x.clone() for x in vmax]
    reference.adam_step(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                        bias_correction1=1.0, bias_correction2_sqrt=1.0, max_exp_avg_sqs=vmax)
    for a, b, new_v in zip(vmax, old_max, v):
        torch.testing.assert_close(a, torch.maximum(b, new_v), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amp", [False, True])
def test_adam_step_tensor_amsgrad(backend, dtype, amp):
    dev = _device_for(backend)
    p, g, m, v = lists_for(SIZES, dtype, dev, 70, ["n", "n", "small", "pos"])
    vmax = _max_v(v, 71)
    steps = [torch.tensor(float(i + 1), device=dev) for i in range(len(SIZES))]
    scale = torch.tensor(4.0, device=dev) if amp else None
    found_inf = torch.zeros((), device=dev) if amp else None
    lr = torch.tensor(1e-2, device=dev)
    want = [f64(x) for x in (p, g, m, v, vmax)]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, correct_bias=True)
    get(backend).adam_step_tensor(p, g, m, v, steps, lr=lr, grad_scale=scale, found_inf=found_inf,
                                  max_exp_avg_sqs=vmax, **kw)
    reference.adam_step_tensor(*want[:4], [s.cpu() for s in steps], lr=lr.cpu(),
                               grad_scale=None if scale is None else scale.cpu(),
                               found_inf=None if found_inf is None else found_inf.cpu(),
                               max_exp_avg_sqs=want[4], **kw)
    for got, ref, name in zip((p, g, m, v, vmax), want, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
        assert_close(got, ref, dtype, name)


def test_adam_step_tensor_amsgrad_skipped(backend):
    dev = _device_for(backend)
    p, g, m, v = lists_for([7, 0, 33], torch.float32, dev, 80, ["n", "n", "small", "pos"])
    vmax = _max_v(v, 81)
    before = [[x.clone() for x in lst] for lst in (p, g, m, v, vmax)]
    get(backend).adam_step_tensor(p, g, m, v, [torch.tensor(1.0, device=dev)] * 3, lr=1e-2, beta1=0.9, beta2=0.999,
                                  eps=1e-8, weight_decay=0.0, decoupled=True, correct_bias=True,
                                  grad_scale=torch.tensor(2.0, device=dev), found_inf=torch.ones((), device=dev),
                                  max_exp_avg_sqs=vmax)
    for lst, old in zip((p, g, m, v, vmax), before):
        for a, b in zip(lst, old):
            assert torch.equal(a, b)


def test_empty_lists_amsgrad(backend):
    get(backend).adam_step([], [], [], [], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                           decoupled=True, bias_correction1=1.0, bias_correction2_sqrt=1.0, max_exp_avg_sqs=[])
