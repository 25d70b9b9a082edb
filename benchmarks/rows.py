"""What each benchmark row runs, and the traffic (phases) its bytes/param are counted from."""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from . import peers as peers_mod, traffic, workloads
from .reference_sls import ReferenceStyleSLS
from .unavailable import RowUnavailable

LR, WEIGHT_DECAY = 1e-3, 1e-2
# PLASLS's global-search warm-up is skipped: the rows time the steady "cycle" steps (and the
# reference-style steps are too slow to spend 6 warm-up steps on).
LAYERWISE_WARMUP_STEPS = 0
N_LAYER_GROUPS = 10
# search=k with a huge k: the first (warm-up) call searches, every timed step is a skipped one.
SKIP_ALL_BUT_FIRST = 10 ** 12


@dataclass
class Context:
    """One workload's tensors, shared by its rows (each row makes its own optimizer state)."""
    params: List[torch.nn.Parameter]
    grads: List[torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    closure: Optional[TrivialClosure] = None
    # LayerwiseAdamSLS's global-search warm-up (the timed rows skip it; the memory run keeps its default)
    layerwise_warmup_steps: int = LAYERWISE_WARMUP_STEPS

    def layer_groups(self) -> List[List[torch.nn.Parameter]]:
        """Contiguous chunks of the tensor list, like PLASLS's groups of consecutive layers."""
        n = max(1, min(N_LAYER_GROUPS, len(self.params)))
        bounds = [round(i * len(self.params) / n) for i in range(n + 1)]
        return [self.params[bounds[i]:bounds[i + 1]] for i in range(n)]


@dataclass
class Row:
    name: str              # stable id used in the JSON
    backend: str           # "torch", one of ours, or "reference-style"
    kind: str              # "torch" | "ours" | "reference-style"
    phases: Callable[[Context], list]
    build: Callable[[Context], Tuple[Callable[[], Any], Any]]  # -> (one step, optimizer or None)
    bookkeeping: bool = False  # a whole line-search step minus the forwards (closure cost subtracted)
    compare_to: Optional[str] = None  # the reference-style row this one must beat by >= 5x
    targets: list = field(default_factory=list)
    op_only: bool = False  # the backend op alone, no optimizer: no state or peak memory to report
    # bytes per element of the state the row's traffic is counted with, where it is not what the optimizer's
    # state tensors say (state_itemsize): bf16 state 2, 8-bit moments (ours, the peers') 1 + their scales
    state_itemsize: Optional[float] = None
    package: Optional[str] = None  # a peer's distribution (its version goes into the JSON)

    def traffic_state_itemsize(self, opt, param_itemsize: int) -> float:
        """The state element size its bytes/param are counted with: the row's own, else what ``opt`` holds."""
        return self.state_itemsize or state_itemsize(opt, param_itemsize)

    def runs_on(self, workload: str) -> bool:
        """Reference-style rows skip the host-overhead workloads (seconds per step there)."""
        return not (self.kind == "reference-style" and workload in workloads.HOST_WORKLOADS)


class TrivialClosure:
    """A closure whose 'forward' is free and whose first trial is always accepted, timing itself.

    It takes ``backwards`` (the form that calls backward itself), so everything a step spends in
    the closure, backward included, happens inside ``__call__`` and is added to ``seconds``: a
    bookkeeping row subtracts exactly that, measured inside its own steps. (Measured apart, in a
    warm loop, the same forward+backward costs 0.02-0.09 ms; inside a step that has just streamed
    the parameters through the caches it costs 0.2-1 ms, which a warm-loop subtraction leaves in
    the row.)

    With grad enabled (the optimizer's first evaluation) it returns 1 through a one-scalar graph and
    backpropagates it, leaving the parameters' precomputed ``.grad`` untouched; under no_grad (a
    trial) it returns a loss far below any Armijo bound.
    """

    def __init__(self, device: torch.device, params: Sequence[torch.Tensor] = ()):
        leaf = torch.zeros((), device=device, requires_grad=True)
        start = torch.tensor(1.0, device=device)
        trial = torch.tensor(1.0 - 1e12, device=device)
        # The workload's gradients stand for what a real backward writes: their version counters are
        # bumped (no data touched) so the optimizers' "did the closure call backward" check sees it.
        grads = [p.grad for p in params if p.grad is not None]
        self.seconds = 0.0

        # A plain function, as users pass (a callable object would have its signature inspected every
        # step, ~45 us that a lambda does not cost).
        def closure(backwards: bool = False) -> torch.Tensor:
            t0 = time.perf_counter()
            if torch.is_grad_enabled():
                loss = leaf * 0.0 + start
                if backwards:
                    loss.backward()
                    for g in grads:
                        torch.autograd.graph.increment_version(g)
            else:
                loss = trial
            self.seconds += time.perf_counter() - t0
            return loss

        self.fn = closure

    def __call__(self, backwards: bool = False) -> torch.Tensor:
        return self.fn(backwards)


def _sk():
    import svi_kernels
    return svi_kernels


def _phases(*ops):
    return lambda ctx: [(op, 1.0) for op in ops]


def _keeps_w0(ctx: Context) -> bool:
    """Do the line searches keep a copy of the start point for these parameters (the rows leave
    keep_start_point off: fp16/bf16 only, trial_points.KEEP_DTYPES), or move them in place?"""
    from svi_kernels.optim.trial_points import KEEP_DTYPES
    return ctx.dtype in KEEP_DTYPES


def _armijo_sgd_phases(ctx: Context) -> list:
    return traffic.armijo_sgd_phases(_keeps_w0(ctx))


def _adam_sls_phases(ctx: Context) -> list:
    return traffic.adam_sls_phases(1.0, _keeps_w0(ctx))


def _layerwise_phases(ctx: Context) -> list:
    """A "cycle" step over n groups: the check and the save cover every parameter, the trial and
    (in place) the final step from it the searched group, 1/n on average over a cycle."""
    return traffic.adam_sls_phases(1.0 / len(ctx.layer_groups()), _keeps_w0(ctx))


def _trial_phases(op: str):
    """The trial op ``op`` as the line searches run it for ctx's dtype (in place, or from a kept w0)."""
    return lambda ctx: [(traffic.line_search_op(op, _keeps_w0(ctx)), 1.0)]


def _salsa_search_phases(ctx: Context) -> list:
    return traffic.adam_search_phases(_keeps_w0(ctx))


# ---- builders ----
def _torch_adamw(fused: bool):
    def build(ctx):
        opt = torch.optim.AdamW(ctx.params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=not fused, fused=fused)
        return opt.step, opt
    return build


def _ours(make):
    def build(ctx):
        opt = make(_sk(), ctx)
        return opt.step, opt
    return build


def _ours_line_search(make):
    def build(ctx):
        opt = make(_sk(), ctx)
        return (lambda: opt.step(ctx.closure.fn)), opt
    return build


def _trial(kind: str, backend: str):
    """The bare trial op as the line searches call it: in place (w0 = p; each call moves p by eta * d)
    or, where they keep one, from a copy of the start point."""
    def build(ctx):
        mod = importlib.import_module("svi_kernels.backends").get(backend)
        ps = [p.detach() for p in ctx.params]
        w0 = [p.clone() for p in ps] if _keeps_w0(ctx) else ps
        etas = [1e-3] * len(ps)
        if kind == "sgd":
            return (lambda: mod.ls_trial_sgd(ps, w0, ctx.grads, etas)), None
        v = [g * g + 1e-12 for g in ctx.grads]
        return (lambda: mod.ls_trial_adam(ps, w0, ctx.grads, v, etas, eps=1e-8,
                                          bias_correction2_sqrt=0.5)), None
    return build


def _with_state(make, **storage):
    """``make`` with the optimizer keywords ``storage`` (issue 24: ``state_dtype=``...); while our optimizers
    do not take them the row is skipped with that reason (RowUnavailable), not failed."""
    def made(sk, ctx):
        try:
            return make(sk, ctx, **storage)
        except TypeError as exc:
            if "state_dtype" not in str(exc) and "state_block_size" not in str(exc):
                raise
            raise RowUnavailable(f"this svi_kernels does not take state_dtype= yet ({exc})") from exc
    return made


def _bf16_state(make):
    return _with_state(make, state_dtype=torch.bfloat16)


def _int8_state(make, backend: str):
    """``make`` with ``state_dtype="int8"`` (blockwise 8-bit moments, INT8_BLOCK elements per fp32 scale); a
    backend whose ops do not take int8 state yet gives a skipped row with that reason."""
    with_int8 = _with_state(make, state_dtype="int8", state_block_size=INT8_BLOCK)

    def made(sk, ctx):
        if not _takes_int8_state(backend, ctx.device):
            raise RowUnavailable(f"the {backend} ops do not take int8 state yet (exp_avg_scales=, block_size=)")
        return with_int8(sk, ctx)
    return made


def _takes_int8_state(backend: str, device: torch.device) -> bool:
    import inspect
    backends = importlib.import_module("svi_kernels.backends")
    try:
        name = backends.resolve(backend, device)
        module = backends.get(name)
    except (RuntimeError, ValueError):
        return False
    if "exp_avg_scales" not in inspect.signature(module.adam_step).parameters:
        return False
    return name not in ("cpu", "cuda") or "exp_avg_scales" in str(torch.ops.svi_kernels.adam_step.default._schema)


BF16_STATE_ITEMSIZE = 2
# our int8 rows keep the default state_block_size, the peers' block: one moment's code and its share of a
# float32 scale take as many bytes as theirs
INT8_BLOCK, INT8_STATE_ITEMSIZE = peers_mod.BLOCK, peers_mod.INT8_STATE_ITEMSIZE


def _peer(make):
    def build(ctx):
        opt = make(ctx.params, LR, WEIGHT_DECAY)
        return opt.step, opt
    return build


def _reference_style(mode: str, layerwise: bool = False):
    def build(ctx):
        if layerwise:
            opt = ReferenceStyleSLS(ctx.layer_groups(), "adam", init_step_size=0.1, strategy="cycle",
                                    warmup_steps=LAYERWISE_WARMUP_STEPS)
        else:
            opt = ReferenceStyleSLS([ctx.params], mode, init_step_size=1.0 if mode == "sgd" else 0.1)
        return (lambda: opt.step(ctx.closure.fn)), opt
    return build


def _groups(ctx):
    return [{"params": g} for g in ctx.layer_groups()]


def build_rows(backends: List[str], peers: bool = True) -> List[Row]:
    """All rows, in table order: torch baselines, the peers (``peers``: where installed, else skipped),
    then ours per backend, then reference-style."""
    adam, sgd = _phases("adam_step"), _phases("sgd_momentum_step")
    rows = [
        Row("torch_adamw_foreach", "torch", "torch", adam, _torch_adamw(False)),
        Row("torch_adamw_fused", "torch", "torch", adam, _torch_adamw(True)),
    ]
    if peers:
        rows += [Row(name, package, "peer", adam, _peer(make), state_itemsize=peers_mod.INT8_STATE_ITEMSIZE,
                     package=package) for package, (name, make) in peers_mod.BUILDERS.items()]
    bf16 = dict(state_itemsize=BF16_STATE_ITEMSIZE)
    int8 = dict(state_itemsize=INT8_STATE_ITEMSIZE)
    for b in backends:
        # each maker takes the optimizer's extra keywords (state_dtype for the _bf16_state / _int8_state rows)
        adamw = lambda sk, ctx, b=b, **kw: sk.AdamW(ctx.params, lr=LR, weight_decay=WEIGHT_DECAY,  # noqa: E731
                                                    backend=b, **kw)
        adam_sls = lambda sk, ctx, b=b, **kw: sk.AdamSLS(ctx.params, backend=b, **kw)  # noqa: E731
        salsa_search = lambda sk, ctx, b=b, **kw: sk.SaLSA(ctx.params, search="every", backend=b, **kw)  # noqa: E731
        layerwise = lambda sk, ctx, b=b, **kw: sk.LayerwiseAdamSLS(  # noqa: E731
            _groups(ctx), warmup_steps=ctx.layerwise_warmup_steps, backend=b, **kw)
        rows += [
            Row("adamw", b, "ours", adam, _ours(adamw)),
            Row("adamw_bf16_state", b, "ours", adam, _ours(_bf16_state(adamw)), **bf16),
            Row("adamw_int8_state", b, "ours", adam, _ours(_int8_state(adamw, b)), **int8),
            Row("svi_sgd", b, "ours", sgd, _ours(
                lambda sk, ctx, b=b: sk.SVI(ctx.params, lr=LR, base="sgd", backend=b))),
            Row("svi_adam", b, "ours", adam, _ours(
                lambda sk, ctx, b=b: sk.SVI(ctx.params, lr=LR, base="adam", backend=b))),
            Row("ls_trial_sgd", b, "ours", _trial_phases("ls_trial_sgd"), _trial("sgd", b), op_only=True),
            Row("ls_trial_adam", b, "ours", _trial_phases("ls_trial_adam"), _trial("adam", b), op_only=True),
            Row("armijo_sgd_bookkeeping", b, "ours", _armijo_sgd_phases, _ours_line_search(
                lambda sk, ctx, b=b: sk.ArmijoSGD(ctx.params, backend=b)),
                bookkeeping=True, compare_to="reference_style_armijo_sgd_bookkeeping"),
            Row("adam_sls_bookkeeping", b, "ours", _adam_sls_phases, _ours_line_search(adam_sls),
                bookkeeping=True, compare_to="reference_style_adam_sls_bookkeeping"),
            Row("adam_sls_bookkeeping_bf16_state", b, "ours", _adam_sls_phases,
                _ours_line_search(_bf16_state(adam_sls)), bookkeeping=True, **bf16),
            Row("adam_sls_bookkeeping_int8_state", b, "ours", _adam_sls_phases,
                _ours_line_search(_int8_state(adam_sls, b)), bookkeeping=True, **int8),
            # SaLSA: a search step (gradient check + save + one accepted trial, which is the step) and a step the
            # schedule skips (one fused Adam update; target: <= 1.05x our AdamW, targets.OURS_RATIO_LIMITS).
            Row("salsa_search_bookkeeping", b, "ours", _salsa_search_phases, _ours_line_search(salsa_search),
                bookkeeping=True),
            Row("salsa_search_bookkeeping_bf16_state", b, "ours", _salsa_search_phases,
                _ours_line_search(_bf16_state(salsa_search)), bookkeeping=True, **bf16),
            Row("salsa_search_bookkeeping_int8_state", b, "ours", _salsa_search_phases,
                _ours_line_search(_int8_state(salsa_search, b)), bookkeeping=True, **int8),
            Row("salsa_skipped_step", b, "ours", adam, _ours_line_search(
                lambda sk, ctx, b=b: sk.SaLSA(ctx.params, search=SKIP_ALL_BUT_FIRST, backend=b)), bookkeeping=True),
            Row("layerwise_adam_sls_bookkeeping", b, "ours", _layerwise_phases, _ours_line_search(layerwise),
                bookkeeping=True, compare_to="reference_style_layerwise_adam_sls_bookkeeping"),
            Row("layerwise_adam_sls_bookkeeping_bf16_state", b, "ours", _layerwise_phases,
                _ours_line_search(_bf16_state(layerwise)), bookkeeping=True, **bf16),
            Row("layerwise_adam_sls_bookkeeping_int8_state", b, "ours", _layerwise_phases,
                _ours_line_search(_int8_state(layerwise, b)), bookkeeping=True, **int8),
        ]
    rows += [
        Row("reference_style_armijo_sgd_bookkeeping", "reference-style", "reference-style", _armijo_sgd_phases,
            _reference_style("sgd"), bookkeeping=True),
        Row("reference_style_adam_sls_bookkeeping", "reference-style", "reference-style", _adam_sls_phases,
            _reference_style("adam"), bookkeeping=True),
        Row("reference_style_layerwise_adam_sls_bookkeeping", "reference-style", "reference-style",
            _layerwise_phases, _reference_style("adam", layerwise=True), bookkeeping=True),
    ]
    return rows


def state_itemsize(opt, default: int) -> int:
    """Element size of the optimizer's per-parameter state (it may differ from the params' dtype)."""
    if opt is None:
        return default
    for key, value in getattr(opt, "state", {}).items():
        if not isinstance(key, torch.Tensor) or not isinstance(value, dict):
            continue
        for t in value.values():
            if isinstance(t, torch.Tensor) and t.numel() > 1:
                return t.element_size()
    return default
