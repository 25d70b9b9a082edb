"""PyTorch Lightning with every line search: a real Trainer (CPU, automatic optimization, no mocks) calls
``optimizer.step(closure)`` with its closure (training_step, zero_grad, backward: torch's convention).
Each fit takes the steps of a plain loop to the bit, with gradient clipping too, and a fit resumed from
a checkpoint ends where an uninterrupted one does. The module below is the one docs/production.md shows."""
from __future__ import annotations

import inspect
import pathlib
import warnings

import pytest
import torch

import svi_kernels as sk

pl = pytest.importorskip("pytorch_lightning")

LINE_SEARCHES = {"ArmijoSGD": sk.ArmijoSGD, "AdamSLS": sk.AdamSLS, "SaLSA": sk.SaLSA,
                 "LayerwiseAdamSLS": sk.LayerwiseAdamSLS}
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "production.md"


# --- docs/production.md, "PyTorch Lightning" (kept identical by test_docs_show_this_code) ---
class Regression(pl.LightningModule):
    def __init__(self, optimizer_cls=sk.AdamSLS, **optimizer_kwargs):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.optimizer_cls, self.optimizer_kwargs = optimizer_cls, optimizer_kwargs

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        # Lightning calls optimizer.step(closure) with a closure that runs training_step, zero_grad
        # and backward; the line search evaluates it again (without backward) at its trial points.
        return self.optimizer_cls(self.parameters(), **self.optimizer_kwargs)


def fit(module, data, max_epochs, root, gradient_clip_val=None, ckpt_path=None):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, gradient_clip_val=gradient_clip_val,
                         default_root_dir=root, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer
# --- end of the docs' code ---


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())


def _module(name):
    torch.manual_seed(0)
    return Regression(LINE_SEARCHES[name], init_step_size=2.0)  # large: the searches backtrack


def _plain_loop(name, epochs, clip=None):
    """The same steps without Lightning: closure(backwards) with the clipping Lightning does."""
    module = _module(name)
    opt = module.configure_optimizers()
    for _ in range(epochs):
        for x, y in torch.utils.data.DataLoader(_data(), batch_size=8):
            def closure(backwards=False):
                if backwards:
                    opt.zero_grad()
                loss = module.training_step((x, y), 0)
                if backwards:
                    loss.backward()
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
                return loss
            opt.step(closure)
    return module, opt


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        yield


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("name", list(LINE_SEARCHES))
def test_fit_takes_the_plain_loops_steps(name, clip, tmp_path):
    module = _module(name)
    trainer = fit(module, _data(), max_epochs=2, root=tmp_path, gradient_clip_val=clip)
    ls = trainer.optimizers[0].ls_state
    assert ls["step"] == 6 and ls["n_backwards"] == 6  # one backward a step: trials pay none
    assert ls["n_forwards"] > 6  # trials ran
    plain, plain_opt = _plain_loop(name, epochs=2, clip=clip)
    assert _same(module, plain)
    assert ls["step_sizes"] == plain_opt.ls_state["step_sizes"]
    if clip is not None:  # the clipping took effect
        assert not _same(module, _plain_loop(name, epochs=2)[0])


@pytest.mark.parametrize("name", list(LINE_SEARCHES))
def test_checkpoint_resume_ends_where_an_uninterrupted_fit_does(name, tmp_path):
    straight = _module(name)
    fit(straight, _data(), max_epochs=2, root=tmp_path / "straight")
    first = _module(name)
    trainer = fit(first, _data(), max_epochs=1, root=tmp_path / "first")
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _module(name)
    trainer = fit(resumed, _data(), max_epochs=2, root=tmp_path / "resumed", ckpt_path=ckpt)
    assert trainer.optimizers[0].ls_state["step"] == 6
    assert _same(resumed, straight)
    assert not _same(resumed, first)


@pytest.mark.parametrize("name", list(LINE_SEARCHES))
def test_fit_under_bf16_mixed(name, tmp_path):
    """precision="bf16-mixed" (autocast around training_step, no GradScaler): fits, one backward a step."""
    module = _module(name)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="bf16-mixed", default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_data(), batch_size=8))
    ls = trainer.optimizers[0].ls_state
    assert ls["step"] == ls["n_backwards"] == 3 and ls["n_forwards"] > 3
    assert not _same(module, _module(name))


@pytest.mark.skipif(not DOCS.exists(), reason="docs/ is not beside these tests (the wheel check copies tests/ alone)")
def test_docs_show_this_code():
    text = DOCS.read_text()
    for obj in (Regression, fit):
        assert inspect.getsource(obj) in text
