"""Scenarios recorded with the release before in-place trials (issue 23) into tests/data/, and replayed
by tests/optim/test_release_fixtures.py against the current code.

``python tests/optim/ls_fixtures.py`` wrote tests/data/ls_release_0.1.0.pt.gz with svi_kernels 0.1.0 at
commit b03c53f (w0 and Adam's direction kept as buffers); it is not meant to be run again (the current
code would record its own points). Everything runs on the reference backend, float64 where trial points
are compared (so the comparison is of the algorithm, not of a backend's rounding).
"""
from __future__ import annotations

import copy
import gzip
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import svi_kernels as sk  # noqa: E402
from helpers import batch, tiny_mlp  # noqa: E402

PATH = os.path.join(os.path.dirname(__file__), "..", "data", "ls_release_0.1.0.pt.gz")
HIDDEN = 4  # tiny_mlp(hidden=4): 63 parameters, so the file stays small

# (name, factory(list of params split into groups) -> optimizer); the tiny MLP has 6 parameters.
CHECKPOINTED = {
    "ArmijoSGD": lambda ps: sk.ArmijoSGD(ps, n_batches_per_epoch=3, init_step_size=4.0, backend="reference"),
    "AdamSLS": lambda ps: sk.AdamSLS(ps, n_batches_per_epoch=3, init_step_size=1.0, backend="reference"),
    "SaLSA": lambda ps: sk.SaLSA(ps, backend="reference"),
    "LayerwiseAdamSLS": lambda ps: sk.LayerwiseAdamSLS(
        [{"params": ps[:2]}, {"params": ps[2:4]}, {"params": ps[4:]}], warmup_steps=2, init_step_size=1.0,
        backend="reference"),
}
CHECKPOINT_AT, STEPS_AFTER = 3, 3


def mlp_steps(model, opt, start, steps):
    for i in range(start, start + steps):
        x, y = batch(seed=i)
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))


def record_checkpoint(name):
    """{model, optimizer}: state dicts after CHECKPOINT_AT steps; after: the parameters STEPS_AFTER steps later."""
    model = tiny_mlp(hidden=HIDDEN)
    opt = CHECKPOINTED[name](list(model.parameters()))
    mlp_steps(model, opt, 0, CHECKPOINT_AT)
    out = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
    mlp_steps(model, opt, CHECKPOINT_AT, STEPS_AFTER)
    out["after"] = [p.detach().clone() for p in model.parameters()]
    out["ls_state_after"] = copy.deepcopy(opt.ls_state)
    return out


def coupled_problem(seed=0, sizes=(4, 3, 5), n=30):
    """A least-squares loss that couples the groups: moving one group changes the others' best step."""
    gen = torch.Generator().manual_seed(seed)
    d = sum(sizes)
    A = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    ps = [torch.nn.Parameter(torch.randn(m, generator=gen, dtype=torch.float64)) for m in sizes]

    def f(ws):
        r = A @ torch.cat(list(ws)) - b
        return 0.5 * (r @ r) / n
    return ps, f


# Trial points of every line search on the coupled problem (PLASLS: each criterion and strategy).
TRIALED = {
    "ArmijoSGD": lambda ps, **kw: sk.ArmijoSGD(ps, init_step_size=4.0, **kw),
    "AdamSLS": lambda ps, **kw: sk.AdamSLS(ps, init_step_size=2.0, **kw),
    "SaLSA": lambda ps, **kw: sk.SaLSA(ps, init_step_size=2.0, **kw),
    "SaLSA-momentum": lambda ps, **kw: sk.SaLSA(ps, init_step_size=2.0, momentum_direction=True, **kw),
}
for _crit in ("code", "paper"):
    for _strat in ("cycle", "all"):
        TRIALED[f"LayerwiseAdamSLS-{_crit}-{_strat}"] = (
            lambda ps, _c=_crit, _s=_strat, **kw: sk.LayerwiseAdamSLS(
                [{"params": [p]} for p in ps], warmup_steps=1, init_step_size=2.0, criterion=_c, strategy=_s, **kw))
TRIAL_STEPS = 5


def record_trials(name, **kw):
    """Per step: the parameters at every trial forward (concatenated, one row per trial), and after the step."""
    ps, f = coupled_problem(seed=4)
    opt = TRIALED[name](ps, backend="reference", **kw)
    steps = []
    for _ in range(TRIAL_STEPS):
        trials = []

        def closure():
            if not torch.is_grad_enabled():
                trials.append(torch.cat([p.detach().clone() for p in ps]))
            return f(ps)
        opt.zero_grad()
        opt.step(closure)
        steps.append({"trials": torch.stack(trials) if trials else torch.zeros(0, 12, dtype=torch.float64),
                      "after": torch.cat([p.detach().clone() for p in ps]),
                      "step_sizes": list(opt.ls_state["step_sizes"])})
    return steps


def load():
    with gzip.open(PATH, "rb") as fh:
        return torch.load(fh, weights_only=False)


def record_all():
    return {"checkpoints": {name: record_checkpoint(name) for name in CHECKPOINTED},
            "trials": {name: record_trials(name) for name in TRIALED}}


if __name__ == "__main__":
    with gzip.open(PATH, "wb") as fh:
        torch.save(record_all(), fh, _use_new_zipfile_serialization=False)
    print(PATH, os.path.getsize(PATH), "bytes")
