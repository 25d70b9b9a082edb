"""Helpers shared by the optimizers: input checks, hyperparameter validation, fused grouping."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import importlib

# The subpackage, not the ``svi_kernels.backends()`` function that shadows it as a package attribute.
_backends = importlib.import_module("svi_kernels.backends")
_compiled = importlib.import_module("svi_kernels.backends.compiled")

from . import sharding  # noqa: E402


def as_float(x, name: str) -> float:
    """A hyperparameter given as a number or a 0-d tensor, as a Python float."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element: {name} must be a number or a one-element tensor, "
                             f"got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


# torch.optim's wording for each hyperparameter, so a message matches torch's (ours says more).
_TORCH_LABEL = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value",
                "momentum": "momentum value", "dampening": "dampening value"}


def _tensor_hyper(value, name: str, foreach, capturable: bool) -> None:
    """torch's rules for a hyperparameter given as a tensor: one element, and not with foreach=True
    unless capturable=True (torch's foreach path reads it as a number)."""
    if foreach and not capturable:
        raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
    if value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")


def check_lr(lr, name: str = "lr", *, foreach=None, capturable: bool = False) -> None:
    if isinstance(lr, Tensor):
        _tensor_hyper(lr, name, foreach, capturable)
    check_nonneg(lr, name)


def check_betas(betas, *, foreach=None, capturable: bool = False) -> None:
    """A pair in [0, 1), both Python floats or both tensors (torch refuses a mix)."""
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor):
            _tensor_hyper(b, f"betas[{i}]", foreach, capturable)
        v = as_float(b, f"betas[{i}]")
        if not 0.0 <= v < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {v} (must be in [0, 1))")
    if not (all(isinstance(b, Tensor) for b in betas) or all(isinstance(b, float) for b in betas)):
        raise ValueError(f"betas must be either both floats or both Tensors, got "
                         f"({type(betas[0]).__name__}, {type(betas[1]).__name__})")


def check_nonneg(value, name: str) -> None:
    v = as_float(value, name)
    if not v >= 0.0:  # also catches NaN
        label = _TORCH_LABEL.get(name, f"{name} value")
        raise ValueError(f"Invalid {label}: {value if not isinstance(value, Tensor) else v} ({name} must be >= 0)")


def check_open_unit(value, name: str) -> None:
    v = as_float(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"Invalid {name}: {v} (must be in (0, 1))")


def check_positive(value, name: str) -> None:
    v = as_float(value, name)
    if not v > 0.0:
        raise ValueError(f"Invalid {name}: {v} (must be > 0)")


def check_params(opt_name: str, params: Iterable[Tensor], *, complex_ok: bool = False,
                 sparse_ok: bool = False) -> Tuple[bool, bool]:
    """Reject what no backend supports, before anything is modified. Returns (some parameter is
    complex, some gradient is sparse), so the step needs no second pass to find out.

    ``complex_ok``: the caller optimises complex parameters as real views (AdamW, SVI, as torch does).
    ``sparse_ok``: the caller takes sparse gradients (SVI's SGD base, on the plain PyTorch path).
    Kept to a few attribute reads per tensor: it runs every step. Shape and device agreement of a
    gradient with its parameter are checked by the kernels (autograd guarantees them anyway).
    """
    strided = torch.strided
    has_complex = has_sparse = False
    for p in params:
        if not p.is_floating_point():
            if p.is_complex():
                if not complex_ok:
                    raise RuntimeError(
                        f"{opt_name} does not support complex parameters (got {p.dtype}); "
                        "optimise torch.view_as_real(p) as a real parameter instead")
                has_complex = True
            else:
                raise RuntimeError(f"{opt_name} needs floating-point parameters, got {p.dtype}")
        g = p.grad
        if g is None:
            continue
        if g.layout is not strided:
            if not sparse_ok:
                raise RuntimeError(f"{opt_name} does not support sparse gradients (got layout {g.layout})")
            has_sparse = True
        if g.is_complex() and not p.is_complex():
            raise RuntimeError(f"{opt_name} does not support complex gradients (got {g.dtype})")
    return has_complex, has_sparse


def closure_then_check(opt_name: str, closure, param_groups, **allowed):
    """torch's optional closure, then every group checked before any is touched (no half updates).
    ``allowed``: check_params's complex_ok / sparse_ok, each a bool or a function of the group.
    Returns the loss and, per group, check_params's (has_complex, has_sparse)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    kinds = []
    for group in param_groups:
        kinds.append(check_params(opt_name, group["params"],
                                  **{k: v(group) if callable(v) else v for k, v in allowed.items()}))
        sharding.check(opt_name, group["params"])
    return loss, kinds


def group_by(tensor_lists: Sequence[Sequence[Tensor]], extra_keys: Sequence[Hashable] | None = None
             ) -> Dict[tuple, Tuple[List[List[Tensor]], List[int]]]:
    """Bucket parallel tensor lists by (device, dtype[, extra key]); one fused launch per bucket.

    Returns {key: (lists, indices)}, where ``indices`` are the positions in the input lists.
    FSDP2's DTensors come out as their local shards (the kernels are elementwise; see sharding.py).
    """
    if sharding.any_sharded(tensor_lists[0]):
        tensor_lists = sharding.local_lists(tensor_lists)
    first = tensor_lists[0]
    keys = [(p.device, p.dtype) for p in first]
    if extra_keys is not None:
        keys = [k + (e,) for k, e in zip(keys, extra_keys)]
    if keys and keys.count(keys[0]) == len(keys):  # the common case: one bucket, no copying
        return {keys[0]: ([list(tl) for tl in tensor_lists], list(range(len(first))))}
    buckets: Dict[tuple, Tuple[List[List[Tensor]], List[int]]] = {}
    for i, key in enumerate(keys):
        if key not in buckets:
            buckets[key] = ([[] for _ in tensor_lists], [])
        lists, idx = buckets[key]
        for li, tl in enumerate(tensor_lists):
            lists[li].append(tl[i])
        idx.append(i)
    return buckets


def needs_contiguous(backend: str, tensors: Sequence[Tensor]) -> bool:
    """The compiled and Triton kernels walk flat memory; strided tensors go to the reference path."""
    return backend != "reference" and not all(t.is_contiguous() for t in tensors)


def backend_for(name, device: torch.device, lists: Sequence[Sequence[Tensor]], n_check: int = 2):
    """Resolve the backend module for one fused bucket (reference for non-contiguous tensors).

    Only the first ``n_check`` lists (params, grads) are checked: the state is created with
    ``zeros_like(p)`` and so shares the parameter's layout.
    """
    chosen = _backends.resolve(name, device)
    if any(needs_contiguous(chosen, tl) for tl in lists[:n_check]):
        chosen = "reference"
    return _backends.get(chosen)


def check_state_dict(opt_name: str, state_dict, group_keys: Sequence[str], param_keys: Sequence[str] = ()) -> None:
    """Refuse a state_dict from another optimizer (or a damaged one) before anything is loaded."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{opt_name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
    for i, g in enumerate(state_dict["param_groups"]):
        missing = [k for k in group_keys if k not in g]
        if missing:
            raise ValueError(f"{opt_name}.load_state_dict: param group {i} lacks {missing}; "
                             f"is this a state_dict of another optimizer?")
    for k, st in state_dict["state"].items():
        if not isinstance(k, int) or not st:
            continue
        missing = [key for key in param_keys if key not in st]
        if missing:
            raise ValueError(f"{opt_name}.load_state_dict: state of parameter {k} lacks {missing}; "
                             f"is this a state_dict of another optimizer?")


# ------------------------------------------------------------- AMP (GradScaler) and capturable steps
def amp_attributes(opt) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad_scale, found_inf) as torch.amp.GradScaler sets them on an optimizer with
    ``_step_supports_amp_scaling`` just before ``step()`` (and deletes them after)."""
    return getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)


def use_tensor_path(group, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> bool:
    """The tensor ops (values read by the kernels) instead of the float path (host numbers).
    Under torch.compile too: the float path reads the step counts back (``.item()``), which would
    put a new constant, hence a recompile, into every step; a tensor lr changed by a scheduler
    is then read in place as well, with no recompile."""
    return (bool(group.get("capturable", False)) or grad_scale is not None or found_inf is not None
            or torch.compiler.is_compiling())


def _host_counters(steps: Sequence[Tensor]) -> bool:
    """The step counters can go through the extension's increment_steps (CPU tensors, extension built)."""
    return bool(steps) and all(s.is_cpu for s in steps) and _compiled.load()[0]


def next_step_values(steps: List[Tensor]) -> List[float]:
    """The float path's step counters: +1 each, in place, and their new values as Python floats.
    One call into the extension when they all live on the host (they do on the float path),
    instead of torch._foreach_add_ plus one .item() each (~2.5 us per parameter)."""
    if _host_counters(steps):
        return _compiled.increment_steps(steps)
    torch._foreach_add_(steps, 1)
    return [s.item() for s in steps]


def new_step(p: Tensor, on_device: bool) -> Tensor:
    """A fresh ``step`` state, float32 0-d as in torch: on the host, or on p's device when the kernels
    read it there (torch's capturable/fused layout)."""
    if on_device:
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.tensor(0.0, dtype=torch.float32)


def step_to_param_device(state: dict, p: Tensor) -> None:
    """Move a host ``step`` (from the float path or a checkpoint) to p's device, once."""
    step = state["step"]
    if step.device != p.device:
        state["step"] = step.to(device=p.device)


def check_steps_on(device: torch.device, steps: Sequence[Tensor]) -> None:
    for s in steps:
        if s.device != device:
            raise RuntimeError(f"the capturable/AMP path reads each step count on its parameter's device ({device}), "
                               f"but a step is on {s.device}; the optimizers move them, the functional API "
                               f"expects them there")


def increment_steps(steps: List[Tensor], found_inf: Optional[Tensor]) -> None:
    """step += 1, or += 0 where found_inf says the step is skipped (no host read either way)."""
    if found_inf is None:
        if _host_counters(steps) and not torch.compiler.is_compiling():
            _compiled.increment_steps(steps)  # one call instead of ~1.7 us per counter (CPU tensors only)
        else:
            torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (found_inf == 0).to(steps[0].dtype))


class DeviceScalars:
    """lr, grad_scale and found_inf for the tensor ops, on each device that needs them (moved there
    once per step, asynchronously, never read back)."""

    def __init__(self, lr: Union[float, Tensor], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]):
        self._lr, self._grad_scale, self._found_inf = lr, grad_scale, found_inf
        self._moved: Dict[tuple, Tensor] = {}

    def _on(self, name: str, t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
        if t is None or t.device == device:
            return t
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = t.to(device, non_blocking=True)
        return self._moved[key]

    def lr(self, device: torch.device) -> Union[float, Tensor]:
        lr = self._lr
        if not isinstance(lr, Tensor):
            return float(lr)
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
        if lr.device != device and lr.device.type == "cpu":
            return float(lr)  # a host tensor: reading it waits for nothing (put lr on the device for graphs)
        return self._on("lr", lr, device)

    def grad_scale(self, device: torch.device) -> Optional[Tensor]:
        return self._on("grad_scale", self._grad_scale, device)

    def found_inf(self, device: torch.device) -> Optional[Tensor]:
        return self._on("found_inf", self._found_inf, device)


# ------------------------------------------------------- fp32 master weights of fp16/bf16 parameters
LOW_PRECISION = (torch.float16, torch.bfloat16)
# fp32 gradient copies made at once for the master update: bounds the step's extra memory (256 MiB).
MASTER_CHUNK_NUMEL = 1 << 26


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def working_tensor(group, state: dict, p: Tensor) -> Tensor:
    """The tensor the fused op updates for p: p itself, or, for an fp16/bf16 p under
    ``master_weights``, its float32 copy ``state["master_param"]`` (created here at p's first step
    with master weights, from p's current value; the moments already there become float32 too, so a
    checkpoint saved without master weights resumes with them). A group whose flag was switched off
    drops the master and keeps its moments in p's dtype (p already holds the rounded master)."""
    if group["master_weights"] and p.dtype in LOW_PRECISION:
        master = state.get("master_param")
        if master is None:
            _cast_state(state, torch.float32)
            master = state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format,
                                                             copy=True)
        return master
    if "master_param" in state:
        del state["master_param"]
        _cast_state(state, p.dtype)
    return p


def _cast_state(state: dict, dtype: torch.dtype) -> None:
    for k, v in state.items():
        if k != "step" and isinstance(v, Tensor) and v.is_floating_point() and v.dtype != dtype:
            state[k] = v.to(dtype)


def step_with_masters(update, lists: List[List[Tensor]], params: List[Tensor],
                      grad_scale: Optional[Tensor]) -> None:
    """``update(*lists)`` where ``lists[0]`` holds working tensors (see ``working_tensor``) and
    ``lists[1]`` the grads of ``params``, the parameters they stand for.

    Entries that are their own parameter go through in one call, as without master weights. The
    master entries go in chunks of at most MASTER_CHUNK_NUMEL elements: their grads converted to
    float32 (one read of the grad and one fp32 write), the fused op on the fp32 lists, then each
    master rounded (to nearest) into its parameter in place. Under a GradScaler the op unscales the
    fp32 grads; they are copied back so ``p.grad`` ends unscaled as without master weights.
    """
    masters = [i for i, (w, p) in enumerate(zip(lists[0], params)) if w is not p]
    if not masters:
        update(*lists)
        return
    if len(masters) < len(params):
        is_master = set(masters)
        direct = [i for i in range(len(params)) if i not in is_master]
        update(*[[tl[i] for i in direct] for tl in lists])
    for chunk in _chunks(masters, lists[0]):
        sub = [[tl[i] for i in chunk] for tl in lists]
        low_grads = sub[1]
        sub[1] = [g.to(torch.float32) for g in low_grads]
        update(*sub)
        torch._foreach_copy_([params[i] for i in chunk], sub[0])
        if grad_scale is not None:
            torch._foreach_copy_(low_grads, sub[1])


def _chunks(indices: List[int], tensors: Sequence[Tensor]):
    chunk, numel = [], 0
    for i in indices:
        n = tensors[i].numel()
        if chunk and numel + n > MASTER_CHUNK_NUMEL:
            yield chunk
            chunk, numel = [], 0
        chunk.append(i)
        numel += n
    if chunk:
        yield chunk


def keep_master_state(opt, state_dict, flags: Sequence[bool]) -> None:
    """After ``Optimizer.load_state_dict``: keep each group's own ``master_weights`` (a storage choice
    of this optimizer, not of the checkpoint), and undo the cast of the float32 state of master
    params (torch casts every float state to its param's dtype) where master weights are on."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [(p, flag) for g, flag in zip(opt.param_groups, flags) for p in g["params"]]
    for group, flag in zip(opt.param_groups, flags):
        group["master_weights"] = flag
    for pid, (p, flag) in zip(saved_ids, params):
        saved = state_dict["state"].get(pid)
        if not flag or not saved or "master_param" not in saved:
            continue
        state = opt.state[p]
        for k, v in saved.items():
            if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                state[k] = v.to(device=p.device)
