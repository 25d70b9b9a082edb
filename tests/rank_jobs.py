"""Tests on several gloo processes (CPU): the ranks start once and run every job of a list, so process
start-up is paid once; rank 0 saves what every rank saw, ``{key: [record of rank 0, rank 1, ...]}``."""
from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_jobs(rank: int, world: int, make_jobs, out_path: str, timeout_s: float = 90) -> None:
    """In each rank: join the group, run ``make_jobs()`` ([(key, job)]), gather every record (an exception
    becomes {"error": traceback}) and have rank 0 save them to ``out_path``.

    The ranks meet through a file next to ``out_path`` (no TCP port to race for). After a clean run each
    rank leaves with ``os._exit(0)`` once rank 0 has saved: the interpreter's teardown (C++ static
    destructors of the communication libraries) is skipped, where a rank once aborted ("terminate called
    without an active exception") after all its work was done."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_path}.store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        results = {}
        for key, job in make_jobs():
            try:
                rec = job()
            except Exception:
                rec = {"error": traceback.format_exc()}
            gathered = [None] * world
            dist.all_gather_object(gathered, rec)
            results[key] = gathered
        if rank == 0:
            torch.save(results, out_path + ".part")
            os.replace(out_path + ".part", out_path)  # complete or absent
        dist.barrier()  # nobody leaves before rank 0 has saved
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_step(opt, loss_fn, losses: list, line_search: bool, after_backward=None) -> None:
    """One step on ``loss_fn()`` (each evaluated loss appended to ``losses``): ``opt.step(closure)`` for a
    line search, else backward (then ``after_backward()``) and ``opt.step()``."""
    def closure():
        loss = loss_fn()
        losses.append(float(loss.detach()))
        return loss

    opt.zero_grad()
    if line_search:
        opt.step(closure)
    else:
        closure().backward()
        if after_backward is not None:
            after_backward()
        opt.step()


def spawn(worker, args: tuple, world: int, out_path: str, limit_s: float) -> dict:
    """``worker(rank, *args)`` on ``world`` processes (one thread each); returns what rank 0 saved.

    A rank that dies after rank 0 saved every rank's records (the file appears only when complete and
    the ranks leave only after it exists) did its work: the results are used and the exit is reported
    as a warning. A rank dying earlier fails the caller."""
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # several processes on a small machine
    try:
        ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + limit_s
        while True:
            try:
                if ctx.join(timeout=5):
                    break
            except mp.ProcessExitedException as exc:
                if not os.path.exists(out_path):
                    raise
                warnings.warn(f"a rank exited abnormally after the results were saved: {exc}")
                break
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                raise TimeoutError(f"the {world} ranks did not finish within {limit_s} s (a collective out of step?)")
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    return torch.load(out_path, weights_only=False)


def ranks(results: dict, key) -> list:
    """The records of every rank for ``key``, failing the test with the traceback of a rank that raised."""
    recs = results[key]
    for r, rec in enumerate(recs):
        assert "error" not in rec, f"rank {r} failed:\n{rec['error']}"
    return recs
