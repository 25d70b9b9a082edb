"""``svi-bench``: time the fused optimizer kernels against torch AdamW and reference-style line search.

Every row is timed in the same run as torch fused AdamW (its ratio) and as this machine's streaming
bandwidth (its fraction of stream), so the numbers stay comparable on a noisy, shared machine.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import sys
import time
from typing import List, Optional

import torch

from . import memory, peers, report, rows as rows_mod, state_bytes, stream, targets, timing, traffic, workloads
from .unavailable import RowUnavailable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUT_DIR = "bench_out"


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="svi-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default=",".join(workloads.DEFAULT_WORKLOADS),
                    help=f"comma-separated, from {sorted(workloads.WORKLOADS)}, or 'all' "
                         f"(default: %(default)s; bert-base is opt-in)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--backend", default=None,
                    help="comma-separated backends for our rows (default: every available compiled "
                         "backend for the device, else 'reference'); 'all' adds 'reference'")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="leave out the peers' rows (bitsandbytes, torchao: benchmarks/peers.py; by default they "
                         "run where installed, torchao compiling its update on its first step)")
    # 15: the 95% interval of a median is then the 4th..12th window, not min..max (timing.median_interval);
    # with 7 about half the checks sat within noise in an idle run, with 15 a fifth, for 150 s instead of 120 s
    ap.add_argument("--repeats", type=int, default=15, help="timed windows per row (median taken) (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row before timing")
    ap.add_argument("--row-budget", type=float, default=2.0,
                    help="seconds one row may spend; slow rows get fewer repeats (at least 3) (default: %(default)s)")
    ap.add_argument("--stream-numel", type=int, default=stream.DEFAULT_STREAM_NUMEL,
                    help="float32 elements of the bandwidth probe (default: %(default)s)")
    ap.add_argument("--json", default=os.path.join(OUT_DIR, "bench.json"), help="JSON rows (default: %(default)s)")
    ap.add_argument("--plot", default=os.path.join(OUT_DIR, "bench.png"), help="PNG chart (default: %(default)s)")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown to this file (for docs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's choice, one per core)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("--peak-memory", action="store_true",
                    help="also measure each optimizer row's peak memory, one fresh process per row, on "
                         "--peak-workload (benchmarks/memory.py; 1-2 minutes more on 2 cores)")
    ap.add_argument("--memory-only", action="store_true", help="the peak-memory run alone, no timing")
    ap.add_argument("--peak-workload", default=memory.DEFAULT_WORKLOAD,
                    help="workload of the peak-memory run; its rows get the figures (default: %(default)s)")
    ap.add_argument("--memory-json", default=os.path.join(OUT_DIR, "memory.json"),
                    help="the peak-memory run's rows (default: %(default)s)")
    return ap.parse_args(argv)


def _pick_backends(spec: Optional[str], device: torch.device) -> List[str]:
    registry = importlib.import_module("svi_kernels.backends")

    status = registry.backends()
    usable = []
    for name in registry.BACKENDS:
        if not status[name]["available"]:
            continue
        try:
            registry.resolve(name, device)
        except RuntimeError:
            continue
        usable.append(name)
    if spec is None:
        fused = [b for b in usable if b != "reference"]
        return fused or ["reference"]
    if spec == "all":
        return usable
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    for name in chosen:
        if name not in usable:
            raise SystemExit(f"svi-bench: backend {name!r} is not usable on {device}: "
                             f"{status.get(name, {}).get('reason', 'unknown backend')}")
    return chosen


BASELINE = "torch_adamw_fused"


def _measure(row, ctx, args, device, paired, param_itemsize):
    """One row, timed with a window of each ``paired`` call after each of its windows.

    Returns (timing, launches, syncs, state itemsize, step fn, closure ms per step, state B/param).
    A bookkeeping row's ms leaves out the time its steps spent inside the closure (forward and
    backward), measured inside those steps (rows.TrivialClosure). The state is counted from the
    optimizer's live tensors after the timed steps (benchmarks/state_bytes.py); None for a bare op.
    """
    fn, opt = row.build(ctx)
    own = [0, 0.0]  # the row's calls, and the closure's seconds inside them (paired calls may run it too)

    def counted():
        before = ctx.closure.seconds
        fn()
        own[0] += 1
        own[1] += ctx.closure.seconds - before

    excluded = lambda: ctx.closure.seconds  # noqa: E731  (grows only while a closure runs)
    timed = timing.median_ms(counted if row.bookkeeping else fn, device, args.warmup, args.repeats,
                             args.row_budget, paired, excluded)
    closure_ms = 1e3 * own[1] / own[0] if row.bookkeeping and own[0] else None
    launches, syncs = timing.launches_and_syncs(fn, device)
    state = None if opt is None else state_bytes.state_bytes_per_param(opt, ctx.params)
    return timed, launches, syncs, row.traffic_state_itemsize(opt, param_itemsize), fn, closure_ms, state


def _select_rows(all_rows: List[rows_mod.Row], spec: Optional[str]) -> List[rows_mod.Row]:
    """The rows named in ``spec`` (all when None), torch fused AdamW always: every ratio needs it."""
    if not spec:
        return all_rows
    wanted = {s.strip() for s in spec.split(",")} | {BASELINE}
    return [r for r in all_rows if r.name in wanted]


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args)
    dtype = DTYPES[args.dtype]
    names = list(workloads.WORKLOADS) if args.workload == "all" else [w.strip() for w in args.workload.split(",")]
    if args.workload == "all":
        names.remove("tiny")
    wls = [workloads.get(n) for n in names]
    backends = _pick_backends(args.backend, device)
    all_rows = _select_rows(rows_mod.build_rows(backends, peers=args.peers), args.rows)

    bar = _progress_bar(1 + len(wls) * len(all_rows), disable=args.no_progress)
    bar.set_description("stream bandwidth")
    probe = stream.StreamProbe(args.stream_numel, device)
    bw = probe.measure()
    bar.update(1)

    results, skipped = [], []
    for i, wl in enumerate(wls):
        # The probe's single-call time before the workload sizes its paired windows and is printed; each
        # row's fraction of stream uses the probe windows run between that row's own windows.
        wl_bw = bw if i == 0 else probe.measure()
        bw.setdefault("by_workload", {})[wl.name] = wl_bw["gbps"]
        params, grads = workloads.make_tensors(wl, dtype, device)
        ctx = rows_mod.Context(params, grads, device, dtype, rows_mod.TrivialClosure(device, params))
        itemsize = params[0].element_size() if params else torch.empty((), dtype=dtype).element_size()
        measured = {}
        baseline = None  # (step fn, ms): timed first, then interleaved with every other row
        # our rows another row is held to (targets.OURS_RATIO_LIMITS): (step fn, ms), interleaved with that row
        kept = {}
        for row in sorted(all_rows, key=lambda r: r.name != BASELINE):
            if not row.runs_on(wl.name):
                bar.update(1)
                continue
            bar.set_description(f"{wl.name}: {row.name} [{row.backend}]")
            paired = [(probe, wl_bw["ms"])] + ([baseline] if baseline else [])
            held_to = targets.OURS_RATIO_LIMITS.get(row.name)
            ours = kept.get((held_to[0], row.backend)) if held_to else None
            if ours:
                paired.append(ours)
            try:
                timed, launches, syncs, state_size, fn, closure_ms, state_bpp = _measure(
                    row, ctx, args, device, paired, itemsize)
            except Exception as exc:  # a peer not installed, an optimizer not written yet, an unsupported dtype...
                why = str(exc) if isinstance(exc, RowUnavailable) else f"{type(exc).__name__}: {exc}"
                skipped.append(f"{wl.name}: {row.name} [{row.backend}]: {why}")
                bar.update(1)
                continue
            ms = timed.ms
            # ratios window by window (timing.Timing): to the probe, to torch fused AdamW, to our row held to
            probe_ratio, (probe_lo, probe_hi) = timed.paired_ratio[0], timed.paired_ratio_interval[0]
            pair_ms, ratio, ratio_interval = ((timed.paired_ms[1], timed.paired_ratio[1], timed.paired_ratio_interval[1])
                                              if baseline else (ms, 1.0, (1.0, 1.0)))
            if row.name == BASELINE:
                baseline = (fn, ms)
            if row.name in targets.HELD_TO:
                # as in a training loop, the closure's forward+backward runs before each of its steps
                # (left out of the time, as from the row held to it): both steps start alike
                kept[(row.name, row.backend)] = (lambda fn=fn: (ctx.closure(backwards=True), fn()), ms)
            del fn
            gc.collect()
            bpp = traffic.bytes_per_param(row.phases(ctx), itemsize, state_size)
            nbytes = bpp * wl.numel
            gbps = nbytes / (max(ms, 1e-6) * 1e-3) / 1e9
            stream_gbps = probe.gbps(timed.paired_ms[0])
            measured[id(row)] = {
                "name": row.name, "backend": row.backend, "kind": row.kind, "workload": wl.name,
                "dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(),
                "n_tensors": len(wl.shapes), "numel": wl.numel,
                "ms": ms, "ratio_to_torch_fused_adamw": ratio,
                "torch_fused_adamw_ms_paired": pair_ms,
                "bytes_per_param": bpp, "gbps": gbps,
                # memory (not traffic): the optimizer's live tensors; the peak comes from --peak-memory
                "state_bytes_per_param": state_bpp, "peak_bytes_per_param": None,
                "fraction_of_stream": probe.fraction(nbytes, probe_ratio), "stream_gbps": stream_gbps,
                # 95% intervals of the medians over windows (timing.median_interval): what targets call noise
                "ms_interval": timed.ms_interval, "ratio_interval": ratio_interval,
                "fraction_of_stream_interval": (probe.fraction(nbytes, probe_hi), probe.fraction(nbytes, probe_lo)),
                "launches_per_step": launches, "syncs_per_step": syncs,
                "closure_ms_subtracted": closure_ms,
                "ours_ms_paired": timed.paired_ms[-1] if ours else None,
                "ours_ratio_paired": timed.paired_ratio[-1] if ours else None,
                "ours_ratio_interval": timed.paired_ratio_interval[-1] if ours else None,
                "compare_to": row.compare_to,
                "package_version": peers.installed_version(row.package) if row.package else None,
            }
            bar.update(1)
        wl_results = [measured[id(r)] for r in all_rows if id(r) in measured]
        del baseline, kept
        results += wl_results
        del params, grads, ctx
        gc.collect()
    bar.close()
    del probe
    targets.evaluate(results)
    peaks = _peak_memory(args, all_rows, backends, device, dtype, results, bar) if args.peak_memory else None
    return results, skipped, bw, backends, peaks


def _peak_memory(args, all_rows, backends, device, dtype, results, bar) -> List[dict]:
    """memory.measure_peaks on --peak-workload, after the timing; its rows in ``results`` get the figures.
    A failure is reported as a skipped figure: the timings are already measured."""
    bar.set_description("peak memory")
    try:
        peaks = memory.measure_peaks(all_rows, backends, workloads.get(args.peak_workload), dtype, device,
                                     threads=args.threads, progress=bar.set_description)
    except Exception as exc:
        return [{"name": "all rows", "backend": "-", "error": f"{type(exc).__name__}: {exc}"}]
    memory.attach(results, peaks)
    return peaks


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # not on every platform
        return "n/a"


def _busy_warning() -> str:
    """torch's fused CPU AdamW opens one OpenMP region per tensor; with more runnable processes than
    cores each region can wait a scheduler slice for its second thread, inflating the baseline."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if load < cores or torch.get_num_threads() == 1:
        return ""
    return (f"warning: load average {load:.1f} on {cores} cores: other processes compete for the cores, so "
            f"multi-threaded timings (torch's per-tensor OpenMP regions most of all) are inflated and ratios "
            f"are unreliable; `--threads 1` gives steadier ratios on a busy machine")


def _memory_only(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args)
    backends = _pick_backends(args.backend, device)
    rows = _select_rows(rows_mod.build_rows(backends, peers=args.peers), args.rows)
    peaks = memory.measure_peaks(rows, backends, workloads.get(args.peak_workload), DTYPES[args.dtype], device,
                                 threads=args.threads,
                                 progress=None if args.no_progress else lambda s: print(s, file=sys.stderr))
    memory.report(peaks)
    _write_memory_json(args, peaks)
    return 0


def _write_memory_json(args: argparse.Namespace, peaks: List[dict]) -> None:
    if args.memory_json:
        report.write_json(args.memory_json, peaks)
        print(f"wrote {args.memory_json}")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    if args.memory_only:
        return _memory_only(args)
    t0 = time.perf_counter()
    load_before = _load_average()
    results, skipped, bw, backends, peaks = run(args)
    wall = time.perf_counter() - t0

    print(f"\nsvi-bench on {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {args.dtype}, backends {','.join(backends)}")
    probes = bw.get("by_workload") or {"": bw["gbps"]}
    per_workload = ", ".join(f"{name} {gbps:.1f}".strip() for name, gbps in probes.items())
    print(f"streaming bandwidth (a.add_(b, alpha=s), {bw['numel']:,} fp32, 12 B/elem), measured before each "
          f"workload's rows: {per_workload} GB/s; each row's fraction of stream uses the probe run between its "
          f"own windows (column stream GB/s)")
    if any(r["kind"] == "peer" for r in results) or any(f"[{p}]" in line for p in peers.PINNED for line in skipped):
        print(peers.describe())  # the peers' versions, where a peer row was run or skipped
    busy = _busy_warning()
    if busy:
        print(busy)
    print(report.format_table(results))
    for line in skipped:
        print(f"skipped {line}")
    met, missed = targets.summary(results)
    print(f"targets: {met} met, {missed} missed; wall time {wall:.0f} s; "
          f"1-min load average {load_before} before, {_load_average()} after (other processes skew timings)")
    noisy_met, noisy_missed = targets.within_noise(results)
    if noisy_met or noisy_missed:
        print(f"within this run's noise: {noisy_met} met and {noisy_missed} missed check(s) have their limit inside "
              f"the 95% interval of the median over the row's windows (up to --repeats {args.repeats}, fewer for "
              f"slow rows; marked '(within noise)'): this run cannot tell which side they are on; more windows "
              f"(--repeats 31 --row-budget 8) narrow the intervals")
    if peaks is not None:
        print()
        memory.report(peaks)
        _write_memory_json(args, peaks)
    if args.json:
        report.write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as fh:
            fh.write(report.format_markdown(results) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        _write_plot(args, results)
    return 0


class _NoBar:
    def set_description(self, *args, **kwargs): pass
    def update(self, *args, **kwargs): pass
    def close(self): pass


def _progress_bar(total: int, disable: bool):
    """tqdm's bar when tqdm is installed (the `bench` extra); the run works without it."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, disable=disable, unit="row", dynamic_ncols=True)


def _write_plot(args: argparse.Namespace, results: List[dict]) -> None:
    """The chart is optional (matplotlib is the `bench` extra): without it, say so instead of failing
    after the measurements, whose table and JSON are already written."""
    device = results[0]["device"] if results else ""
    try:
        report.write_plot(args.plot, results, title=f"svi-bench, {args.dtype}, {device}")
    except ImportError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        print(f"plot skipped: matplotlib is not installed ({exc}); `pip install .[bench]` (or "
              f"`pip install matplotlib`) adds it, and the chart is then written to {args.plot}")
        return
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
