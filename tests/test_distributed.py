"""DistributedDataParallel on 2 CPU processes (gloo): every optimizer keeps the replicas identical.

Each rank sees different data. DDP averages the gradients in the backward of the line-search
closure's first evaluation; trial forwards run under no_grad (DDP then skips its reducer) and their
losses are averaged over ranks by ``average_over_ranks``, so every rank takes the same Armijo decision.
Both processes run every configuration in one spawn (process start-up dominates the cost); rank 0
writes what both ranks saw to a file that the tests below read.
"""
from __future__ import annotations

import copy

import pytest
import torch

import rank_jobs
import svi_kernels as sk

WORLD = 2
N_STEPS = 4
OPTIMIZERS = ["AdamW", "SVI", "ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS"]
LINE_SEARCH = {"ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS"}
BACKENDS = ["reference"] + (["cpu"] if sk.backends()["cpu"]["available"] else [])
# DDP copies reduced buckets into .grad, or (gradient_as_bucket_view) makes .grad a view of the bucket.
CONFIGS = [(o, b, v) for o in OPTIMIZERS for b in BACKENDS for v in (False, True)]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def _optimizer(name: str, model: torch.nn.Module, backend: str):
    # Large initial step sizes so that the searches really backtrack.
    if name == "AdamW":
        return sk.AdamW(model.parameters(), lr=1e-2, backend=backend)
    if name == "SVI":
        return sk.SVI(model.parameters(), lr=1e-2, backend=backend)
    if name == "ArmijoSGD":
        return sk.ArmijoSGD(model.parameters(), init_step_size=10.0, n_batches_per_epoch=4, backend=backend)
    if name == "AdamSLS":
        return sk.AdamSLS(model.parameters(), init_step_size=5.0, n_batches_per_epoch=4, backend=backend)
    groups = [{"params": list(model[i].parameters())} for i in (0, 2, 4)]
    return sk.LayerwiseAdamSLS(groups, warmup_steps=1, init_step_size=5.0, n_batches_per_epoch=4, backend=backend)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)


def _run_config(rank: int, name: str, backend: str, bucket_view: bool) -> dict:
    model = _model()
    handle = sk.svi.attach(model) if name == "SVI" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    init = [p.detach().clone() for p in params]
    opt = _optimizer(name, model, backend)
    local_losses = []
    for step in range(N_STEPS):
        x, y = _batch(rank, step)
        rank_jobs.train_step(opt, lambda: torch.nn.functional.cross_entropy(ddp(x), y), local_losses,
                             name in LINE_SEARCH)
    rec = {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "changed": any(not torch.equal(a.detach(), b) for a, b in zip(model.parameters(), init)),
        "not_rebound": all(a is b for a, b in zip(model.parameters(), params))
        and [p.data_ptr() for p in params] == ptrs,
        "local_losses": local_losses,
        "ls": copy.deepcopy(opt.ls_state) if name in LINE_SEARCH else None,
    }
    if handle is not None:
        rec["svi_layers"] = list(handle.layers)
        handle.remove()
    return rec


def _nonfinite_on_one_rank(rank: int, backend: str) -> dict:
    """A NaN loss on rank 1 only: the averaged loss is NaN on both, so both raise, then training goes on."""
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = sk.AdamSLS(model.parameters(), n_batches_per_epoch=4, backend=backend)
    x, y = _batch(rank, 0)
    ce = torch.nn.functional.cross_entropy
    opt.zero_grad()
    opt.step(lambda: ce(ddp(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    bad = float("nan") if rank == 1 else 1.0
    opt.zero_grad()
    raised = None
    try:
        opt.step(lambda: ce(ddp(x), y) * bad)
    except sk.NonFiniteLossError as exc:
        raised = type(exc).__name__
    unchanged = all(torch.equal(a.detach(), b) for a, b in zip(model.parameters(), before))
    opt.zero_grad()
    opt.step(lambda: ce(ddp(x), y))  # DDP must accept a new iteration after a forward without backward
    return {"raised": raised, "unchanged": unchanged, "params": [p.detach().clone() for p in model.parameters()],
            "step": opt.ls_state["step"]}


def _worker(rank: int, out_path: str) -> None:
    def jobs():
        out = [(c, lambda c=c: _run_config(rank, *c)) for c in CONFIGS]
        return out + [(("nonfinite", b), lambda b=b: _nonfinite_on_one_rank(rank, b)) for b in BACKENDS]
    rank_jobs.run_jobs(rank, WORLD, jobs, out_path, timeout_s=60)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "results.pt")
    try:
        return rank_jobs.spawn(_worker, (out,), WORLD, out, limit_s=180)
    except TimeoutError as exc:
        pytest.fail(str(exc))


_ranks = rank_jobs.ranks


@pytest.mark.parametrize("name,backend,bucket_view", CONFIGS, ids=[f"{o}-{b}-{'view' if v else 'copy'}"
                                                                   for o, b, v in CONFIGS])
def test_replicas_identical(results, name, backend, bucket_view):
    r0, r1 = _ranks(results, (name, backend, bucket_view))
    # Different data per rank (else the test proves nothing), yet bitwise-identical replicas.
    assert r0["local_losses"][0] != r1["local_losses"][0]
    for i, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        assert torch.equal(a, b), f"param {i} differs across ranks (max diff {(a - b).abs().max()})"
    for a, b in zip(r0["grads"], r1["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert r0["changed"] and r1["changed"], "training did not move the parameters"
    assert r0["not_rebound"] and r1["not_rebound"], "the optimizer rebound a parameter (DDP would lose it)"
    if name == "SVI":
        assert r0["svi_layers"] == ["0", "2"]


@pytest.mark.parametrize("name,backend,bucket_view", [c for c in CONFIGS if c[0] in LINE_SEARCH],
                         ids=[f"{o}-{b}-{'view' if v else 'copy'}" for o, b, v in CONFIGS if o in LINE_SEARCH])
def test_same_line_search_decisions(results, name, backend, bucket_view):
    r0, r1 = _ranks(results, (name, backend, bucket_view))
    assert r0["ls"] == r1["ls"]  # step sizes, backtracks, found, forward/backward counts
    ls = r0["ls"]
    assert ls["step"] == N_STEPS and ls["n_backwards"] == N_STEPS
    assert ls["total_backtracks"] > 0, "no backtracking happened: the test would not exercise trial forwards"
    assert ls["n_forwards"] == len(r0["local_losses"]) == len(r1["local_losses"]) > N_STEPS


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_loss_on_one_rank(results, backend):
    r0, r1 = _ranks(results, ("nonfinite", backend))
    assert r0["raised"] == r1["raised"] == "NonFiniteLossError"
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["step"] == r1["step"] == 2
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
