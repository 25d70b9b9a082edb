"""Peak memory of optimizer steps: each svi-bench row in a fresh process, its high-water mark over the
parameters and gradients, per parameter.

A step's peak is what its state and its transient buffers add to the model: on CPU the process's
resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once the parameters, the
gradients and a warm-up exist), on a GPU ``torch.cuda.max_memory_allocated`` (reset the same way),
minus the memory in use at that reset. Each row runs in its own process, forked from a server that has
imported torch and svi_kernels and run nothing (benchmarks/fork_server.py), so no row inherits another's
freed-but-kept heap (which would hide its allocations) and none pays torch's import. The warm-up runs
the same row on a tiny workload first, so the code pages and thread stacks a step touches are in the
baseline, not in the peak.

``svi-bench --peak-memory`` runs it after the timing and adds the figures to the rows of the workload it
measures on (``minilm`` by default); ``svi-bench --memory-only`` runs it alone.
"""
from __future__ import annotations

import gc
import inspect
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import fork_server, rows as rows_mod, state_bytes, workloads

DEFAULT_WORKLOAD = "minilm"  # 22.7 M parameters in 103 tensors: a model's geometry, 2^24-2^25 elements
STEPS = 3                    # steps measured per row, after any warm-up steps of the optimizer
CHILD_TIMEOUT_S = 600.0
PEAK_BASELINE = "torch_adamw_fused"


# ---------------------------------------------------------------------------------- process memory
def _status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Linux: writing 5 to clear_refs sets the resident high-water mark to the current resident size."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _CpuMeter:
    """The resident high-water mark since construction, less the resident size then (Linux's /proc)."""

    def __init__(self):
        self.start = _status_bytes("VmRSS")
        if self.start is None:
            raise RuntimeError("peak memory on CPU reads /proc/self/status (VmRSS, VmHWM): Linux only")
        # Where the mark cannot be reset, it may still hold an earlier peak: the figure is then an upper bound
        self.method = "VmHWM" if _reset_high_water_mark() else "VmHWM (not reset: an upper bound)"

    def peak(self) -> int:
        return _status_bytes("VmHWM") - self.start


class _CudaMeter:
    method = "torch.cuda.max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.start = torch.cuda.memory_allocated(device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.start


# ----------------------------------------------------------------------------- one row, one process
def _find_row(name: str, backend: str, backends: Sequence[str]) -> rows_mod.Row:
    for row in rows_mod.build_rows(list(backends)):
        if row.name == name and row.backend == backend:
            return row
    raise ValueError(f"no svi-bench row {name!r} on backend {backend!r}")


def _context(workload: workloads.Workload, dtype: torch.dtype, device: torch.device) -> rows_mod.Context:
    params, grads = workloads.make_tensors(workload, dtype, device)
    # LayerwiseAdamSLS with its default warm-up (the timed rows skip it): the warm-up's buffers count
    return rows_mod.Context(params, grads, device, dtype, rows_mod.TrivialClosure(device, params),
                            layerwise_warmup_steps=_plasls_default_warmup())


def _plasls_default_warmup() -> int:
    import svi_kernels
    return inspect.signature(svi_kernels.LayerwiseAdamSLS).parameters["warmup_steps"].default


def _run_steps(row: rows_mod.Row, ctx: rows_mod.Context, steps: int) -> List[float]:
    """Builds the row's optimizer and runs its warm-up steps and ``steps`` more; its state in B/param
    after each step."""
    fn, opt = row.build(ctx)
    if opt is None:
        raise ValueError(f"row {row.name!r} runs a backend op, not an optimizer: no state to measure")
    states = []
    for _ in range(int(getattr(opt, "warmup_steps", 0) or 0) + steps):
        fn()
        states.append(state_bytes.state_bytes_per_param(opt, ctx.params))
    return states


def measure_row(name: str, backend: str, backends: Sequence[str], workload: workloads.Workload,
                dtype: torch.dtype, device: torch.device, steps: int = STEPS) -> dict:
    """The row's peak memory over its parameters and gradients, in this process (svi-bench runs it in a
    fresh one: ``measure_peaks``)."""
    row = _find_row(name, backend, backends)
    ctx = _context(workload, dtype, device)
    _run_steps(row, _context(workloads.tiny(), dtype, device), steps)  # warm-up: code pages, threads
    gc.collect()
    meter = _CudaMeter(device) if device.type == "cuda" else _CpuMeter()
    t0 = time.perf_counter()
    states = _run_steps(row, ctx, steps)
    peak = meter.peak()
    numel = workload.numel
    return {"name": name, "backend": backend, "workload": workload.name, "numel": numel,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "steps": len(states),
            "threads": torch.get_num_threads(), "peak_method": meter.method, "peak_bytes": peak,
            "peak_bytes_per_param": peak / numel, "state_bytes_per_param": states[-1],
            "state_max_bytes_per_param": max(states), "seconds": time.perf_counter() - t0}


def measure_request(request: dict) -> dict:
    """``measure_row`` from a JSON request (what the fork server hands each fresh process)."""
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    wl = request["workload"]
    workload = workloads.Workload(wl["name"], [tuple(s) for s in wl["shapes"]], wl["description"])
    return measure_row(request["name"], request["backend"], request["backends"], workload,
                       getattr(torch, request["dtype"]), torch.device(request["device"]), request["steps"])


def measure_peaks(rows: Sequence[rows_mod.Row], backends: Sequence[str], workload: workloads.Workload,
                  dtype: torch.dtype, device: torch.device, steps: int = STEPS, threads: Optional[int] = None,
                  progress=None) -> List[dict]:
    """One fresh process per row (rows that run a backend op rather than an optimizer are left out); a row
    that fails gives ``{"name", "backend", "error"}`` instead of figures."""
    results = []
    rows = [r for r in rows if not r.op_only]
    if not rows:
        return results
    # svi_kernels imported once in the server on CPU; for a GPU each child imports it, so that nothing
    # the import might initialise in CUDA is inherited through a fork
    preload = ("svi_kernels",) if device.type == "cpu" else ()
    with fork_server.ForkServer(f"{__name__}:measure_request", preload=preload) as server:
        for row in rows:
            if progress:
                progress(f"peak memory: {row.name} [{row.backend}]")
            request = {"name": row.name, "backend": row.backend, "backends": list(backends),
                       "workload": {"name": workload.name, "shapes": workload.shapes,
                                    "description": workload.description},
                       "dtype": str(dtype).replace("torch.", ""), "device": str(device), "steps": steps,
                       "threads": threads}
            results.append({"name": row.name, "backend": row.backend, **server.call(request, CHILD_TIMEOUT_S)})
    _versus_baseline(results)
    return results


# ------------------------------------------------------------------------------------------ output
def _versus_baseline(results: List[dict]) -> None:
    """``peak_minus_torch_fused_adamw``: each row's peak B/param less torch fused AdamW's, same run."""
    base = next((r for r in results if r["name"] == PEAK_BASELINE and "error" not in r), None)
    for r in results:
        if "error" not in r:
            r["peak_minus_torch_fused_adamw"] = r["peak_bytes_per_param"] - base["peak_bytes_per_param"] \
                if base else None


COLUMNS = [("row", "name", "{}"), ("backend", "backend", "{}"), ("state B/p", "state_bytes_per_param", "{:.2f}"),
           ("state max B/p", "state_max_bytes_per_param", "{:.2f}"), ("peak B/p", "peak_bytes_per_param", "{:.2f}"),
           ("peak - fused AdamW", "peak_minus_torch_fused_adamw", "{:+.2f}"), ("steps", "steps", "{}")]


def format_table(results: List[dict]) -> str:
    def cell(r, key, fmt):
        value = r.get(key)
        return "n/a" if value is None else fmt.format(value)
    ok = [r for r in results if "error" not in r]
    cells = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS] for r in ok]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def describe(results: List[dict]) -> str:
    """The lines printed above the table: what was measured, on what."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return "peak memory: no row measured"
    r = ok[0]
    return (f"optimizer memory on {r['workload']} ({r['numel']:,} {r['dtype']} parameters, {r['device']}), one "
            f"fresh process per row: state B/p = bytes of the tensors the optimizer holds (live, after its last "
            f"step; max over every step, warm-up included), peak B/p = {r['peak_method']} over the steps above "
            f"the parameters + gradients (state included), per parameter")


def report(results: List[dict]) -> None:
    print(describe(results))
    print(format_table(results))
    for r in results:
        if "error" in r:
            print(f"peak memory skipped {r['name']} [{r['backend']}]: {r['error']}")


def attach(rows: List[dict], peaks: List[dict]) -> None:
    """Adds the peak figures to the svi-bench rows of the workload they were measured on."""
    by_key: Dict[tuple, dict] = {(p["workload"], p["name"], p["backend"]): p for p in peaks if "error" not in p}
    for r in rows:
        p = by_key.get((r["workload"], r["name"], r["backend"]))
        r["peak_bytes_per_param"] = p["peak_bytes_per_param"] if p else None
        if p:
            r["peak_minus_torch_fused_adamw"] = p.get("peak_minus_torch_fused_adamw")
            r["peak_method"] = p["peak_method"]
            r["state_max_bytes_per_param"] = p["state_max_bytes_per_param"]

