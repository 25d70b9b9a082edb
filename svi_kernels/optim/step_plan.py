"""The step plan: what a step needs besides the gradients, built once per param group and reused.

A step over 10,000 small tensors is host work: building lists, reading state dicts, checking and
bucketing every tensor costs microseconds per tensor, far more than the bytes. The plan holds what
does not change from step to step (the parameters, or their local shards under FSDP2, see
sharding.py; the state tensors; the bucket and its backend; the step count), so a step costs one
pass over ``p.grad`` (new tensors every step under ``zero_grad(set_to_none=True)``) plus the
launches. One class for every optimizer (``GroupPlan``); what differs is which state it gathers.

A plan fits while the group holds the same parameter objects, the same of them have gradients,
``optimizer.state`` is the same dict (``load_state_dict`` replaces it) and nothing selects another
path (master weights, capturable/AMP, differentiable, torch.compile). It is built only for the plain
case: one (device, dtype) bucket of contiguous real tensors whose state exists (from the second
step on), on the compiled backend. Everything else runs the general path, as before.

The per-tensor checks of the gradients run in the C++ op, over the whole list and before it writes
anything. When one fails (a gradient that became sparse, non-contiguous, of another dtype or device),
nothing has changed yet: the plan is dropped and the general path runs the step, raising the same
error or taking the slower route as it always did.
"""
from __future__ import annotations

from itertools import compress, repeat
from operator import attrgetter, is_
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import bucketing
from . import hyperparams
from . import state_storage
from . import step_counters
from . import tensor_ops
from . import sharding

_NO_PLAN = "no plan"  # a group that does not qualify (until its state or flags change)
ENABLED = True  # False: every step takes the general path (the tests compare the two)


class GroupPlan:
    """The tensors of some param groups' steps (one group for AdamW/SVI, all of them for a line search),
    with what makes them still valid."""

    def __init__(self, opt, groups: List[dict], owners: List[Tensor]):
        self.param_lists = [g["params"] for g in groups]
        # The objects, compared by identity: each group's (to compare without building a joined list each
        # step) and all of them in order.
        self.group_params = [list(g["params"]) for g in groups]
        self.param_ids = self.group_params[0] if len(groups) == 1 else [p for ps in self.group_params for p in ps]
        self.state = opt.state
        self.flags = [_flags(g) for g in groups]
        self.mask = [p.grad is not None for p in self.param_ids]
        self.all_have_grads = all(self.mask)
        self.owners = owners
        # FSDP2: gradients to local shards, by attribute when every parameter is a DTensor
        self.to_local = None
        if sharding.any_sharded(owners):
            self.to_local = (_LOCAL if all(map(sharding.is_sharded, owners)) else sharding.local)
        self.params = [sharding.local(p) for p in owners]
        self.lists: Dict[str, List[Tensor]] = {}
        self.impl = None
        self.bump_steps = step_counters.next_step_values  # step counters += 1
        self.template = None  # a line search's StepTensors fields (all but the gradients)
        self.int8: dict = {}  # int8 state: the launch's scale lists and block size (state_storage.op_kwargs)
        self.sharded_params: Optional[bool] = None  # a line search's: any parameter a DTensor (once known)

    def fits(self, opt, groups: List[dict]) -> bool:
        if len(groups) != len(self.param_lists) or opt.state is not self.state:
            return False
        for g, plist, flags, params in zip(groups, self.param_lists, self.flags, self.group_params):
            current = g["params"]  # the same list, still holding the same objects (it may change in place)
            if (current is not plist or _flags(g) != flags or len(current) != len(params)
                    or not all(map(is_, current, params))):
                return False
        # FSDP2 may give a DTensor a new local tensor (after loading a model state dict, for one).
        return self.to_local is None or all(map(is_, map(sharding.local, self.owners), self.params))

    def grads(self, groups: List[dict]) -> Optional[List[Tensor]]:
        """This step's gradients (local shards) in plan order; None when another set of parameters has them."""
        if len(groups) == 1:  # (a flat comprehension: ~30% less than the nested one)
            grads = [p.grad for p in groups[0]["params"]]
        else:
            grads = [p.grad for g in groups for p in g["params"]]
        if self.all_have_grads:
            if any(map(is_, grads, repeat(None))):
                return None
        else:
            if [g is not None for g in grads] != self.mask:
                return None
            grads = list(compress(grads, self.mask))
        return list(map(self.to_local, grads)) if self.to_local is not None else grads


def grads_pass_checks(grads: List[Tensor], dtypes: List[torch.dtype]) -> bool:
    """What the compiled ops ask of gradients, over the whole list in Python: dense, contiguous, the
    parameter's dtype. For a planned line-search step whose ops do not check (reference, Triton) or that
    launches more than once before its gradients are known to pass (_line_search)."""
    return (list(map(_DTYPE, grads)) == dtypes and all(map(is_, map(_LAYOUT, grads), repeat(torch.strided)))
            and all(map(Tensor.is_contiguous, grads)))


_DTYPE, _LAYOUT, _LOCAL = attrgetter("dtype"), attrgetter("layout"), attrgetter("_local_tensor")


def _flags(group: dict) -> tuple:
    """The group settings that choose the path, the state a plan holds or how launches are bucketed."""
    return (group.get("master_weights"), group.get("differentiable"), group.get("capturable"), group.get("amsgrad"),
            group.get("backend"), group.get("base"), group.get("betas"), group.get("eps"), group.get(state_storage.KEY),
            group.get(state_storage.BLOCK_KEY))


def _plans(opt) -> dict:
    plans = opt.__dict__.get("_step_plans")
    if plans is None:
        plans = opt.__dict__["_step_plans"] = {}
    return plans


def plan_for(opt, key: tuple, group: dict, build) -> Optional[GroupPlan]:
    """The valid plan of ``key`` = (group index, kind), built by ``build(opt, group)`` (None: general path)
    when needed."""
    if not ENABLED:
        return None
    plans = _plans(opt)
    entry = plans.get(key)
    if isinstance(entry, GroupPlan) and entry.fits(opt, [group]):
        return entry
    # A group that did not qualify is tried again only once its state has grown (e.g. after its first step).
    if entry == _mark(opt, group):
        return None
    plan = build(opt, group)
    plans[key] = plan if plan is not None else _mark(opt, group)
    return plan


def _mark(opt, group: dict) -> tuple:
    return (_NO_PLAN, id(group["params"]), len(opt.state))


def drop(opt, key: tuple, group: dict) -> None:
    """The plan does not fit this step: the group takes the general path until its state grows."""
    _plans(opt)[key] = _mark(opt, group)


def _uniform(tensors: List[Tensor], device, dtype) -> bool:
    """Every tensor on ``device``, of the real floating ``dtype``, contiguous."""
    if dtype.is_complex or not dtype.is_floating_point:
        return False
    return all(t.device == device and t.dtype is dtype and t.is_contiguous() for t in tensors)


def _single_compiled_bucket(params: List[Tensor], states: List[Tensor], backend,
                            codes: List[List[Tensor]] = ()) -> Optional[object]:
    """The compiled backend module when the parameters share one device and dtype and the state tensors
    one dtype (the state dtype, maybe another: state_storage.py) on that device, all real, floating and
    contiguous (int8 state: ``states`` are its float32 scales and ``codes`` its code lists, each list of one
    dtype, contiguous, on that device); else None."""
    if not params:
        return None
    device = params[0].device
    if not _uniform(params, device, params[0].dtype) or (states and not _uniform(states, device, states[0].dtype)):
        return None
    if not all(all(t.device == device and t.dtype is cl[0].dtype and t.is_contiguous() for t in cl) for cl in codes):
        return None
    if bucketing._backends.resolve(backend, device) not in ("cpu", "cuda"):
        return None
    return bucketing._backends.get(bucketing._backends.resolve(backend, device))


def _owners(group: dict) -> List[Tensor]:
    return [p for p in group["params"] if p.grad is not None]


def _host_steps(states) -> bool:
    """The float path's step counters: one-element host tensors."""
    return all(isinstance(s, Tensor) and s.device.type == "cpu" and s.numel() == 1
               for s in (st.get("step") for st in states))


# ---------------------------------------------------------------------------------- AdamW / SVI
def build_adam(opt, group: dict) -> Optional[GroupPlan]:
    if group["master_weights"] or group.get("differentiable") or group.get("capturable"):
        return None
    owners = _owners(group)
    states = [opt.state.get(p) for p in owners]
    keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
    if not owners or any(st is None or "master_param" in st or not all(k in st for k in keys) for st in states):
        return None
    plan = GroupPlan(opt, [group], owners)
    for k in keys[1:]:
        plan.lists[k] = [sharding.local(st[k]) for st in states]
    plan.lists["step"] = [st["step"] for st in states]
    if not _host_steps(states):
        return None
    if step_counters._host_counters(plan.lists["step"]):  # checked once: one extension call per step
        plan.bump_steps = step_counters._compiled.increment_steps
    if group.get(state_storage.KEY) == state_storage.INT8:
        return _int8_plan(plan, group, states, keys[1:])
    states = [t for k in keys[1:] for t in plan.lists[k]]
    if not state_storage.has_dtype(states, plan.params * (len(keys) - 1), group.get(state_storage.KEY)):
        return None  # (the general path converts them first)
    plan.impl = _single_compiled_bucket(plan.params, states, group["backend"])
    return plan if plan.impl is not None else None


def _int8_plan(plan: GroupPlan, group: dict, states: List[dict], keys) -> Optional[GroupPlan]:
    """An AdamW/SVI plan over int8 state: every state tensor stored as the group asks (codes and scales of
    its block size; else the general path converts them first), the scale lists and block size kept for
    the launch."""
    if not all(state_storage.matches(st, k, p.dtype, group) for st, p in zip(states, plan.params) for k in keys):
        return None
    block = state_storage.block_size(group)
    scales = [[state_storage.scales(st, k, block) for st in states] for k in keys]
    plan.int8 = state_storage.op_kwargs([state_storage.LIST_OF[k] for k in keys], scales, state_storage.block_size(group))
    plan.impl = _single_compiled_bucket(plan.params, [t for sl in scales for t in sl], group["backend"],
                                        [plan.lists[k] for k in keys])
    return plan if plan.impl is not None else None


def _adam_launch(plan: GroupPlan, group: dict, grads: List[Tensor], decoupled: bool,
                 seeds: state_storage.StepSeeds) -> bool:
    from .adamw import adam_scalars
    beta1, beta2 = group["betas"]
    beta1, beta2 = hyperparams.as_float(beta1, "beta1"), hyperparams.as_float(beta2, "beta2")
    steps = plan.lists["step"]
    values = plan.bump_steps(steps)  # += 1 first: the counters themselves give the bias corrections
    step = values[0]
    if values.count(step) != len(values):  # counters that differ (set by hand?): one launch per value
        torch._foreach_sub_(steps, 1.0)
        return False
    bc1, bc2_sqrt = adam_scalars(step, beta1, beta2, group.get("correct_bias", True))
    extra = {"max_exp_avg_sqs": plan.lists["max_exp_avg_sq"]} if "max_exp_avg_sq" in plan.lists else {}
    extra.update(state_storage.seed_kwarg(seeds.next(group), 0, plan.lists["exp_avg"]))
    try:
        plan.impl.adam_step(plan.params, grads, plan.lists["exp_avg"], plan.lists["exp_avg_sq"], **extra, **plan.int8,
                            lr=hyperparams.as_float(group["lr"], "lr"), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                            weight_decay=float(group["weight_decay"]), decoupled=decoupled,
                            bias_correction1=bc1, bias_correction2_sqrt=bc2_sqrt, maximize=group["maximize"])
    except RuntimeError:  # the op's checks refused a gradient before writing: the general path decides
        torch._foreach_sub_(steps, 1.0)  # exact: integer counts
        return False
    return True


def build_sgd(opt, group: dict) -> Optional[GroupPlan]:
    if group["master_weights"] or group.get("differentiable") or group.get("capturable"):
        return None
    owners = _owners(group)
    states = [opt.state.get(p) for p in owners]
    if not owners or any(st is None or "master_param" in st or st.get("momentum_buffer") is None for st in states):
        return None
    plan = GroupPlan(opt, [group], owners)
    plan.lists["momentum_buffer"] = [sharding.local(st["momentum_buffer"]) for st in states]
    if group.get(state_storage.KEY) == state_storage.INT8:
        return _int8_plan(plan, group, states, ("momentum_buffer",))
    if not state_storage.has_dtype(plan.lists["momentum_buffer"], plan.params, group.get(state_storage.KEY)):
        return None  # (the general path converts them first)
    plan.impl = _single_compiled_bucket(plan.params, plan.lists["momentum_buffer"], group["backend"])
    return plan if plan.impl is not None else None


def _sgd_launch(plan: GroupPlan, group: dict, grads: List[Tensor], seeds: state_storage.StepSeeds) -> bool:
    momentum = hyperparams.as_float(group["momentum"], "momentum")
    dampening = hyperparams.as_float(group.get("dampening", 0.0), "dampening") if momentum != 0.0 else 0.0
    try:
        plan.impl.sgd_momentum_step(plan.params, grads, plan.lists["momentum_buffer"], lr=hyperparams.as_float(group["lr"], "lr"),
                                    momentum=momentum, nesterov=bool(group["nesterov"]),
                                    weight_decay=hyperparams.as_float(group["weight_decay"], "weight_decay"),
                                    maximize=group["maximize"], **({"dampening": dampening} if dampening else {}),
                                    **plan.int8,
                                    **state_storage.seed_kwarg(seeds.next(group), 0, plan.lists["momentum_buffer"]))
    except RuntimeError:
        return False
    return True


# kind -> (build, launch(plan, group, grads)); SVI picks per group by its base.
def _kind(opt, group: dict) -> str:
    return "sgd" if group.get("base") == "sgd" else "adam"


def step(opt, general, *, decoupled: bool) -> None:
    """Step every param group: through their plans when all groups have one (the checks they need were
    made when they were built, and the gradients' in the C++ op), else ``general(groups, seeds)`` for all
    of them (its checks run before it changes anything). If an op refuses group k's gradients, groups
    before it have stepped; ``general`` then runs groups k.. (and raises the error it finds). ``seeds``:
    this step() call's state seeds (state_storage.step_seeds), drawn launch by launch on either path.

    Under torch.compile a step that draws seeds runs outside the graph (a graph break): a seed traced into
    the graph would be a new constant, hence a new graph, at every step."""
    if torch.compiler.is_compiling() and state_storage.draws_seeds(opt):
        _step_outside_graph(opt, general, decoupled)
        return
    groups = opt.param_groups
    seeds = state_storage.step_seeds(opt)
    ready = []
    if fast_path_allowed(opt):
        for gi, group in enumerate(groups):
            kind = _kind(opt, group)
            plan = plan_for(opt, (gi, kind), group, build_sgd if kind == "sgd" else build_adam)
            grads = plan.grads([group]) if plan is not None else None
            if grads is None:
                if plan is not None:
                    drop(opt, (gi, kind), group)
                ready = None
                break
            ready.append((gi, kind, plan, grads))
    if not ready:
        general(groups, seeds)
        return
    for k, (gi, kind, plan, grads) in enumerate(ready):
        group = groups[gi]
        done = (_sgd_launch(plan, group, grads, seeds) if kind == "sgd"
                else _adam_launch(plan, group, grads, decoupled, seeds))
        if not done:
            drop(opt, (gi, kind), group)
            general(groups[k:], seeds)
            return


@torch.compiler.disable
def _step_outside_graph(opt, general, decoupled: bool) -> None:
    step(opt, general, decoupled=decoupled)


def fast_path_allowed(opt) -> bool:
    """No AMP scaler attributes and no tracing: the plan covers the float path only."""
    grad_scale, found_inf = tensor_ops.amp_attributes(opt)
    return grad_scale is None and found_inf is None and not torch.compiler.is_compiling()


# ------------------------------------------------------------------------------- line searches
# One plan over all param groups: StepTensors' lists but the gradients (``template``), kept from the
# last step that built them the long way. As for AdamW, the gradients are checked by the first op that
# reads them (the save phase, or a skipped step's update: one pass over the whole list in C++, before it
# writes anything but the scratch w0 of keep_start_point); when it refuses, the step drops the plan and runs the general path
# (_line_search.LineSearchOptimizer._checked_phase).
def _ls_plan(opt) -> Optional[GroupPlan]:
    plan = _plans(opt).get("ls")
    return plan if ENABLED and isinstance(plan, GroupPlan) and plan.fits(opt, opt.param_groups) else None


def line_search_params(opt) -> Optional[tuple]:
    """(every parameter of the param groups, whether any is an FSDP2 DTensor) when a plan fits, else
    None. A fitting plan vouches for the parameters (checked when it was built)."""
    plan = _ls_plan(opt)
    if plan is None:
        return None
    if plan.sharded_params is None:
        plan.sharded_params = sharding.any_sharded(plan.param_ids)
    return plan.param_ids, plan.sharded_params


def line_search_tensors(opt, with_moments: bool) -> Optional[dict]:
    """StepTensors' fields for this step from the plan, with this step's gradients (unchecked where the
    compiled ops check them), or None when there is no plan or another set of parameters has gradients."""
    plan = _ls_plan(opt)
    if (plan is None or plan.template is None or plan.template["with_moments"] != with_moments
            or plan.template["keep_start_point"] != opt.keep_start_point):
        return None
    grads = plan.grads(opt.param_groups)
    if grads is None or not (plan.template["op_checks"] or grads_pass_checks(grads, plan.template["dtypes"])):
        return None
    fields = dict(plan.template)
    fields["grads"] = grads
    return fields


def keep_line_search_tensors(opt, t, owners: List[Tensor], with_moments: bool) -> None:
    """After StepTensors was built the long way: keep it as the plan when everything is contiguous."""
    if not all(t.contiguous):
        drop_line_search(opt)
        return
    plan = GroupPlan(opt, opt.param_groups, owners)
    fields = {k: v for k, v in vars(t).items() if k != "grads"}
    fields["with_moments"] = with_moments
    fields["planned"] = True
    fields["_all_contiguous"] = True
    fields["dtypes"] = [p.dtype for p in t.params]
    # Only the compiled ops check a whole list before writing; on the reference and Triton backends the
    # gradients are checked in Python every step, as before.
    fields["op_checks"] = all(bucketing._backends.resolve(backend, device) in ("cpu", "cuda")
                              for device, backend in {(k[0], k[-1]) for k in t.key})
    plan.template = fields
    _plans(opt)["ls"] = plan


def drop_line_search(opt) -> None:
    """An op refused this step's gradients: the next StepTensors is built the long way (with the checks)."""
    _plans(opt).pop("ls", None)
