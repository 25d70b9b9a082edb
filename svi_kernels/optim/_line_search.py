"""Machinery shared by ArmijoSGD, AdamSLS and LayerwiseAdamSLS.

A step works on the tensors of several param groups at once: it buckets them by (device, dtype)
so each phase (reduce and update the moments, trial point, final step) is one fused launch per
bucket, with one step size per tensor where groups differ. The trials move the parameters in place
(trial_points.py): no copy of the start point w0 and no search direction is kept, unless
``keep_start_point=True`` asks for the w0 copies, which then live outside ``self.state`` (meaningful
only inside a step, so checkpoints do not carry them).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import bucketing
from . import hyperparams
from . import initial_step
from . import input_checks
from . import master_weights
from . import sharding
from . import state_storage
from . import step_plan
from . import search_schedule
from . import searched_step
from . import trial_points
from .adamw import adam_scalars

# Dtypes where the CPU op ls_trial_sgd(p, p, g, eta) gives the bits of torch._foreach_add_(p, g, alpha=-eta).
_FOREACH_BITS = (torch.float32, torch.float64)
LS_KEY = "ls"  # self.state[LS_KEY]: counters and per-group step sizes (round-trips through state_dict)


def reset_step_size(eta: float, group: dict) -> float:
    """Vaswani et al.'s reset before each search: 0 keep, 1 grow by gamma^(1/n_batches_per_epoch), 2 restart."""
    option = group["reset_option"]
    if option == 0:
        return eta
    if option == 1:
        return eta * group["gamma"] ** (1.0 / group["n_batches_per_epoch"])
    if option == 2:
        return float(group["init_step_size"])
    raise ValueError(f"Invalid reset_option {option!r} (expected 0, 1 or 2)")


def check_ls_hyperparameters(n_batches_per_epoch, init_step_size, c, beta_b, gamma, max_backtracks) -> None:
    if int(n_batches_per_epoch) < 1:
        raise ValueError(f"Invalid n_batches_per_epoch: {n_batches_per_epoch} (must be >= 1)")
    hyperparams.check_positive(init_step_size, "init_step_size")
    hyperparams.check_open_unit(c, "c")
    hyperparams.check_open_unit(beta_b, "beta_b")
    hyperparams.check_positive(gamma, "gamma")
    if int(max_backtracks) < 1:
        raise ValueError(f"Invalid max_backtracks: {max_backtracks} (must be >= 1)")


def count_runs(gid: List[int], pos: List[int]) -> List[tuple]:
    """(group, number of tensors) of each run of one group index in the positions ``pos`` (StepTensors'
    positions go group by group, so a bucket has one run per group)."""
    runs: List[list] = []
    for gi in map(gid.__getitem__, pos):
        if runs and runs[-1][0] == gi:
            runs[-1][1] += 1
        else:
            runs.append([gi, 1])
    return [tuple(r) for r in runs]


class StepTensors:
    """The tensors with gradients of some param groups for one step, with their group index."""

    def __init__(self, opt: "LineSearchOptimizer", with_moments: bool):
        planned = step_plan.line_search_tensors(opt, with_moments)  # the last step's lists, this step's grads
        if planned is not None:  # (``planned`` True: the gradients are left to the ops' checks)
            self.__dict__.update(planned)
            return
        opt._check_params()  # the long way checks everything first
        self.planned = False
        self.params: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.exp_avgs: List[Tensor] = []
        self.exp_avg_sqs: List[Tensor] = []
        self.exp_avg_scales: List[Optional[Tensor]] = []  # int8 state: the moments' block scales (else None)
        self.exp_avg_sq_scales: List[Optional[Tensor]] = []
        # A copy of the start point per parameter where it is kept (keep_start_point=True, or an fp16
        # parameter: trial_points.KEEP_DTYPES), None where the trials move it in place.
        self.w0: List[Optional[Tensor]] = []
        self.gid: List[int] = []
        owners: List[Tensor] = []
        local = sharding.local  # the kernels run on the local shards of FSDP2's DTensors
        self.keep_start_point = kept = opt.keep_start_point
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                owners.append(p)
                self.params.append(local(p))
                self.grads.append(local(p.grad))
                self.w0.append(opt._scratch(p) if kept or p.dtype in trial_points.KEEP_DTYPES else None)
                self.gid.append(gi)
                if with_moments:
                    st = opt._moments(p, group)
                    self.exp_avgs.append(local(st["exp_avg"]))
                    self.exp_avg_sqs.append(local(st["exp_avg_sq"]))
                    block = state_storage.block_size(group)
                    self.exp_avg_scales.append(state_storage.scales(st, "exp_avg", block))
                    self.exp_avg_sq_scales.append(state_storage.scales(st, "exp_avg_sq", block))
        # Only this step's copies stay (keep_start_point switched off, parameters gone: the rest are freed).
        kept_copies = {p: w for p, w in zip(owners, self.w0) if w is not None}
        self.any_kept = bool(kept_copies)  # (the plan keeps it with the lists: TrialPoints skips a pass without)
        if kept_copies:
            opt._w0 = kept_copies
        else:
            opt.__dict__.pop("_w0", None)
        # Sharded parameters: the reductions are summed over the shards before anyone decides.
        self.shards = sharding.shard_sums(opt._name, owners, opt.process_group)
        self.n_groups = len(opt.param_groups)
        self.groups = opt.param_groups
        # (the state dtype follows from the parameter's and the group's state_dtype; the backend comes last)
        launch_key = [(tuple(g.get("betas", ())), g.get("eps"), g.get(state_storage.KEY),
                       state_storage.block_size(g), g["backend"]) for g in opt.param_groups]
        # Computed once per step; every phase (and every trial) reuses them.
        self.key = [(p.device, p.dtype) + launch_key[gi] for p, gi in zip(self.params, self.gid)]
        self.contiguous = [p.is_contiguous() and g.is_contiguous() for p, g in zip(self.params, self.grads)]
        self._partitions: Dict[Optional[tuple], List[List[int]]] = {}
        self._sublists: Dict[tuple, list] = {}  # (name, id of a partition's positions) -> that sublist
        self._count_runs: Dict[int, List[tuple]] = {}  # id of a partition's positions -> count_runs
        self._all_contiguous: Optional[bool] = None
        self._impls: Dict[tuple, object] = {}  # (backend, device) -> module of contiguous buckets (see impl)
        step_plan.keep_line_search_tensors(opt, self, owners, with_moments)

    def grads_pass_checks(self) -> bool:
        """The ops' gradient checks, in Python (true off the plan: check_params has run)."""
        return not self.planned or step_plan.grads_pass_checks(self.grads, self.dtypes)

    def check_grad_dtypes(self, opt_name: str) -> None:
        """Every gradient has its parameter's dtype (what the fused ops refuse otherwise)."""
        for i, (p, g) in enumerate(zip(self.params, self.grads)):
            if g.dtype != p.dtype:
                raise RuntimeError(f"{opt_name}: the gradient of parameter {i} (of those with gradients) has "
                                   f"dtype {g.dtype}, the parameter {p.dtype}; they must agree")

    def _partition(self, gids: Optional[Sequence[int]]) -> List[List[int]]:
        """Positions of the selected groups' tensors, split into fused buckets (memoised, also across
        the steps that reuse the plan's StepTensors fields).

        A bucket shares device, dtype and the group hyperparameters a launch takes (betas, eps,
        backend), so groups that agree on them share one launch.
        """
        memo = None if gids is None else tuple(sorted(gids))
        if memo not in self._partitions:
            chosen = None if gids is None else set(gids)
            buckets: Dict[tuple, List[int]] = {}
            for i, key in enumerate(self.key):
                if chosen is None or self.gid[i] in chosen:
                    buckets.setdefault(key, []).append(i)
            parts = list(buckets.values())
            for pos in parts:  # pos lives as long as the memo: its id keys the memos of its sublists and runs
                self._count_runs[id(pos)] = count_runs(self.gid, pos)
            self._partitions[memo] = parts
        return self._partitions[memo]

    def buckets(self, names: Sequence[str], gids: Optional[Sequence[int]] = None):
        """(device, group, lists, positions, n_check) per fused bucket over the selected groups (a bucket's
        state tensors share a dtype: its groups share the state_dtype);
        ``n_check`` is 0 when every tensor of the bucket is contiguous (nothing left to check)."""
        out = []
        if self._all_contiguous is None:
            self._all_contiguous = all(self.contiguous)
        for pos in self._partition(gids):
            n_check = 0 if self._all_contiguous or all(self.contiguous[i] for i in pos) else len(names)
            out.append((self.key[pos[0]][0], self.groups[self.gid[pos[0]]], self.lists(names, pos), pos, n_check))
        return out

    def state_buckets(self, names: Sequence[str], gids: Optional[Sequence[int]] = None):
        """``buckets(names)`` for an op that reads or writes the moments, each with its int8 keywords
        (state_storage.split_scales: the scale lists and block size; {} for other state):
        (device, group, lists, positions, n_check, keywords)."""
        out = []
        for device, g, lists, pos, n_check in self.buckets(state_storage.with_scales(names), gids):
            lists, kwargs = state_storage.split_scales(names, lists, state_storage.block_size(g))
            out.append((device, g, lists, pos, min(n_check, len(names)), kwargs))
        return out

    def impl(self, backend: Optional[str], device, lists, n_check: int):
        """bucketing.backend_for(backend, device, lists, n_check), memoised for contiguous buckets
        (``n_check`` 0: the answer depends on the backend and device alone), also across the steps that
        reuse the plan's fields (a changed backend drops the plan)."""
        if n_check:
            return bucketing.backend_for(backend, device, lists, n_check)
        key = (backend, device)
        impl = self._impls.get(key)
        if impl is None:
            impl = self._impls[key] = bucketing.backend_for(backend, device, lists, 0)
        return impl

    def lists(self, names: Sequence[str], pos: List[int]) -> List[List[Optional[Tensor]]]:
        """The lists ``names`` at a bucket's positions ``pos`` (one of ``buckets``'s)."""
        if len(pos) == len(self.params):  # one bucket of everything (positions in order): the lists themselves
            return [getattr(self, name) for name in names]
        return [self._sublist(name, pos) for name in names]

    def _sublist(self, name: str, pos: List[int]) -> List[Optional[Tensor]]:
        """``getattr(self, name)`` at the positions ``pos`` (a list the partition memoises). All but the
        gradients are the same tensors on every step that reuses the plan's fields: memoised too."""
        if name == "grads":
            return list(map(self.grads.__getitem__, pos))
        key = (name, id(pos))  # pos lives as long as the memo (both in self._partitions' lifetime)
        sub = self._sublists.get(key)
        if sub is None:
            sub = self._sublists[key] = list(map(getattr(self, name).__getitem__, pos))
        return sub

    def per_tensor(self, per_group: Dict[int, float], pos: List[int]) -> List[float]:
        """A value per tensor of a bucket from one per group: ``[value] * count`` per run of a group in
        ``pos`` (runs the partition computed once), so no step looks up each tensor's group."""
        runs = self._count_runs[id(pos)]
        if len(runs) == 1:
            return [per_group[runs[0][0]]] * runs[0][1]
        out: List[float] = []
        for gi, count in runs:
            out += [per_group[gi]] * count
        return out

    def per_group(self, parts, values: List[float]) -> List[float]:
        """Per-group sums of per-tensor ``values`` (those of ``parts`` = [(positions, ...)], in order):
        each group's values added from 0.0 in the order they come (sum() continues from the group's
        partial sum: the same additions in the same order as one at a time, in C)."""
        if self.n_groups == 1:
            return [sum(values, 0.0)]
        sums = [0.0] * self.n_groups
        start = 0
        for pos, _ in parts:
            # A partition's positions have their runs; positions summed over shards are a new list.
            runs = self._count_runs.get(id(pos)) or count_runs(self.gid, pos)
            for gi, count in runs:
                sums[gi] = sum(values[start:start + count], sums[gi])
                start += count
        return sums


class LineSearchOptimizer(Optimizer):
    """Base class: state bookkeeping, scratch buffers and the fused phases."""

    _name = "LineSearchOptimizer"
    _group_keys = ("init_step_size", "c", "beta_b", "gamma", "n_batches_per_epoch", "max_backtracks", "backend")
    keep_start_point = False  # (an optimizer pickled before the option existed)

    def __init__(self, params, defaults, process_group=None, search="every", keep_start_point=False):
        # torch.distributed group whose ranks average each tested loss (None: the world; False: off).
        self.process_group = process_group
        # True: keep a copy of the start point during each step (+4 B/param; trial_points.py)
        self.keep_start_point = trial_points.check_keep_start_point(keep_start_point)
        search = search_schedule.check_search(search)
        defaults = {**defaults, "master_weights": master_weights.check_mode(defaults.get("master_weights", False))}
        if self._uses_moments:  # (ArmijoSGD keeps no state)
            defaults = {**defaults, state_storage.KEY: state_storage.check_value(defaults.get(state_storage.KEY)),
                        state_storage.BLOCK_KEY: state_storage.check_block_size(
                            defaults.get(state_storage.BLOCK_KEY, state_storage.DEFAULT_BLOCK_SIZE))}
        super().__init__(params, defaults)
        bucketing._backends.check_param_groups(self.param_groups)  # a backend that cannot serve the devices: refused now
        self.state[LS_KEY] = {
            "step": 0, "n_forwards": 0, "n_backwards": 0, "total_backtracks": 0,
            "step_sizes": [float(g["init_step_size"]) for g in self.param_groups],
            "n_backtracks": [0] * len(self.param_groups),
            "found": [True] * len(self.param_groups),
            "searched": True,  # did the last step search (False: skipped by the ``search=`` schedule)
            "search": search_schedule.new_state(search, len(self.param_groups)),
        }

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        master_weights.check_new_group(self, self._name)
        if self._uses_moments:
            state_storage.check_new_group(self, self._name)
        searched_step.wrap_groups(self)  # no "lr": a scheduler gets a clear error (searched_step.py)
        ls = self.state.get(LS_KEY)
        if ls is not None:  # None while the constructor adds its first groups
            ls["step_sizes"].append(float(self.param_groups[-1]["init_step_size"]))
            ls["n_backtracks"].append(0)
            ls["found"].append(True)
            search_schedule.add_group(ls["search"])

    def __getstate__(self):
        # torch's Optimizer copies and pickles only defaults, state and param_groups; keep this class's
        # public settings too (process_group, LayerwiseAdamSLS's strategy, ...): torch's generic test
        # test_deepcopy_copies_all_public_attrs.
        return {**{k: v for k, v in self.__dict__.items() if not k.startswith("_")}, **super().__getstate__()}

    # ---------------------------------------------------------------- state
    @property
    def ls_state(self) -> dict:
        """Counters and step sizes: ``step``, ``n_forwards``, ``n_backwards``, ``step_sizes`` (one per
        param group), ``n_backtracks`` and ``found`` (last step, per group), ``total_backtracks``."""
        return self.state[LS_KEY]

    @property
    def search(self):
        """The ``search=`` schedule: "every", "salsa", "auto" or an int k (see search_schedule)."""
        return self.ls_state["search"]["kind"]

    @property
    def n_forwards(self) -> int:
        return self.ls_state["n_forwards"]

    @property
    def n_backwards(self) -> int:
        return self.ls_state["n_backwards"]

    # Per-parameter state tensors of the subclass, created zero at state_dict() time when missing.
    _uses_moments = False

    def state_dict(self):
        """torch's layout, with the counters in ``param_groups[0]["ls"] = (ls_state,)`` (where
        torch.distributed.checkpoint's get/set_optimizer_state_dict keep them; see sharding.py) and every state tensor
        present (zero before the first step; the master state of ``master_weights`` too), so a fresh
        optimizer's state_dict is a complete template for DCP's in-place load (which loads only the
        entries the template has: a master left out was lost on resume)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    if self._uses_moments:
                        self._moments(p, group, convert=False)
                    master_weights.template_state(group, self.state[p], p)
        return sharding.counters_into_groups(super().state_dict(), LS_KEY)

    def load_state_dict(self, state_dict):
        # torch keeps non-parameter state entries by reference; copy ours so that stepping after a
        # load never mutates the checkpoint the caller still holds.
        input_checks.check_state_dict(self._name, state_dict, self._group_keys)
        state_storage.check_groups(self._name, self)  # (parameters whose dtype changed since construction)
        state_dict = sharding.counters_from_groups(state_dict, LS_KEY)
        if LS_KEY in state_dict["state"]:
            state_dict["state"][LS_KEY] = copy.deepcopy(state_dict["state"][LS_KEY])
        if self._uses_moments:
            state_storage.check_checkpoint(self._name, self, state_dict)
        kept = state_storage.settings(self)
        flags = [g.get("master_weights", False) for g in self.param_groups]
        super().load_state_dict(state_dict)
        master_weights.keep_master_state(self, state_dict, flags)
        if self._uses_moments:  # (ArmijoSGD keeps no state)
            state_storage.keep_after_load(self, kept, state_dict)
        searched_step.wrap_groups(self)
        ls = self.state.get(LS_KEY)
        if ls is not None and len(ls["step_sizes"]) != len(self.param_groups):
            raise ValueError(f"{self._name}.load_state_dict: {len(ls['step_sizes'])} step sizes for "
                             f"{len(self.param_groups)} param groups")

    def _moments(self, p: Tensor, group: dict, convert: bool = True) -> dict:
        """p's state with its Adam moments in the group's state dtype (zeros, with p's placement, when new;
        with ``convert``, converted when the group's ``state_dtype`` changed)."""
        st = self.state[p]
        state_dtype = group.get(state_storage.KEY)
        wd = state_storage.working_dtype(group, p)  # (float32 for an fp16/bf16 p under master_weights)
        if "exp_avg" not in st:
            state_storage.create(st, "exp_avg", p, group, wd)
            state_storage.create(st, "exp_avg_sq", p, group, wd)
        elif convert and not state_storage.matches(st, "exp_avg", wd, group):
            state_storage.conform(st, wd, state_dtype, state_storage.block_size(group))
        return st

    def _scratch(self, p: Tensor) -> Tensor:
        """p's start-point copy (keep_start_point), made to match p's local shard."""
        buffers = self.__dict__.setdefault("_w0", {})  # (private: a copy or unpickled optimizer has none yet)
        lp = sharding.local(p)  # w0 holds the local shard only
        buf = buffers.get(p)
        if buf is None or buf.shape != lp.shape or buf.dtype != lp.dtype or buf.device != lp.device:
            buf = torch.empty_like(lp, memory_format=torch.contiguous_format if lp.is_contiguous()
                                   else torch.preserve_format)
            buffers[p] = buf
        return buf

    def _runner(self, closure, check: bool):
        """This step's ClosureRunner. ``check`` (a searched step): refuse bad parameters before any
        forward; a fitting plan checked them when it was built (the gradients are checked after the
        backward, by the first op that reads them, or by StepTensors off the plan). Without ``check``
        (a skipped step: no trial) the runner keeps no RNG state."""
        from ._closure import ClosureRunner, all_params
        planned = step_plan.line_search_params(self)
        if planned is None:
            if check:
                self._check_params()
            return ClosureRunner(self._name, closure, all_params(self.param_groups), self.process_group,
                                 trials=check)
        params, sharded = planned
        return ClosureRunner(self._name, closure, params, self.process_group, sharded=sharded, trials=check)

    def _check_params(self) -> None:
        for group in self.param_groups:
            input_checks.check_params(self._name, group["params"])
            sharding.check(self._name, group["params"])

    def _checked_phase(self, with_moments: bool, phase, one_launch=None):
        """(t, phase(t)) with this step's StepTensors t; ``phase`` is the first op to read the gradients.

        On the plan, that op's one-pass checks (C++, over the whole list, before it writes anything but
        the scratch w0) stand in for check_params: when it refuses, the plan is dropped and the general
        path runs the phase (check_params raises the error it always raised, a non-contiguous gradient
        goes to the reference backend, what else the op refuses it refuses again). ``one_launch(t)``
        False: the phase launches more than once and a later launch's refusal would leave the earlier
        ones done, so the gradients are checked in Python first.
        """
        t = StepTensors(self, with_moments)
        if t.planned and one_launch is not None and not one_launch(t) and not t.grads_pass_checks():
            t = self._unplanned(with_moments)
        try:
            return t, phase(t)
        except RuntimeError:
            if not t.planned:
                raise
        t = self._unplanned(with_moments)
        return t, phase(t)

    def _unplanned(self, with_moments: bool) -> StepTensors:
        step_plan.drop_line_search(self)
        return StepTensors(self, with_moments)  # the long way, with check_params

    # --------------------------------------------------------- fused phases
    # Adam phases take ``step`` (t = completed steps + 1) and derive each bucket's bias corrections.
    # The reductions stay on the device (``DeviceSums``) until the next host read, which they join.
    # The moves of the search and the final Adam step are trial_points.TrialPoints'.
    def _save_sgd(self, t: StepTensors, save_w0: bool = True) -> "DeviceSums":
        """sum(g^2) per tensor, and w0 <- p when ``save_w0`` where the step keeps w0 (keep_start_point,
        fp16); without w0 the op reads only g (4 B/param in fp32) and writes nothing."""
        parts = []
        for device, g, lists, pos, n_check in t.buckets(["params", "grads", "w0"]):
            if not save_w0 or lists[2][0] is None:  # (a bucket's tensors share the dtype: all kept or none)
                lists = lists[:2] + [[]]
            impl = bucketing.backend_for(g["backend"], device, lists[:2], n_check and 2)
            parts.append((pos, impl.ls_save_sgd(*lists)))
        return DeviceSums(t, parts)

    def _grad_norms(self, t: StepTensors) -> "DeviceSums":
        """Per-tensor sums of g^2 (the Adam variants check them finite before touching their moments):
        ArmijoSGD's save op given an empty w0, which reads only g and writes nothing, instead of
        torch._foreach_norm's 0-d tensor per parameter and a stack."""
        return self._save_sgd(t, save_w0=False)

    def _save_adam(self, t: StepTensors, step: int, seeds: state_storage.StepSeeds) -> "DeviceSums":
        """Moments updated (and w0 <- p where the step keeps w0), and sum(g^2 / (sqrt(v_hat) + eps)) per
        tensor. Without w0 the op reads g, m, v and writes m, v (20 B/param in fp32). Each launch takes
        its state seed from ``seeds``."""
        parts = []
        for device, g, lists, pos, n_check, int8 in t.state_buckets(["params", "grads", "exp_avgs", "exp_avg_sqs",
                                                                      "w0"]):
            beta1, beta2 = g["betas"]
            _, bc2_sqrt = adam_scalars(step, beta1, beta2, True)
            w0 = [] if lists[4][0] is None else lists[4]
            impl = bucketing.backend_for(g["backend"], device, lists[:4], n_check and 4)
            parts.append((pos, impl.ls_save_adam(*lists[:4], w0, [], beta1=beta1, beta2=beta2, eps=g["eps"],
                                                 bias_correction2_sqrt=bc2_sqrt, **int8,
                                                 **state_storage.seed_kwarg(seeds.next(g), 0, lists[2]))))
        return DeviceSums(t, parts)

    # --------------------------------------------------------- the search
    def _armijo(self, runner, f0: float, eta: float, group: dict, try_point, read,
                on_nonfinite=None) -> tuple[float, int, bool]:
        """Backtrack from ``eta`` until f0 - f(trial) >= c * eta * s (NaN/inf counts as a failure).

        ``read(f1_tensor) -> (f1, s, skip)`` brings the trial loss (and, the first time, the pending
        reductions) to the host in ONE sync per trial. ``skip`` ends the search at once (accepting eta).
        Returns (eta, number of failed trials, found). After ``max_backtracks`` failures eta has been
        reduced once per failure, as in the reference code (under ``"auto"`` the search ends sooner, at
        the same eta: initial_step.exhausted). ``on_nonfinite()`` runs after a non-finite
        trial loss (TrialPoints.check_finite).
        """
        c = group["c"]
        for e in range(int(group["max_backtracks"])):
            try_point(eta)
            f1, s, skip = read(runner.trial())
            if skip:
                return eta, 0, True
            if math.isfinite(f1) and f1 <= f0 - c * eta * s:
                initial_step.accepted(self.ls_state, group, eta, f0, f1, s)  # search="auto"'s climbing rule
                return eta, e, True
            if on_nonfinite is not None and not math.isfinite(f1):
                on_nonfinite()
            if initial_step.exhausted(self.ls_state, eta):  # "auto": failed at the papers' last trial
                return eta * group["beta_b"], e + 1, False
            eta = initial_step.backtrack(self.ls_state, group, eta, f0, f1, s)  # the papers': eta * beta_b
        return eta, int(group["max_backtracks"]), False

    def _record(self, gi: int, eta: float, backtracks: int, found: bool) -> None:
        ls = self.ls_state
        ls["step_sizes"][gi] = eta
        ls["n_backtracks"][gi] = backtracks
        ls["found"][gi] = found
        ls["total_backtracks"] += backtracks

    def _finish(self, runner, searched: bool = True, etas: Optional[Dict[int, float]] = None,
                old_etas: Optional[Dict[int, float]] = None) -> None:
        """Commit a successful step: counters, and the schedule (``etas``: accepted step sizes of the
        searched groups by index, ``old_etas`` their stored values before the step)."""
        ls = self.ls_state
        ls["step"] += 1
        ls["n_forwards"] += runner.n_forwards
        ls["n_backwards"] += runner.n_backwards
        ls["searched"] = searched
        search_schedule.advance(ls["search"], searched, etas or {}, old_etas or {})

    # --------------------------------------------------------- skipped steps
    def _searches_now(self) -> bool:
        """Does the coming step search (the ``search=`` schedule)? Reads the schedule only."""
        return search_schedule.decide(self.ls_state["search"], self.ls_state["step"] + 1)

    def _skip_sgd(self, etas: Sequence[float]) -> None:
        """A skipped step along -g: p <- p - eta * g, one launch per (group, device, dtype). On the plan
        with one float32/float64 CPU bucket it is the op ls_trial_sgd(p, p, g): the bits of
        torch._foreach_add_ (tests/optim/test_line_search_plan.py) with the op's checks of the gradients."""
        def launches(t):
            return [(gi, device, g, lists) for gi in range(len(self.param_groups))
                    for device, g, lists, _pos, _n in t.buckets(["params", "grads"], gids=[gi])]

        def fused(todo) -> bool:  # one launch, which the op checks, with foreach's bits
            if len(todo) != 1:
                return False
            _gi, device, g, (params, _grads) = todo[0]
            return params[0].dtype in _FOREACH_BITS and bucketing._backends.resolve(g["backend"], device) == "cpu"

        def update(t):
            todo = launches(t)
            if t.planned and fused(todo):
                gi, device, g, (params, grads) = todo[0]
                t.impl(g["backend"], device, [params, grads], 0).ls_trial_sgd(
                    params, params, grads, [float(etas[gi])] * len(params))
                return
            for gi, _device, _g, (params, grads) in todo:
                torch._foreach_add_(params, grads, alpha=-etas[gi])

        self._checked_phase(False, update, one_launch=lambda t: fused(launches(t)))

    def _skip_adam(self, etas: Sequence[float], step: float, seeds: state_storage.StepSeeds,
                   decays: Optional[Sequence[float]] = None) -> None:
        """A skipped step along the Adam direction with the moments updated:
        p <- p * decay - eta * m_hat / (sqrt(v_hat) + eps), bias corrections at ``step``. One fused
        ``adam_step`` per (group, device, dtype): the launches and memory traffic of an AdamW step, each
        with its state seed from ``seeds``. ``decays`` (per group, default 1) is the decoupled weight-decay
        factor."""
        def one_launch(t) -> bool:
            return len(self.param_groups) == 1 and len(t._partition([0])) == 1  # (one bucket; no lists built)

        def update(t):
            if not t.planned and not one_launch(t):  # no launch may refuse after another has stepped
                t.check_grad_dtypes(self._name)
            for gi, group in enumerate(self.param_groups):
                beta1, beta2 = group["betas"]
                bc1, bc2_sqrt = adam_scalars(step, beta1, beta2, True)
                eta = float(etas[gi])
                # adam_step's decoupled decay is 1 - lr * weight_decay: express the wanted factor through it.
                wd = 0.0 if decays is None or decays[gi] == 1.0 or eta == 0.0 else (1.0 - decays[gi]) / eta
                for device, g, lists, _pos, n_check, int8 in t.state_buckets(
                        ["params", "grads", "exp_avgs", "exp_avg_sqs"], gids=[gi]):
                    impl = t.impl(g["backend"], device, lists, n_check)
                    impl.adam_step(*lists, **int8, lr=eta, beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                                   weight_decay=wd, decoupled=True, bias_correction1=bc1,
                                   bias_correction2_sqrt=bc2_sqrt,
                                   **state_storage.seed_kwarg(seeds.next(group), 0, lists[2]))

        self._checked_phase(True, update, one_launch)


class DeviceSums:
    """Per-tensor reductions of one phase, on their device until read (joining another host read)."""

    def __init__(self, t: StepTensors, parts):
        self.t = t
        if t.shards is not None:  # sharded parameters: sums over whole parameters, one all_reduce
            parts = t.shards.sum_over_shards(parts)
        self.parts = parts  # [(positions, tensor of per-tensor sums)]
        self.per_group: Optional[List[float]] = None
        self.values: Optional[List[float]] = None  # the per-tensor sums on the host, in the parts' order

    def tensors(self) -> List[Tensor]:
        return [x for _, x in self.parts]

    def load(self, host_values: Sequence[float]) -> List[float]:
        """Take the host values of ``tensors()`` (in order); returns the per-group sums."""
        self.values = list(host_values)
        self.per_group = self.t.per_group(self.parts, self.values)
        return self.per_group

    def all_finite(self) -> bool:
        # A finite sum has only finite terms (an inf or NaN term makes any IEEE sum non-finite); a
        # non-finite one may still come from finite terms that overflowed: then look at each.
        return all(map(math.isfinite, self.per_group)) or all(map(math.isfinite, self.values))


def read_trial(f1: Tensor, pending: DeviceSums) -> float:
    """The trial loss on the host; the first time, ``pending``'s reductions join the same sync."""
    from ._closure import read_host
    if pending.per_group is None:
        vals = read_host([f1] + pending.tensors())
        pending.load(vals[1:])
        return vals[0]
    return read_host([f1])[0]


def read_first(runner, loss: Tensor, sums: DeviceSums) -> float:
    """One host sync for f0 (averaged over ranks) and a phase's reductions; checks f0."""
    from ._closure import read_host
    vals = read_host([runner.average(loss)] + sums.tensors())
    f0 = vals[0]
    runner.check_f0(f0)
    sums.load(vals[1:])
    return f0
