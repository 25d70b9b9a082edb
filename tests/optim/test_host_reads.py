"""The line search reads device values back once for f0 and the reductions, then once per trial."""
import pytest
import torch

import svi_kernels as sk
from helpers import batch, tiny_mlp


@pytest.mark.parametrize("make", [
    lambda ps: sk.ArmijoSGD(ps, init_step_size=30.0),
    lambda ps: sk.AdamSLS(ps, init_step_size=30.0),
    lambda ps: sk.LayerwiseAdamSLS([{"params": ps[:2]}, {"params": ps[2:]}], warmup_steps=1, init_step_size=30.0),
], ids=["ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS"])
def test_one_read_per_trial(make, count_reads):
    model = tiny_mlp()
    opt = make(list(model.parameters()))
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        before_f = opt.n_forwards
        count_reads["n"] = 0
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        trials = opt.n_forwards - before_f - 1
        assert trials >= 1
        assert count_reads["n"] == 1 + trials, (count_reads["n"], trials)
