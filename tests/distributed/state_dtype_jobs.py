"""What tests/distributed/test_state_dtype_distributed.py runs on 2 gloo ranks: the optimizers with bf16
state (``state_dtype=torch.bfloat16``) under FSDP2 (uneven and empty shards), a DCP checkpoint resumed, and
DDP replicas; int8 state (``state_dtype="int8"``) with DDP replicas (under FSDP2: int8_fsdp_jobs.py). Built on fsdp_jobs' model, data, sharding and checkpoint helpers."""
from __future__ import annotations

import copy
import os

import torch

import fsdp_jobs as J
import rank_jobs
import svi_kernels as sk

BF16 = torch.bfloat16
OPTIMIZERS = ["AdamW", "SVI", "AdamSLS", "SaLSA", "LayerwiseAdamSLS"]


def make_optimizer(name: str, model: torch.nn.Module, backend: str, state_dtype=BF16, **extra):
    """``extra``: more keywords for the optimizer (master_weights=, process_group=, ...)."""
    params = list(model.parameters())
    kw = dict(backend=backend, state_dtype=state_dtype, **extra)
    if name == "AdamW":
        return sk.AdamW(params, lr=3e-2, **kw)
    if name == "SVI":
        return sk.SVI(params, lr=3e-2, **kw)
    if name == "AdamSLS":
        return sk.AdamSLS(params, init_step_size=5.0, n_batches_per_epoch=4, **kw)
    if name == "SaLSA":
        return sk.SaLSA(params, init_step_size=5.0, **kw)
    groups = [{"params": list(model[i].parameters())} for i in J.LINEARS]
    return sk.LayerwiseAdamSLS(groups, warmup_steps=1, init_step_size=5.0, n_batches_per_epoch=4, **kw)


def _record(model, opt, name: str) -> dict:
    states = [v for st in opt.state.values() if isinstance(st, dict) for k, v in st.items()
              if k in ("exp_avg", "exp_avg_sq", "momentum_buffer")]
    return {"params": [J.full(p) for p in model.parameters()],
            "ls": copy.deepcopy(opt.ls_state) if name in J.LINE_SEARCH else None,
            "state_dtypes": sorted({str(v.dtype) for v in states}),
            "state_placements": sorted({str(getattr(v, "placements", "plain")) for v in states}),
            "calls": opt.param_groups[0].get("state_seed_calls")}


def single_process(name: str, backend: str) -> dict:
    model = J.make_model()
    opt = make_optimizer(name, model, backend)
    if name in J.LINE_SEARCH:
        opt.process_group = False
    J.train(model, opt, name, range(J.N_STEPS))
    return _record(model, opt, name)


def sharded_run(rank: int, world: int, name: str, backend: str) -> dict:
    model = J.make_model()
    J._shard(model, skip=(4,))
    opt = make_optimizer(name, model, backend)
    J.train(model, opt, name, range(J.N_STEPS), rank, world)
    return _record(model, opt, name)


def dcp_resume(rank: int, world: int, name: str, backend: str, ckpt_dir: str) -> dict:
    """fsdp_jobs.dcp_resume with bf16 state: save after 2 steps, go on; a fresh model and optimizer loaded
    in place from the checkpoint go on with the same bits (the seed counter travels in param_groups[0])."""
    import torch.distributed.checkpoint as dcp
    path = os.path.join(ckpt_dir, f"bf16-{name}-{backend}")
    model = J.make_model()
    J._shard(model)
    opt = make_optimizer(name, model, backend)
    J.train(model, opt, name, range(2), rank, world)
    dcp.save(J._dcp_state(model, opt), checkpoint_id=path)
    J.train(model, opt, name, range(2, J.N_STEPS), rank, world)

    model2 = J.make_model(seed=1)
    J._shard(model2)
    opt2 = make_optimizer(name, model2, backend)
    J.dcp_load_into(model2, opt2, path)
    calls_loaded = opt2.param_groups[0].get("state_seed_calls")
    dtypes_loaded = sorted({str(v.dtype) for st in opt2.state.values() if isinstance(st, dict)
                            for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor)})
    J.train(model2, opt2, name, range(2, J.N_STEPS), rank, world)
    same_params = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters()))
    s1, s2 = J._local_state(opt), J._local_state(opt2)
    same_state = len(s1) == len(s2) and all(
        a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(s1, s2))
    return {"same_params": same_params, "same_state": same_state, "calls_loaded": calls_loaded,
            "dtypes_loaded": dtypes_loaded, "calls": opt2.param_groups[0].get("state_seed_calls")}


def ddp_run(rank: int, name: str, backend: str, state_dtype=BF16) -> dict:
    """Each rank its own data, DDP averaging the gradients: the replicas stay bitwise identical."""
    model = J.make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(name, model, backend, state_dtype)
    losses = []
    for step in range(J.N_STEPS):
        x, y = J.make_batch(10 * rank + step)
        rank_jobs.train_step(opt, lambda: torch.nn.functional.mse_loss(ddp(x), y), losses, name in J.LINE_SEARCH)
    rec = _record(model, opt, name)
    rec["losses"] = losses
    if state_dtype == "int8":  # the codes' block scales too
        rec["scales"] = [v for st in opt.state.values() if isinstance(st, dict) for k, v in st.items()
                         if k.endswith("_scale")]
    return rec


def int8_backends(backends):
    """Those of ``backends`` whose ops take int8 state (the compiled ones once built with the keywords)."""
    return [b for b in backends if b == "reference" or "exp_avg_scales" in str(
        torch.ops.svi_kernels.adam_step.default._schema)]


def _jobs(rank, world, ckpt_dir, backends):
    jobs = []
    for backend in backends:
        for name in OPTIMIZERS:
            jobs.append((("run", name, backend), lambda n=name, b=backend: sharded_run(rank, world, n, b)))
            jobs.append((("dcp", name, backend), lambda n=name, b=backend: dcp_resume(rank, world, n, b, ckpt_dir)))
            jobs.append((("ddp", name, backend), lambda n=name, b=backend: ddp_run(rank, n, b)))
            if backend in int8_backends(backends):
                jobs.append((("int8-ddp", name, backend), lambda n=name, b=backend: ddp_run(rank, n, b, "int8")))
    return jobs


def _worker(rank: int, world: int, out_path: str, ckpt_dir: str, backends) -> None:
    rank_jobs.run_jobs(rank, world, lambda: _jobs(rank, world, ckpt_dir, backends), out_path)


def spawn_jobs(world: int, tmp_dir: str, backends, limit_s: float = 300) -> dict:
    out = os.path.join(tmp_dir, "state_dtype.pt")
    return rank_jobs.spawn(_worker, (world, out, tmp_dir, list(backends)), world, out, limit_s)
