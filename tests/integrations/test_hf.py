"""transformers.Trainer with every optimizer, on a tiny random BERT classifier (no download, CPU)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import svi_kernels as sk

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from svi_kernels.integrations.hf import LineSearchTrainer, StepSizeSchedule, build_trainer  # noqa: E402

MAX_STEPS = 3
BATCH = 4
LINE_SEARCH = {"armijo_sgd": sk.ArmijoSGD, "adam_sls": sk.AdamSLS, "layerwise_adam_sls": sk.LayerwiseAdamSLS,
               "salsa": sk.SaLSA}


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n=12, seq=8, vocab=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.mask = torch.ones(n, seq, dtype=torch.long)
        self.mask[::3, -2:] = 0  # some padding
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def tiny_bert(dropout=0.1):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=BATCH, report_to=[],
                use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0, learning_rate=1e-3)
    base.update(kw)
    return TrainingArguments(**base)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def changed(model, before):
    return sum(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["adamw", "svi"])
def test_fused_optimizers_with_stock_trainer(tmp_path, name):
    model = tiny_bert()
    before = snapshot(model)
    trainer = build_trainer(model, targs(tmp_path), name, train_dataset=Synthetic())
    assert type(trainer) is Trainer
    out = trainer.train()
    inner = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer around ours
    assert isinstance(inner, sk.AdamW if name == "adamw" else sk.SVI)
    assert trainer.state.global_step == MAX_STEPS and math.isfinite(out.training_loss)
    assert changed(model, before) > 0
    if name == "svi":
        assert "bert.encoder.layer.0.intermediate.dense" in trainer.svi_handle.layers
        assert "bert.pooler.dense" in trainer.svi_handle.layers
        trainer.svi_handle.remove()
    # The Trainer's own grouping: biases and LayerNorm in a no-decay group.
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["weight_decay"] == 0.0


def test_adamw_passed_as_instance(tmp_path):
    model = tiny_bert()
    opt = sk.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = snapshot(model)
    Trainer(model=model, args=targs(tmp_path), train_dataset=Synthetic(), optimizers=(opt, sched)).train()
    assert changed(model, before) > 0
    assert all(float(opt.state[p]["step"]) == MAX_STEPS for p in model.parameters() if p in opt.state)


@pytest.mark.parametrize("name", list(LINE_SEARCH))
def test_line_search_trainer(tmp_path, name):
    model = tiny_bert()
    before = snapshot(model)
    trainer = build_trainer(model, targs(tmp_path, logging_strategy="steps", logging_steps=1), name,
                            {"init_step_size": 1.0} | ({"warmup_steps": 1} if name == "layerwise_adam_sls" else {}),
                            train_dataset=Synthetic())
    assert isinstance(trainer, LineSearchTrainer)
    out = trainer.train()
    opt = trainer.line_search_optimizer
    assert isinstance(opt, LINE_SEARCH[name])
    assert trainer.state.global_step == MAX_STEPS and math.isfinite(out.training_loss)
    assert opt.ls_state["step"] == MAX_STEPS
    assert opt.n_backwards == MAX_STEPS  # one backward per optimizer step, none from the Trainer
    assert opt.n_forwards >= 2 * MAX_STEPS  # each step tried at least one trial point
    assert changed(model, before) > 0
    if name != "salsa":  # SaLSA has no n_batches_per_epoch
        assert opt.defaults["n_batches_per_epoch"] == 3  # 12 examples / batch 4
    if name == "layerwise_adam_sls":
        assert len(opt.param_groups) == 4  # embeddings, layer 0, layer 1, head
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged and logged[-1] == opt.ls_state["step_sizes"][0]  # the logged "lr" is the step size


def test_line_search_trainer_matches_manual_loop(tmp_path):
    """The Trainer path is exactly one opt.step(closure) per batch, and clipping does not touch it."""
    model = tiny_bert(dropout=0.0)
    batches = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # the first evaluation of each step
            batches.append({k: v.clone() for k, v in kwargs.items()})

    model.register_forward_pre_hook(record, with_kwargs=True)
    opt = sk.AdamSLS(model.parameters(), n_batches_per_epoch=3)
    LineSearchTrainer(model=model, args=targs(tmp_path, max_grad_norm=1e-3), train_dataset=Synthetic(),
                      optimizers=(opt, None)).train()
    assert len(batches) == MAX_STEPS
    ref = tiny_bert(dropout=0.0)
    ref_opt = sk.AdamSLS(ref.parameters(), n_batches_per_epoch=3)
    for batch in batches:
        ref_opt.zero_grad()
        ref_opt.step(lambda: ref(**batch).loss)
    assert opt.ls_state == ref_opt.ls_state
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda ps: sk.AdamSLS(ps, n_batches_per_epoch=3), lambda ps: sk.SaLSA(ps)],
                         ids=["adam_sls", "salsa"])
def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch(tmp_path, make):
    """gradient_accumulation_steps=2 with batch 2: each optimizer step runs its closure over both
    micro-batches (every trial too) and equals one step on the 4 examples together."""
    model = tiny_bert(dropout=0.0).double()  # float64: the two reduction orders agree to rounding
    micro = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # first evaluations: one per micro-batch
            micro.append({k: v.clone() for k, v in kwargs.items()})

    model.register_forward_pre_hook(record, with_kwargs=True)
    opt = make(model.parameters())
    out = LineSearchTrainer(model=model, args=targs(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2),
                            train_dataset=Synthetic(), optimizers=(opt, None)).train()
    assert len(micro) == 2 * MAX_STEPS and opt.ls_state["step"] == MAX_STEPS
    ref = tiny_bert(dropout=0.0).double()
    ref_opt = make(ref.parameters())
    losses = []
    for a, b in zip(micro[::2], micro[1::2]):
        batch = {k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) and a[k].dim() else a[k] for k in a}
        ref_opt.zero_grad()
        losses.append(ref_opt.step(lambda: ref(**batch).loss).item())
    assert opt.ls_state["step_sizes"] == pytest.approx(ref_opt.ls_state["step_sizes"], rel=1e-9)
    assert opt.ls_state["n_forwards"] == ref_opt.ls_state["n_forwards"]
    for x, y in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)
    assert out.training_loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_checkpoint_resume_is_exact(tmp_path):
    """save_strategy checkpoints carry the line-search state: a resumed run ends bit-identical."""
    def run(resume=None, **kw):
        model = tiny_bert(dropout=0.0)
        opt = sk.AdamSLS(model.parameters(), n_batches_per_epoch=3)
        LineSearchTrainer(model=model, args=targs(tmp_path, max_steps=4, **kw), train_dataset=Synthetic(),
                          optimizers=(opt, None)).train(resume_from_checkpoint=resume)
        return model, opt

    full, full_opt = run(save_strategy="steps", save_steps=2)
    resumed, resumed_opt = run(resume=str(tmp_path / "checkpoint-2"), save_steps=2)
    assert resumed_opt.n_backwards == 4 and resumed_opt.ls_state["step"] == 4
    assert resumed_opt.ls_state["step_sizes"] == full_opt.ls_state["step_sizes"]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bf16_autocast(tmp_path):
    model = tiny_bert()
    seen = []
    model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = sk.AdamSLS(model.parameters(), n_batches_per_epoch=3)
    before = snapshot(model)
    trainer = LineSearchTrainer(model=model, args=targs(tmp_path, bf16=True), train_dataset=Synthetic(),
                                optimizers=(opt, None))
    out = trainer.train()
    assert torch.bfloat16 in seen  # the forwards (first and trials) ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert opt.n_backwards == MAX_STEPS and math.isfinite(out.training_loss)
    assert changed(model, before) > 0


def test_refusals(tmp_path):
    ds = Synthetic()
    model = tiny_bert()
    ls = sk.AdamSLS(model.parameters())
    with pytest.raises(ValueError, match="fp16 with a GradScaler"):
        LineSearchTrainer(model=model, args=targs(tmp_path, fp16=True), train_dataset=ds, optimizers=(ls, None))
    with pytest.raises(TypeError, match="line-search optimizers"):
        LineSearchTrainer(model=model, args=targs(tmp_path), train_dataset=ds,
                          optimizers=(sk.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="scheduler"):
        LineSearchTrainer(model=model, args=targs(tmp_path), train_dataset=ds,
                          optimizers=(ls, torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters()),
                                                                            lambda s: 1.0)))
    with pytest.raises(ValueError, match="needs a line-search optimizer"):
        LineSearchTrainer(model=model, args=targs(tmp_path), train_dataset=ds).train()
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_trainer(model, targs(tmp_path), "lamb", train_dataset=ds)


def test_step_without_closure_outside_training_step_still_fails(tmp_path):
    model = tiny_bert()
    trainer = LineSearchTrainer(model=model, args=targs(tmp_path), train_dataset=Synthetic(),
                                optimizers=(sk.ArmijoSGD(model.parameters()), None))
    assert isinstance(trainer.create_scheduler(3), StepSizeSchedule)
    with pytest.raises(RuntimeError, match="needs a closure"):
        trainer.optimizer.step()


def test_import_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import svi_kernels, svi_kernels.integrations as I\n"
            "try:\n    I.LineSearchTrainer\nexcept ImportError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: svi_kernels.integrations.hf needs transformers" in out.stdout
