"""What the FSDP2 tests run: the same model and data in one process (full batch) and on several gloo
ranks with ``fully_shard`` (each rank a slice of the batch), plus the checkpoint, error and
collective-count checks. ``spawn_jobs`` starts the ranks once and runs every job in them.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

import rank_jobs
import svi_kernels as sk

N_STEPS = 4
BATCH = 16
LINE_SEARCH = ["ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS"] + (["SaLSA"] if hasattr(sk, "SaLSA") else [])
OPTIMIZERS = ["AdamW", "SVI"] + LINE_SEARCH
BACKENDS = ["reference"] + (["cpu"] if sk.backends()["cpu"]["available"] else [])


def make_model(seed: int = 0) -> torch.nn.Sequential:
    # Row counts 7, 5, 1 and 7, 5, 1 biases: on 2 ranks the shards are uneven (4/3, 3/2) and the last
    # layer's weight and bias have an empty local shard on rank 1.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.GELU(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1))


LINEARS = (0, 2, 4)


def make_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 6, generator=g)
    return x, torch.sin(3 * x[:, :1]) + 0.5 * x[:, 1:2]


def rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def make_optimizer(name: str, model: torch.nn.Module, backend: str, extra=(), **kw):
    """``extra``: more parameters for the (last) group."""
    params = list(model.parameters()) + list(extra)  # large initial step sizes: the searches backtrack
    if name == "AdamW":
        return sk.AdamW(params, lr=3e-2, backend=backend)
    if name == "SVI":
        return sk.SVI(params, lr=3e-2, backend=backend)
    if name == "ArmijoSGD":
        return sk.ArmijoSGD(params, init_step_size=20.0, n_batches_per_epoch=4, backend=backend, **kw)
    if name == "AdamSLS":
        return sk.AdamSLS(params, init_step_size=5.0, n_batches_per_epoch=4, backend=backend, **kw)
    if name == "SaLSA":
        return sk.SaLSA(params, init_step_size=5.0, backend=backend, **kw)
    groups = [{"params": list(model[i].parameters())} for i in LINEARS]
    groups[-1]["params"] += list(extra)
    return sk.LayerwiseAdamSLS(groups, warmup_steps=1, init_step_size=5.0, n_batches_per_epoch=4,
                               backend=backend, **kw)


def train(model, opt, name: str, steps, rank: int = 0, world: int = 1, grads_at=None) -> list:
    """Steps over the given batches; returns the local losses the closures computed."""
    losses = []
    for step in steps:
        x, y = make_batch(step)
        x, y = rows(x, rank, world), rows(y, rank, world)
        keep = None
        if grads_at is not None and step == 0:
            def keep():
                grads_at.extend(full(p.grad) for p in model.parameters())
        rank_jobs.train_step(opt, lambda: torch.nn.functional.mse_loss(model(x), y), losses, name in LINE_SEARCH,
                             after_backward=keep)
    return losses


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call it)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def attach_svi(model, example: bool):
    """``example``: detect now on a batch (a forward without backward: on FSDP2, attach must leave no
    module holding gathered parameters, or training would read a stale copy); else on the first forward
    (FSDP2's hooks on the layer outputs must not count as uses)."""
    return sk.svi.attach(model, make_batch(0)[0] if example else None, quiet=True)


def single_process(name: str, backend: str) -> dict:
    """One process on the whole batch: what every sharded run must equal."""
    model = make_model()
    handle = attach_svi(model, example=False) if name == "SVI" else None
    kw = {} if name in ("AdamW", "SVI") else {"process_group": False}
    opt = make_optimizer(name, model, backend, **kw)
    grads = []
    train(model, opt, name, range(N_STEPS), grads_at=grads)
    svi_layers = None
    if handle is not None:
        svi_layers = list(handle.layers)
        handle.remove()
    return {"params": [full(p) for p in model.parameters()], "grads": grads, "svi_layers": svi_layers,
            "ls": copy.deepcopy(opt.ls_state) if name in LINE_SEARCH else None}


# ------------------------------------------------------------------------------- rank jobs
def _shard(model, mesh=None, skip=()) -> None:
    from torch.distributed.fsdp import fully_shard
    for i in LINEARS:
        if i not in skip:
            fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)


def sharded_run(rank: int, world: int, name: str, backend: str, mesh=None, svi: str = "after") -> dict:
    """``svi`` (SVI only): attach "after" fully_shard (first forward), "before" it, or "example" (after,
    with example inputs)."""
    model = make_model()
    handle = None
    if name == "SVI" and svi == "before":
        handle = attach_svi(model, example=False)
    _shard(model, mesh, skip=(4,))  # the root owns the last layer: it keeps it gathered after a forward
    if name == "SVI" and svi != "before":
        handle = attach_svi(model, example=svi == "example")
    opt = make_optimizer(name, model, backend)
    grads = []
    losses = train(model, opt, name, range(N_STEPS), rank, world, grads_at=grads)
    state_placements = sorted({str(v.placements) for st in opt.state.values() if isinstance(st, dict)
                               for v in st.values() if hasattr(v, "placements")})
    rec = {"params": [full(p) for p in model.parameters()], "grads": grads, "losses": losses,
           "ls": copy.deepcopy(opt.ls_state) if name in LINE_SEARCH else None,
           "state_placements": state_placements,
           "local_shapes": [tuple(p.to_local().shape) for p in model.parameters()]}
    if handle is not None:
        rec["svi_layers"] = list(handle.layers)
        handle.remove()
    return rec


def _dcp_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def dcp_load_into(model, opt, path: str) -> None:
    """Load the DCP checkpoint at ``path`` in place into ``model`` and ``opt`` (their state dicts are the
    template: DCP reads only the entries they hold)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    sd = _dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _local_state(opt) -> list:
    """Every state entry of every parameter, local shards, in parameter order (for bitwise comparison)."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            out.append({k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in sorted(st.items())
                        if isinstance(v, torch.Tensor)})
    return out


def dcp_resume(rank: int, world: int, name: str, backend: str, ckpt_dir: str) -> dict:
    """Save with DCP after 2 steps and go on; load into a fresh model and optimizer and go on: same bits.
    Then load it back into the first model and optimizer and go on again: the same bits once more."""
    import torch.distributed.checkpoint as dcp
    path = os.path.join(ckpt_dir, f"{name}-{backend}")
    model = make_model()
    _shard(model)
    opt = make_optimizer(name, model, backend)
    train(model, opt, name, range(2), rank, world)
    dcp.save(_dcp_state(model, opt), checkpoint_id=path)
    train(model, opt, name, range(2, N_STEPS), rank, world)

    model2 = make_model(seed=1)  # other initial values: only the checkpoint can make them equal
    _shard(model2)
    opt2 = make_optimizer(name, model2, backend)
    dcp_load_into(model2, opt2, path)
    ls_loaded = copy.deepcopy(opt2.ls_state) if name in LINE_SEARCH else None
    train(model2, opt2, name, range(2, N_STEPS), rank, world)
    same_params = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters()))
    s1, s2 = _local_state(opt), _local_state(opt2)
    same_state = len(s1) == len(s2) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(s1, s2))
    # Roll the trained model and optimizer back to the checkpoint (their step plans were built) and go on.
    dcp_load_into(model, opt, path)
    train(model, opt, name, range(2, N_STEPS), rank, world)
    rolled_back = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters()))
    return {"same_params": same_params, "same_state": same_state, "ls_loaded_step": (ls_loaded or {}).get("step"),
            "rolled_back": rolled_back,
            "ls": (copy.deepcopy(opt.ls_state), copy.deepcopy(opt2.ls_state)) if name in LINE_SEARCH else None}


def mixed(rank: int, world: int, name: str, backend: str) -> dict:
    """A head left out of fully_shard (plain parameters; its gradient averaged over ranks by a hook) and
    a sharded layer that gets no gradient, in one optimizer with the sharded layers."""
    from torch.distributed.fsdp import fully_shard
    model = make_model()
    unused = torch.nn.Linear(3, 3)  # never called: its gradient stays None
    for i in (0, 2):
        fully_shard(model[i])
    fully_shard(unused)
    head = model[4]

    def average(p):
        dist.all_reduce(p.grad)
        p.grad /= world

    for p in head.parameters():
        p.register_post_accumulate_grad_hook(average)
    opt = make_optimizer(name, model, backend, extra=unused.parameters())
    before_unused = [p.to_local().clone() for p in unused.parameters()]
    train(model, opt, name, range(N_STEPS), rank, world)
    return {"params": [full(p) for p in model.parameters()],
            "plain_head": [not hasattr(p, "placements") for p in head.parameters()],
            "unused_unchanged": all(torch.equal(a, p.to_local()) for a, p in zip(before_unused, unused.parameters())),
            "ls": copy.deepcopy(opt.ls_state) if name in LINE_SEARCH else None}


def collectives(rank: int, world: int, name: str, backend: str) -> dict:
    """all_reduce calls per line-search step: one per evaluated loss, plus one per reduction phase."""
    model = make_model()
    _shard(model)
    opt = make_optimizer(name, model, backend)
    calls = {"n": 0}
    orig = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    per_step = []
    dist.all_reduce = counting
    try:
        for step in range(N_STEPS):
            before_calls, before_fwd = calls["n"], opt.n_forwards
            train(model, opt, name, [step], rank, world)
            per_step.append((calls["n"] - before_calls, opt.n_forwards - before_fwd))
    finally:
        dist.all_reduce = orig
    return {"per_step": per_step}


def bad_placement(rank: int, world: int) -> dict:
    """Shard(1) (tensor parallel) is refused at step(), naming it, before anything is modified."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    good = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)]))
    bad = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    out = {}
    for name in ("AdamW", "AdamSLS"):
        before = [good.to_local().clone(), bad.to_local().clone()]
        opt = (sk.AdamW([{"params": [good]}, {"params": [bad]}], lr=0.1) if name == "AdamW"
               else sk.AdamSLS([{"params": [good]}, {"params": [bad]}], n_batches_per_epoch=4))
        for p in (good, bad):
            p.grad = torch.ones_like(p)
        try:
            if name == "AdamW":
                opt.step()
            else:
                opt.step(lambda: (good.to_local().sum() + bad.to_local().sum()) * 0 + torch.ones((), requires_grad=True))
            out[name] = None
        except RuntimeError as exc:
            out[name] = str(exc)
        out[name + "_unchanged"] = (torch.equal(before[0], good.to_local()) and torch.equal(before[1], bad.to_local())
                                    and not any(opt.state.get(p) for p in (good, bad)))
    # Sharded parameters with the loss averaging switched off cannot decide together.
    model = make_model()
    _shard(model)
    opt = sk.AdamSLS(model.parameters(), n_batches_per_epoch=4, process_group=False)
    try:
        train(model, opt, "AdamSLS", [0], rank, world)
        out["no_group"] = None
    except RuntimeError as exc:
        out["no_group"] = str(exc)
    return out


def hsdp(rank: int, world: int, name: str, backend: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    rec = sharded_run(rank, world, name, backend, mesh=mesh)
    rec["placements"] = str(mesh)
    return rec


# ------------------------------------------------------------------------------- spawning
def _worker(rank: int, world: int, out_path: str, jobs_name: str, ckpt_dir: str) -> None:
    rank_jobs.run_jobs(rank, world, lambda: JOB_LISTS[jobs_name](rank, world, ckpt_dir), out_path)


def _two_rank_jobs(rank, world, ckpt_dir):
    jobs = []
    for name in OPTIMIZERS:
        for backend in BACKENDS:
            jobs.append((("run", name, backend), lambda n=name, b=backend: sharded_run(rank, world, n, b)))
        jobs.append((("dcp", name), lambda n=name: dcp_resume(rank, world, n, BACKENDS[-1], ckpt_dir)))
    for name in ("AdamW", "AdamSLS", "LayerwiseAdamSLS"):
        jobs.append((("mixed", name), lambda n=name: mixed(rank, world, n, BACKENDS[-1])))
    for name in LINE_SEARCH:
        jobs.append((("collectives", name), lambda n=name: collectives(rank, world, n, BACKENDS[-1])))
    jobs.append((("bad",), lambda: bad_placement(rank, world)))
    for when in ("before", "example"):
        jobs.append((("svi", when), lambda w=when: sharded_run(rank, world, "SVI", BACKENDS[-1], svi=w)))
    return jobs


def _four_rank_jobs(rank, world, ckpt_dir):
    return [(("hsdp", name), lambda n=name: hsdp(rank, world, n, BACKENDS[-1])) for name in ("LayerwiseAdamSLS", "AdamW")]


JOB_LISTS = {"two": _two_rank_jobs, "four": _four_rank_jobs}


def spawn_jobs(jobs_name: str, world: int, tmp_dir: str, limit_s: float = 240) -> dict:
    """Run a job list on ``world`` gloo ranks; returns {key: [record per rank]}."""
    out = os.path.join(tmp_dir, f"{jobs_name}.pt")
    return rank_jobs.spawn(_worker, (world, out, jobs_name, tmp_dir), world, out, limit_s)
