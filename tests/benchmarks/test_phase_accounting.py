"""svi-bench counts a line-search row's bytes from its phases (benchmarks/traffic.py): they must be
the fused ops one step of the optimizer really runs (recorded here on the reference backend)."""
import importlib
from collections import Counter

import pytest
import torch

from svi_kernels._entry import load

# Through svi_kernels._entry: benchmarks/ ships as svi_kernels._benchmarks in the wheel.
rows_mod = importlib.import_module(load("microbench").__package__ + ".rows")

OPS = ("ls_save_sgd", "ls_save_adam", "ls_trial_sgd", "ls_trial_adam", "ls_final_adam", "adam_step")


@pytest.mark.parametrize("row_name,adam", [("armijo_sgd_bookkeeping", False), ("adam_sls_bookkeeping", True),
                                           ("salsa_search_bookkeeping", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_phases_are_the_ops_one_step_runs(monkeypatch, row_name, adam, dtype):
    from svi_kernels.backends import get
    impl = get("reference")
    calls = []

    def recorder(name, original):
        def record(*args, **kwargs):
            if name == "ls_save_sgd" and not len(args[2]):
                calls.append("ls_grad_check")  # sums of g^2 only, no w0 written
            elif name == "ls_save_adam" and len(args[5]):
                calls.append("ls_save_adam_dir")  # with the direction saved
            elif name == "ls_trial_sgd" and adam:
                calls.append("ls_trial_adam_dir")  # an Adam trial along the saved direction
            else:
                calls.append(name)
            return original(*args, **kwargs)
        return record

    for name in OPS:
        monkeypatch.setattr(impl, name, recorder(name, getattr(impl, name)))
    params = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in (5, 7, 3)]
    grads = [torch.randn(n).to(dtype) for n in (5, 7, 3)]
    for p, g in zip(params, grads):
        p.grad = g
    ctx = rows_mod.Context(params, grads, torch.device("cpu"), dtype,
                           rows_mod.TrivialClosure(torch.device("cpu"), params))
    row = next(r for r in rows_mod.build_rows(["reference"]) if r.name == row_name)
    step, _opt = row.build(ctx)
    step()
    want = Counter()
    for op, count in row.phases(ctx):
        want[op] += count
    assert Counter(calls) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layerwise_phases_weigh_each_op_by_the_parameters_it_covers(monkeypatch, dtype):
    """A "cycle" step over 3 equal groups: the check, the save (no direction) and the final step cover
    every parameter, the trial the searched third (recomputing d from g and v): the row's phases."""
    from svi_kernels.backends import get
    impl = get("reference")
    covered = Counter()
    params = [torch.nn.Parameter(torch.randn(6).to(dtype)) for _ in range(3)]
    total = sum(p.numel() for p in params)

    def recorder(name, original):
        def record(*args, **kwargs):
            label = "ls_grad_check" if name == "ls_save_sgd" and not len(args[2]) else name
            if name == "ls_save_adam" and len(args[5]):
                label = "ls_save_adam_dir"
            covered[label] += sum(p.numel() for p in args[0]) / total
            return original(*args, **kwargs)
        return record

    for name in OPS:
        monkeypatch.setattr(impl, name, recorder(name, getattr(impl, name)))
    grads = [torch.randn(6).to(dtype) for _ in range(3)]
    for p, g in zip(params, grads):
        p.grad = g
    ctx = rows_mod.Context(params, grads, torch.device("cpu"), dtype, rows_mod.TrivialClosure(torch.device("cpu"), params))
    row = next(r for r in rows_mod.build_rows(["reference"]) if r.name == "layerwise_adam_sls_bookkeeping")
    step, _opt = row.build(ctx)
    step()
    want = Counter()
    for op, count in row.phases(ctx):
        want[op] += count
    assert set(covered) == set(want)
    for op in want:
        assert covered[op] == pytest.approx(want[op]), op
