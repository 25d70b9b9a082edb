"""What tests/distributed/test_master_fsdp.py runs on 2 gloo ranks: bf16 parameters under FSDP2 (uneven
and empty shards: fsdp_jobs.make_model) with each ``master_weights`` mode (issue 24), every rank on the
full batch, so that its gradients are one process's bit for bit ((g + g) / 2 == g); in one process, the
same training; and a DCP checkpoint of the master state, resumed."""
from __future__ import annotations

import copy
import os

import torch

import fsdp_jobs as J
import rank_jobs
import state_dtype_jobs as S
import svi_kernels as sk

MODES = (True, "kahan", "8bit", "stochastic")
OPTIMIZERS = ("AdamW", "SVI", "AdamSLS", "SaLSA")
LINE_SEARCH = ("AdamSLS", "SaLSA")
N_STEPS = 4
MASTER_KEYS = ("master_param", "master_correction")


def make_model(seed: int = 0) -> torch.nn.Sequential:
    return J.make_model(seed).to(torch.bfloat16)


def make_optimizer(name: str, model, mode, **kw):
    backend = "cpu" if sk.backends()["cpu"]["available"] else "reference"
    return S.make_optimizer(name, model, backend, state_dtype=None, master_weights=mode, **kw)


def train(model, opt, name: str, steps) -> None:
    for step in steps:
        x, y = J.make_batch(step)
        rank_jobs.train_step(opt, lambda: torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y), [],
                             name in LINE_SEARCH)


def _master_state(opt, model) -> dict:
    """Each parameter's master entries: (whole tensor, placements or None) by key."""
    out = {}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        out[i] = {k: (J.full(st[k]), str(st[k].placements) if hasattr(st[k], "placements") else None)
                  for k in MASTER_KEYS if k in st}
    return out


def single(name: str, mode) -> dict:
    model = make_model()
    opt = make_optimizer(name, model, mode, **({"process_group": False} if name in LINE_SEARCH else {}))
    train(model, opt, name, range(N_STEPS))
    return {"params": [J.full(p) for p in model.parameters()], "master": _master_state(opt, model),
            "ls": copy.deepcopy(opt.ls_state) if name in LINE_SEARCH else None}


def sharded(name: str, mode) -> dict:
    model = make_model()
    J._shard(model, skip=(4,))
    opt = make_optimizer(name, model, mode)
    train(model, opt, name, range(N_STEPS))
    return {"params": [J.full(p) for p in model.parameters()], "master": _master_state(opt, model),
            "param_placements": [str(p.placements) for p in model.parameters()],
            "local_numel": [p.to_local().numel() for p in model.parameters()],
            "ls": copy.deepcopy(opt.ls_state) if name in LINE_SEARCH else None}


def dcp_resume(name: str, mode, ckpt_dir: str) -> dict:
    """Save with DCP after 2 steps and go on; a fresh model and optimizer (other initial values) loaded in
    place go on: the same bits (parameters and every state entry, master ones included)."""
    import torch.distributed.checkpoint as dcp
    path = os.path.join(ckpt_dir, f"master-{name}-{mode}")
    model = make_model()
    J._shard(model)
    opt = make_optimizer(name, model, mode)
    train(model, opt, name, range(2))
    dcp.save(J._dcp_state(model, opt), checkpoint_id=path)
    train(model, opt, name, range(2, N_STEPS))
    model2 = make_model(seed=1)
    J._shard(model2)
    opt2 = make_optimizer(name, model2, mode)
    J.dcp_load_into(model2, opt2, path)
    train(model2, opt2, name, range(2, N_STEPS))
    s1, s2 = J._local_state(opt), J._local_state(opt2)
    return {"same_params": all(torch.equal(a.to_local(), b.to_local())
                               for a, b in zip(model.parameters(), model2.parameters())),
            "same_state": len(s1) == len(s2) and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                                                      for a, b in zip(s1, s2)),
            "master_keys": sorted({k for st in s1 for k in st if k in MASTER_KEYS})}


def _jobs(ckpt_dir):
    jobs = []
    for name in OPTIMIZERS:
        for mode in MODES:
            jobs.append((("single", name, mode), lambda n=name, m=mode: single(n, m)))
            jobs.append((("sharded", name, mode), lambda n=name, m=mode: sharded(n, m)))
    for name in ("AdamW", "AdamSLS"):
        for mode in MODES:
            jobs.append((("dcp", name, mode), lambda n=name, m=mode: dcp_resume(n, m, ckpt_dir)))
    return jobs


def _worker(rank: int, world: int, out_path: str, ckpt_dir: str) -> None:
    rank_jobs.run_jobs(rank, world, lambda: _jobs(ckpt_dir), out_path)


def spawn_jobs(world: int, tmp_dir: str, limit_s: float = 400) -> dict:
    out = os.path.join(tmp_dir, "master_fsdp.pt")
    return rank_jobs.spawn(_worker, (world, out, tmp_dir), world, out, limit_s)
