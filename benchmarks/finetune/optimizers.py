"""Optimizer factory: names used by the study -> svi_kernels optimizers (torch stand-ins where ours are missing).

| name        | optimizer                                                                 | loop       |
|-------------|---------------------------------------------------------------------------|------------|
| sgd         | torch.optim.SGD, momentum 0.95, Nesterov (the SVI base without the field) | plain      |
| svi         | sk.SVI(base="sgd", momentum 0.95, Nesterov) + sk.svi.attach(top)          | plain      |
| svi-adam    | sk.SVI(base="adam") + sk.svi.attach(top)                                  | plain      |
| adam        | sk.AdamW(weight_decay=0) = Adam                                           | plain      |
| adamw       | sk.AdamW(correct_bias=True), wd on all but bias/LayerNorm                 | plain      |
| adamw-nobc  | sk.AdamW(correct_bias=False) (BERT's original Adam), same wd rule         | plain      |
| adamsls     | sk.AdamSLS (one group, paper constants c=0.1, eta0=0.1, 500 batches/epoch)| closure    |
| plasls      | sk.LayerwiseAdamSLS(sk.layer_groups(model, 10) restricted to trained params) | closure |
| plasls-paper | the same with criterion="paper" (the paper's per-group Armijo test)      | closure    |
| sgdsls      | sk.ArmijoSGD                                                              | closure    |
| adamsls-auto | sk.AdamSLS as adamsls, search="auto" (searches only while eta changes)   | closure    |
| salsa       | sk.SaLSA, the package's defaults and search rule (search="salsa")         | closure    |
| salsa-auto  | sk.SaLSA with search="auto"                                               | closure    |
| salsa-every | sk.SaLSA with search="every" (the reference for "auto")                   | closure    |
| plasls-auto | sk.LayerwiseAdamSLS as plasls, search="auto"                              | closure    |
| prodigy     | prodigyopt.Prodigy at its defaults (lr=1)                                 | plain      |
| schedulefree | schedulefree.AdamWScheduleFree at its defaults (lr=0.0025); train()/eval() | plain     |
| dadapt-adam | dadaptation.DAdaptAdam at its defaults (lr=1)                             | plain      |
| ldog        | dog.LDoG at its defaults, evaluated at its PolynomialDecayAverager weights | plain      |

The last four (the lr-free peers of claim 5) come from the optional extra ``svi_kernels[tuning-free]``
(pinned versions); their "lr" slot is ignored, as the line searches' is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import contextlib
import importlib
import importlib.util

import torch
from torch import nn

try:  # our package; absent or incomplete while it is being written
    import svi_kernels as sk
except Exception:  # pragma: no cover
    sk = None

LINE_SEARCH = {"adamsls", "plasls", "plasls-paper", "sgdsls", "adamsls-auto", "salsa", "salsa-auto", "salsa-every",
               "plasls-auto"}
# lr-free peers: name -> (module, class, the pinned PyPI package of the tuning-free extra)
PEERS = {"prodigy": ("prodigyopt", "Prodigy", "prodigyopt==1.1.2"),
         "schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree==1.4.1"),
         "dadapt-adam": ("dadaptation", "DAdaptAdam", "dadaptation==3.2"),
         "ldog": ("dog", "LDoG", "dog-optimizer==1.0.3")}
NO_LR = LINE_SEARCH | set(PEERS)  # arms whose "lr" slot is a placeholder
NAMES = ["sgd", "svi", "svi-adam", "adam", "adamw", "adamw-nobc", "adamsls", "plasls", "plasls-paper", "sgdsls",
         "adamsls-auto", "salsa", "salsa-auto", "salsa-every", "plasls-auto"] + list(PEERS)


def has(name: str) -> bool:
    return sk is not None and hasattr(sk, name)


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    line_search: bool
    implementation: str
    svi_handle: Any = None
    notes: List[str] = field(default_factory=list)
    averager: Any = None  # LDoG's PolynomialDecayAverager (evaluation uses its weights)

    def close(self) -> None:
        if self.svi_handle is not None:
            self.svi_handle.remove()

    def after_step(self) -> None:
        if self.averager is not None:
            self.averager.step()

    @contextlib.contextmanager
    def evaluating(self, top: nn.Module):
        """Evaluate as each optimizer's README asks: Schedule-Free at its averaged point (``eval()``,
        ``train()`` after), LDoG at the averager's weights (the trained ones are put back after)."""
        opt = self.optimizer
        if hasattr(opt, "eval") and hasattr(opt, "train") and type(opt).__module__.startswith("schedulefree"):
            opt.eval()
            try:
                yield
            finally:
                opt.train()
            return
        if self.averager is None:
            yield
            return
        trained = {k: v.clone() for k, v in top.state_dict().items()}
        top.load_state_dict(self.averager.averaged_model.state_dict())
        try:
            yield
        finally:
            top.load_state_dict(trained)


def missing_message(name: str) -> str:
    pin = PEERS[name][2]
    return f"optimizer {name!r} needs {pin} (pip install 'svi_kernels[tuning-free]', or pip install torch==<yours> {pin})"


def available(name: str) -> bool:
    """Is the package of peer ``name`` importable?"""
    return importlib.util.find_spec(PEERS[name][0]) is not None


def _peer(name: str, params: list, top: nn.Module) -> Built:
    module, cls, _pin = PEERS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise RuntimeError(missing_message(name)) from None
    opt = getattr(mod, cls)(params)  # the published defaults
    if name == "schedulefree":
        opt.train()  # its README: train() before training steps, eval() before evaluation
        return Built(opt, False, f"schedulefree.{cls} (defaults)")
    if name == "ldog":  # its README: LDoG with polynomial-decay averaging, evaluated at the average
        return Built(opt, False, "dog.LDoG (defaults) + PolynomialDecayAverager", averager=mod.PolynomialDecayAverager(top))
    return Built(opt, False, f"{module}.{cls} (defaults)")

STATE_DTYPES = {"": None, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}
MASTER_MODES = {"": None, "false": False, "true": True, "kahan": "kahan", "8bit": "8bit", "stochastic": "stochastic"}
PRECISION_OPTIMIZERS = {"adam", "adamw", "adamw-nobc", "adamsls", "adamsls-auto", "salsa", "salsa-auto",
                        "salsa-every", "plasls", "plasls-paper", "plasls-auto", "svi", "svi-adam"}


def precision_kwargs(state_dtype: str = "", master_weights: str = "") -> dict:
    """RunConfig's text fields -> the ``state_dtype`` / ``master_weights`` keywords of our optimizers
    (empty: the optimizer's default, no keyword passed)."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype {state_dtype!r}: choose from {sorted(STATE_DTYPES)}")
    if master_weights not in MASTER_MODES:
        raise ValueError(f"master_weights {master_weights!r}: choose from {sorted(MASTER_MODES)}")
    out = {}
    if STATE_DTYPES[state_dtype] is not None:
        out["state_dtype"] = STATE_DTYPES[state_dtype]
    if MASTER_MODES[master_weights] is not None:
        out["master_weights"] = MASTER_MODES[master_weights]
    return out


def _decay_groups(top: nn.Module, weight_decay: float) -> list:
    """HF/Mosbach rule: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for n, p in top.named_parameters():
        if p.requires_grad:
            (no_decay if n.endswith("bias") or "LayerNorm" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _plasls_groups(full_model: nn.Module, n_groups: int) -> list:
    groups = sk.layer_groups(full_model, n_groups=n_groups)
    out = []
    for g in groups:
        params = g["params"] if isinstance(g, dict) else list(g)
        params = [p for p in params if p.requires_grad]
        if params:
            out.append(dict(g, params=params) if isinstance(g, dict) else params)
    return out


def build(name: str, top: nn.Module, full_model: nn.Module, *, lr: float, steps_per_epoch: int,
          weight_decay: float = 0.0, eps: float = 1e-8, momentum: float = 0.95,
          sls_batches_per_epoch: int = 500, plasls_groups: int = 10, backend: Optional[str] = None,
          precision: Optional[dict] = None) -> Built:
    """``precision``: ``state_dtype`` / ``master_weights`` keywords (``precision_kwargs``), for our
    Adam-family optimizers only (``PRECISION_OPTIMIZERS``); no torch stand-in is used with them."""
    params = [p for p in top.parameters() if p.requires_grad]
    kw = {} if backend is None else {"backend": backend}
    if precision:
        if name not in PRECISION_OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} takes no state_dtype/master_weights here; "
                             f"use one of {sorted(PRECISION_OPTIMIZERS)}")
        kw.update(precision)
    if name == "sgd":
        return Built(torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True), False, "torch.optim.SGD")
    if name in ("svi", "svi-adam"):
        if not (has("SVI") and hasattr(sk, "svi")):
            raise RuntimeError("svi_kernels.SVI / svi_kernels.svi.attach are not available yet")
        base = "sgd" if name == "svi" else "adam"
        opt = sk.SVI(params, lr=lr, momentum=momentum, nesterov=True, base=base, eps=eps, **kw)
        handle = sk.svi.attach(top)
        layers = [str(l) for l in getattr(handle, "layers", [])]
        return Built(opt, False, f"svi_kernels.SVI(base={base}) + svi.attach", handle,
                     notes=[f"SVI field on {len(layers)} layers: {', '.join(layers)}"])
    if name in ("adam", "adamw", "adamw-nobc"):
        groups = params if name == "adam" else _decay_groups(top, weight_decay)
        wd = 0.0 if name == "adam" else weight_decay
        correct = name != "adamw-nobc"
        why = "svi_kernels.AdamW missing"
        if has("AdamW"):
            try:
                opt = sk.AdamW(groups, lr=lr, eps=eps, weight_decay=wd, correct_bias=correct, **kw)
                return Built(opt, False, f"svi_kernels.AdamW(correct_bias={correct})")
            except Exception as exc:  # still being written: fall back, and say so in the results
                if precision:
                    raise
                why = f"svi_kernels.AdamW failed: {type(exc).__name__}: {exc}"
        if not correct:
            raise RuntimeError(f"adamw-nobc needs svi_kernels.AdamW(correct_bias=False) ({why})")
        return Built(torch.optim.AdamW(groups, lr=lr, eps=eps, weight_decay=wd), False,
                     "torch.optim.AdamW (stand-in)", notes=[why])
    if name in ("adamsls", "adamsls-auto"):
        if not has("AdamSLS"):
            raise RuntimeError("svi_kernels.AdamSLS is not available yet")
        search = "auto" if name == "adamsls-auto" else "every"
        opt = sk.AdamSLS(params, n_batches_per_epoch=sls_batches_per_epoch, init_step_size=0.1, c=0.1, search=search,
                         **kw)
        return Built(opt, True, "svi_kernels.AdamSLS" + ('(search="auto")' if search == "auto" else ""))
    if name in ("salsa", "salsa-auto", "salsa-every"):
        if not has("SaLSA"):
            raise RuntimeError("svi_kernels.SaLSA is not available yet")
        search = {"salsa": "salsa", "salsa-auto": "auto", "salsa-every": "every"}[name]
        return Built(sk.SaLSA(params, search=search, **kw), True, f'svi_kernels.SaLSA(search="{search}")')
    if name in PEERS:
        return _peer(name, params, top)
    if name in ("plasls", "plasls-paper", "plasls-auto"):
        if not (has("LayerwiseAdamSLS") and has("layer_groups")):
            raise RuntimeError("svi_kernels.LayerwiseAdamSLS / layer_groups are not available yet")
        groups = _plasls_groups(full_model, plasls_groups)
        criterion = "paper" if name == "plasls-paper" else "code"
        search = "auto" if name == "plasls-auto" else "every"
        opt = sk.LayerwiseAdamSLS(groups, n_batches_per_epoch=sls_batches_per_epoch, init_step_size=0.1, c=0.1,
                                  criterion=criterion, search=search, **kw)
        impl = "svi_kernels.LayerwiseAdamSLS" + ("(criterion=paper)" if criterion == "paper" else "") + \
            ('(search="auto")' if search == "auto" else "")
        return Built(opt, True, impl, notes=[f"{len(groups)} trained groups"])
    if name == "sgdsls":
        if not has("ArmijoSGD"):
            raise RuntimeError("svi_kernels.ArmijoSGD is not available yet")
        return Built(sk.ArmijoSGD(params, n_batches_per_epoch=sls_batches_per_epoch, **kw), True, "svi_kernels.ArmijoSGD")
    raise ValueError(f"unknown optimizer {name!r}; choose from {NAMES}")


def line_search_stats(opt: torch.optim.Optimizer) -> dict:
    """Counters the line-search optimizers keep in ``opt.state["ls"]`` (empty for others)."""
    ls = opt.state.get("ls") if isinstance(opt.state, dict) else None
    if not isinstance(ls, dict):
        return {}
    out = {}
    for k, v in ls.items():
        if isinstance(v, (int, float)):
            out[k] = v
        elif torch.is_tensor(v) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(e, (int, float)) for e in v):
            out[k] = list(v)
    return out
