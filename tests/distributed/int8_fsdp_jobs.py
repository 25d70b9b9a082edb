"""What tests/distributed/test_int8_fsdp.py runs on 2 gloo ranks: the optimizers with int8 state
(``state_dtype="int8"``, issue 24) under FSDP2, with uneven and empty shards and blocks of 32 elements, so
that whole-tensor blocks would straddle the shard boundaries; and in one process, the same optimizers
over the shards as separate tensors (``ChunkModel``), which is what the per-shard int8 layout must equal.
Built on fsdp_jobs' data, sharding, training and checkpoint helpers."""
from __future__ import annotations

import copy
import os

import torch

import fsdp_jobs as J
import rank_jobs
import state_dtype_jobs as S
import svi_kernels as sk

BLOCK = 32
WORLD = 2
OPTIMIZERS = S.OPTIMIZERS
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def make_model(seed: int = 0) -> torch.nn.Sequential:
    # Weights 45x6 (270 elements: shards of 23 and 22 rows, 138 / 132 elements, 5 blocks of 32 each, the
    # whole tensor's block 4 would straddle the boundary at 138), 9x45 (405: 5 / 4 rows, 8 / 6 blocks:
    # rank 1 keeps 2 unused scales) and 1x9 (one row: rank 1's shard is empty); biases 45, 9 and 1.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 45), torch.nn.GELU(), torch.nn.Linear(45, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 1))


def make_optimizer(name: str, params_by_layer, backend: str, block: int = BLOCK, state_dtype="int8", mv=False):
    """``params_by_layer``: the parameters of each Linear (a list per layer); ``mv``: SaLSA's
    momentum_direction (its sums decode the moments in Python)."""
    params = [p for ps in params_by_layer for p in ps]
    kw = dict(backend=backend, state_dtype=state_dtype, state_block_size=block)
    if name == "AdamW":
        return sk.AdamW(params, lr=3e-2, **kw)
    if name == "SVI":
        return sk.SVI(params, lr=3e-2, **kw)
    if name == "AdamSLS":
        return sk.AdamSLS(params, init_step_size=5.0, n_batches_per_epoch=4, **kw)
    if name == "SaLSA":
        return sk.SaLSA(params, init_step_size=5.0, momentum_direction=mv, **kw)
    groups = [{"params": list(ps)} for ps in params_by_layer]
    return sk.LayerwiseAdamSLS(groups, warmup_steps=1, init_step_size=5.0, n_batches_per_epoch=4, **kw)


def layers(model):
    return [list(model[i].parameters()) for i in J.LINEARS]


def chunk_rows(n_rows: int, world: int = WORLD) -> list:
    """FSDP2's split of ``n_rows`` rows over ``world`` ranks (torch.chunk's, empty chunks at the end)."""
    c = -(-n_rows // world)
    return [(min(r * c, n_rows), min((r + 1) * c, n_rows)) for r in range(world)]


class ChunkModel(torch.nn.Module):
    """One process, the model's parameters held as their FSDP2 shards (each a parameter of its own, empty
    ones as constants): the forward concatenates them. An optimizer over ``chunks`` sees the tensors each
    rank's kernels see, so its int8 blocks are the per-shard blocks."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.parts = []  # per parameter: [(rank, tensor)], non-empty chunks are Parameters
        self.chunks = torch.nn.ParameterList()
        self.index = {}  # (parameter index, rank) -> position in self.chunks
        for i, (_n, p) in enumerate(model.named_parameters()):
            parts = []
            for r, (a, b) in enumerate(chunk_rows(p.shape[0])):
                t = p.detach()[a:b].clone()
                if b > a:
                    t = torch.nn.Parameter(t)
                    self.index[(i, r)] = len(self.chunks)
                    self.chunks.append(t)
                parts.append(t)
            self.parts.append(parts)

    def by_layer(self):
        out, i = [], 0
        for layer in layers(self.model):
            out.append([t for k in range(i, i + len(layer)) for t in self.parts[k]
                        if isinstance(t, torch.nn.Parameter)])
            i += len(layer)
        return out

    def full(self, i: int) -> torch.Tensor:
        return torch.cat([t.detach() for t in self.parts[i]])

    def forward(self, x):
        weights = {n: torch.cat(list(parts)) for n, parts in zip(self.names, self.parts)}
        return torch.func.functional_call(self.model, weights, (x,))


def _moments(opt, p) -> dict:
    """p's int8 codes and scales (local parts for DTensors) by key."""
    st = opt.state.get(p, {})
    out = {}
    for k in MOMENT_KEYS:
        if k in st:
            v, s = st[k], st[k + "_scale"]
            out[k] = (v.to_local() if hasattr(v, "to_local") else v).clone()
            out[k + "_scale"] = (s.to_local() if hasattr(s, "to_local") else s).reshape(-1).clone()
    return out


def chunk_run(name: str, backend: str, mv: bool = False) -> dict:
    """One process over the shards as tensors (ChunkModel), on the full batch (what each rank sees in
    ``sharded_run(..., same_batch=True)``)."""
    cm = ChunkModel(make_model())
    opt = make_optimizer(name, cm.by_layer(), backend, mv=mv)
    if name in J.LINE_SEARCH:
        opt.process_group = False
    J.train(cm, opt, name, range(J.N_STEPS))
    n = len(cm.names)
    return {"params": [cm.full(i) for i in range(n)],
            "state": {key: _moments(opt, cm.chunks[pos]) for key, pos in cm.index.items()},
            "ls": copy.deepcopy(opt.ls_state) if name in J.LINE_SEARCH else None}


def whole_run(name: str, backend: str) -> dict:
    """One process, whole tensors (int8 blocks over each whole tensor), full batch."""
    model = make_model()
    opt = make_optimizer(name, layers(model), backend)
    if name in J.LINE_SEARCH:
        opt.process_group = False
    J.train(model, opt, name, range(J.N_STEPS))
    return {"params": [J.full(p) for p in model.parameters()],
            "ls": copy.deepcopy(opt.ls_state) if name in J.LINE_SEARCH else None}


def _scale_bytes(opt) -> tuple:
    """(bytes of the scales this rank holds, bytes the kernels use) over every int8 moment."""
    held = used = 0
    for p, st in opt.state.items():
        if not isinstance(st, dict):
            continue
        for k in MOMENT_KEYS:
            if k in st:
                held += st[k + "_scale"].to_local().numel() * 4
                used += -(-st[k].to_local().numel() // BLOCK) * 4
    return held, used


def sharded_run(rank: int, world: int, name: str, backend: str, same_batch: bool, mv: bool = False) -> dict:
    """FSDP2 (the last layer kept by the root, as in fsdp_jobs); ``same_batch``: every rank on the full
    batch (gradients and losses then equal ChunkModel's bit for bit: (g + g) / 2 == g), else each rank its
    slice of it."""
    model = make_model()
    J._shard(model, skip=(4,))
    opt = make_optimizer(name, layers(model), backend, mv=mv)
    if same_batch:
        J.train(model, opt, name, range(J.N_STEPS))
    else:
        J.train(model, opt, name, range(J.N_STEPS), rank, world)
    params = list(model.parameters())
    placements = []
    for p in params:
        st = opt.state[p]
        for k in MOMENT_KEYS:
            if k in st:
                placements.append((str(p.placements), str(st[k].placements), str(st[k + "_scale"].placements),
                                   tuple(st[k + "_scale"].shape), str(st[k].dtype)))
    held, used = _scale_bytes(opt)
    return {"params": [J.full(p) for p in params],
            "state": {i: _moments(opt, p) for i, p in enumerate(params)},
            "local_shapes": [tuple(p.to_local().shape) for p in params],
            "placements": placements, "scale_bytes": (held, used),
            "param_bytes": sum(p.to_local().numel() * p.element_size() for p in params),
            "ls": copy.deepcopy(opt.ls_state) if name in J.LINE_SEARCH else None}


def hsdp_run(rank: int, world: int, name: str, backend: str) -> dict:
    """HSDP on a (world x 1) mesh: parameters (Replicate(), Shard(0)) with one shard, each rank on the full
    batch: the blocks are whole tensors', so the run is one process's (whole_run) bit for bit, and the
    scales are (Replicate(), Shard(0)) of shape (1, Kmax)."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    J._shard(model, mesh)
    opt = make_optimizer(name, layers(model), backend)
    J.train(model, opt, name, range(J.N_STEPS))
    scales = [(str(st[k + "_scale"].placements), tuple(st[k + "_scale"].shape))
              for st in (opt.state[p] for p in model.parameters()) for k in MOMENT_KEYS if k in st]
    return {"params": [J.full(p) for p in model.parameters()], "scales": scales,
            "ls": copy.deepcopy(opt.ls_state) if name in J.LINE_SEARCH else None}


def dcp_resume(rank: int, world: int, name: str, backend: str, ckpt_dir: str) -> dict:
    """Save with DCP after 2 steps and go on; a fresh model and optimizer loaded in place go on: the same
    bits (parameters, codes, scales, line-search state). Each rank trains on its slice of the batch."""
    import torch.distributed.checkpoint as dcp
    path = os.path.join(ckpt_dir, f"int8-{name}-{backend}")
    model = make_model()
    J._shard(model)
    opt = make_optimizer(name, layers(model), backend)
    J.train(model, opt, name, range(2), rank, world)
    dcp.save(J._dcp_state(model, opt), checkpoint_id=path)
    saved_state = J._local_state(opt)
    J.train(model, opt, name, range(2, J.N_STEPS), rank, world)

    model2 = make_model(seed=1)
    J._shard(model2)
    opt2 = make_optimizer(name, layers(model2), backend)
    J.dcp_load_into(model2, opt2, path)
    loaded_state = J._local_state(opt2)
    same_loaded = _same(saved_state, loaded_state)
    ls_loaded = copy.deepcopy(opt2.ls_state) if name in J.LINE_SEARCH else None
    J.train(model2, opt2, name, range(2, J.N_STEPS), rank, world)
    same_params = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), model2.parameters()))
    return {"same_loaded": same_loaded, "same_params": same_params,
            "same_state": _same(J._local_state(opt), J._local_state(opt2)),
            "keys_loaded": sorted({k for st in loaded_state for k in st}),
            "dtypes_loaded": sorted({str(v.dtype) for st in loaded_state for k, v in st.items() if k != "step"}),
            "ls_loaded_step": (ls_loaded or {}).get("step"),
            "ls": (copy.deepcopy(opt.ls_state), copy.deepcopy(opt2.ls_state)) if name in J.LINE_SEARCH else None}


def _same(s1, s2) -> bool:
    return len(s1) == len(s2) and all(
        a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(s1, s2))


def _fresh(name, backend, block, mesh=None):
    model = make_model(seed=1)
    J._shard(model, mesh)
    return model, make_optimizer(name, layers(model), backend, block=block)


def dcp_refused(rank: int, world: int, name: str, backend: str, ckpt_dir: str, how: str) -> dict:
    """The checkpoint of ``dcp_resume`` loaded where its int8 blocks do not fit: ``how`` = "block" (an
    optimizer with state_block_size 64) or "mesh" (HSDP on a 2 x 1 mesh: replicated, whole tensors as
    shards, so the blocks are those of whole tensors). The load raises before anything is written: the
    fresh model and optimizer are as they were."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.device_mesh import init_device_mesh
    path = os.path.join(ckpt_dir, f"int8-{name}-{backend}")
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")) if how == "mesh" else None
    model, opt = _fresh(name, backend, 64 if how == "block" else BLOCK, mesh)
    J.train(model, opt, name, range(1), rank, world)
    before_params = [p.to_local().clone() for p in model.parameters()]
    before_state = J._local_state(opt)
    error = None
    try:
        J.dcp_load_into(model, opt, path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (CheckpointException is a BaseException)
        error = f"{type(e).__name__}: {e}"
    unchanged = (all(torch.equal(a, b.to_local()) for a, b in zip(before_params, model.parameters()))
                 and _same(before_state, J._local_state(opt)))
    return {"refused": None if error is None else error[-2000:], "unchanged": unchanged}


def load_state_dict_refused(rank: int, world: int, name: str, backend: str) -> dict:
    """``optimizer.load_state_dict`` with int8 state whose scales do not fit (a block size the codes
    were not made with, or plain whole-tensor state): a ValueError, nothing changed."""
    model = make_model()
    J._shard(model)
    opt = make_optimizer(name, layers(model), backend)
    J.train(model, opt, name, range(1), rank, world)
    out = {}
    for case in ("block", "plain"):
        sd = opt.state_dict()
        if case == "block":
            sd["param_groups"] = [dict(g, state_block_size=64) for g in sd["param_groups"]]
        else:
            sd["state"] = {i: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in st.items()}
                           if isinstance(st, dict) else st for i, st in sd["state"].items()}
        before = J._local_state(opt)
        try:
            opt.load_state_dict(sd)
            out[case] = None
        except ValueError as e:
            out[case] = str(e)
        out[case + "_unchanged"] = _same(before, J._local_state(opt))
    # A checkpoint of block 32 into an optimizer of block 64 (same mesh): decoded with 32, encoded with 64,
    # shard by shard (the codec on each local shard).
    from svi_kernels.backends import state_storage as codec
    opt64 = make_optimizer(name, layers(model), backend, block=64)
    opt64.load_state_dict(opt.state_dict())
    ok = []
    for p in model.parameters():
        a, b = opt.state[p], opt64.state[p]
        for k in ("exp_avg", "exp_avg_sq"):
            lc = a[k].to_local()
            values = codec.decode_int8(lc, a[k + "_scale"].to_local().reshape(-1)[:-(-lc.numel() // BLOCK)], BLOCK)
            codes, scales = codec.encode_int8(values, k == "exp_avg", 64)
            got = b[k + "_scale"].to_local().reshape(-1)
            kmax = -(-(-(-p.shape[0] // WORLD) * (p.numel() // p.shape[0])) // 64)
            ok.append(b[k].placements == p.placements and tuple(b[k + "_scale"].shape) == (WORLD, kmax)
                      and torch.equal(b[k].to_local(), codes)
                      and torch.equal(got[:scales.numel()], scales) and not got[scales.numel():].any())
    out["reblocked"] = ok
    return out


def convert(rank: int, world: int, name: str, backend: str) -> dict:
    """The setting changed after some steps: bf16 state -> int8 (encoded shard by shard) -> float32
    (decoded): each conversion keeps the placement, and the values are those of the shard's codec."""
    from svi_kernels.backends import state_storage as codec
    model = make_model()
    J._shard(model)
    opt = make_optimizer(name, layers(model), backend, state_dtype=torch.bfloat16)
    J.train(model, opt, name, range(1), rank, world)
    bf16 = J._local_state(opt)
    for g in opt.param_groups:
        g["state_dtype"], g["state_block_size"] = "int8", BLOCK
    J.train(model, opt, name, range(1, 2), rank, world)
    int8_ok = all(k in st for st in opt.state.values() if isinstance(st, dict) and "exp_avg" in st
                  for k in ("exp_avg_scale", "exp_avg_sq_scale"))
    # one more step converted back to float32: the values must be the decoded codes of the step before
    # it, so compare the decode of the int8 state with the float32 state right after the conversion
    decoded = []
    for p in model.parameters():
        st = opt.state[p]
        for k in MOMENT_KEYS:
            if k in st:
                lc, ls = st[k].to_local(), st[k + "_scale"].to_local().reshape(-1)
                decoded.append(codec.decode_int8(lc, ls[:-(-lc.numel() // BLOCK)], BLOCK))
    for g in opt.param_groups:
        g["state_dtype"] = torch.float32
    from svi_kernels.optim import state_storage
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state[p]
            state_storage.conform(st, p.dtype, torch.float32, BLOCK)
    back = [opt.state[p][k] for p in model.parameters() for k in MOMENT_KEYS if k in opt.state[p]]
    return {"bf16_dtypes": sorted({str(v.dtype) for st in bf16 for k, v in st.items() if k != "step"}),
            "int8_ok": int8_ok,
            "back_placements_ok": all(b.placements == p.placements for b, p in
                                      zip(back, [p for p in model.parameters() for k in MOMENT_KEYS
                                                 if k in opt.state[p]])),
            "back_equal_decoded": len(back) == len(decoded) and all(
                b.dtype == torch.float32 and torch.equal(b.to_local(), d) for b, d in zip(back, decoded))}


def _jobs(rank, world, ckpt_dir, backends):
    jobs = []
    for backend in backends:
        for name in OPTIMIZERS:
            jobs.append((("same", name, backend), lambda n=name, b=backend: sharded_run(rank, world, n, b, True)))
            jobs.append((("sliced", name, backend), lambda n=name, b=backend: sharded_run(rank, world, n, b, False)))
            jobs.append((("dcp", name, backend), lambda n=name, b=backend: dcp_resume(rank, world, n, b, ckpt_dir)))
            jobs.append((("chunk", name, backend), lambda n=name, b=backend: chunk_run(n, b)))
            jobs.append((("whole", name, backend), lambda n=name, b=backend: whole_run(n, b)))
        jobs.append((("same-mv", "SaLSA", backend), lambda b=backend: sharded_run(rank, world, "SaLSA", b, True, True)))
        jobs.append((("chunk-mv", "SaLSA", backend), lambda b=backend: chunk_run("SaLSA", b, True)))
        for name in ("AdamW", "AdamSLS"):
            for how in ("block", "mesh"):
                jobs.append((("refused", how, name, backend),
                             lambda n=name, b=backend, h=how: dcp_refused(rank, world, n, b, ckpt_dir, h)))
            jobs.append((("hsdp", name, backend), lambda n=name, b=backend: hsdp_run(rank, world, n, b)))
            jobs.append((("lsd", name, backend), lambda n=name, b=backend: load_state_dict_refused(rank, world, n, b)))
            jobs.append((("convert", name, backend), lambda n=name, b=backend: convert(rank, world, n, b)))
            jobs.append((("across", name, backend),
                         lambda n=name, b=backend: dcp_across_dtypes(rank, world, n, b, ckpt_dir)))
    return jobs


def _worker(rank: int, world: int, out_path: str, ckpt_dir: str, backends) -> None:
    rank_jobs.run_jobs(rank, world, lambda: _jobs(rank, world, ckpt_dir, backends), out_path)


def spawn_jobs(world: int, tmp_dir: str, backends, limit_s: float = 400) -> dict:
    out = os.path.join(tmp_dir, "int8_fsdp.pt")
    return rank_jobs.spawn(_worker, (world, out, tmp_dir, list(backends)), world, out, limit_s)


def dcp_across_dtypes(rank: int, world: int, name: str, backend: str, ckpt_dir: str) -> dict:
    """DCP loads in place into the fresh optimizer's state_dict, so the template's dtypes decide: (a) the int8
    checkpoint of ``dcp_resume`` into an optimizer with float32 state; (b) a float32-state checkpoint into
    an int8 optimizer. Each is refused (what was raised) or loaded (the state's dtypes after)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    out = {}
    f32_path = os.path.join(ckpt_dir, f"f32-{name}-{backend}")
    model = make_model()
    J._shard(model)
    opt = make_optimizer(name, layers(model), backend, state_dtype=None)
    J.train(model, opt, name, range(2), rank, world)
    dcp.save(J._dcp_state(model, opt), checkpoint_id=f32_path)
    for case, path, sd_type in (("int8_into_f32", os.path.join(ckpt_dir, f"int8-{name}-{backend}"), None),
                                ("f32_into_int8", f32_path, "int8")):
        model2 = make_model(seed=1)
        J._shard(model2)
        opt2 = make_optimizer(name, layers(model2), backend, state_dtype=sd_type)
        try:
            J.dcp_load_into(model2, opt2, path)
            out[case] = ("loaded", sorted({str(v.dtype) for st in J._local_state(opt2) for k, v in st.items()
                                           if k != "step"}))
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            out[case] = ("refused", f"{type(e).__name__}: {e}"[-1500:])
    return out
