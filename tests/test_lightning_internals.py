"""The Lightning internals GradGuard relies on (``callbacks/_lightning_internals.py``, checked on 2.6.x).

Each test checks both halves: the public API still cannot do it (else switch to it), and the internal still
works. A Lightning upgrade that changes either fails here, by name, instead of breaking resumes silently.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.callbacks._lightning_internals import (
    after_configure_model, checkpoint_path_in_setup, fit_dataloader, logging_muted,
)


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    return DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)


def _trainer(tmp_path, callbacks, **kw):
    return pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, default_root_dir=tmp_path, **kw)


class Seen(Callback):
    def __init__(self, read):
        self.read, self.seen = read, []

    def setup(self, trainer, pl_module, stage):
        self.seen.append(self.read(trainer, pl_module))


def test_checkpoint_path_in_setup(tmp_path):
    trainer = _trainer(tmp_path, [])
    trainer.fit(Tiny(), _loader())
    ckpt = tmp_path / "t.ckpt"
    trainer.save_checkpoint(ckpt)
    seen = Seen(lambda t, m: (t.ckpt_path, checkpoint_path_in_setup(t)))
    _trainer(tmp_path, [seen], enable_checkpointing=False).fit(Tiny(), _loader(), ckpt_path=ckpt)
    public, internal = seen.seen[0]
    assert public is None, "Lightning now sets trainer.ckpt_path before setup: use it, drop the frame read"
    assert internal == str(ckpt), "Trainer._run's ckpt_path is no longer readable during setup"
    fresh = Seen(lambda t, m: checkpoint_path_in_setup(t))
    _trainer(tmp_path, [fresh], enable_checkpointing=False).fit(Tiny(), _loader())
    assert fresh.seen == [None]


class Deferred(Tiny):
    def __init__(self):
        pl.LightningModule.__init__(self)
        self.net = None
        self.acted = False

    def configure_model(self):
        if self.net is None:
            self.net = nn.Linear(4, 2)

    def configure_optimizers(self):
        assert self.acted, "the action must run before configure_optimizers"
        return super().configure_optimizers()


def test_after_configure_model_runs_before_the_optimizer_and_removes_itself(tmp_path):
    def act(module):
        assert module.net is not None, "configure_model has not run yet"
        module.acted = True

    model = Deferred()
    wrap = Seen(lambda t, m: after_configure_model(m, lambda: act(m)))
    _trainer(tmp_path, [wrap], enable_checkpointing=False).fit(model, _loader())
    assert model.acted and "configure_model" not in model.__dict__


def test_logging_muted_lets_training_step_run_in_setup(tmp_path):
    def call_training_step(trainer, module, muted):
        batch = next(iter(_loader()))
        if not muted:
            with pytest.raises(MisconfigurationException):  # the internal is still needed
                module.training_step(batch, 0)
            return "raised"
        with logging_muted(module):
            module.training_step(batch, 0)
        assert "log" not in module.__dict__ and "log_dict" not in module.__dict__
        return "ran"

    plain = Seen(lambda t, m: call_training_step(t, m, muted=False))
    muted = Seen(lambda t, m: call_training_step(t, m, muted=True))
    _trainer(tmp_path, [plain, muted], enable_checkpointing=False).fit(Tiny(), _loader())
    assert plain.seen == ["raised"] and muted.seen == ["ran"]


def test_fit_dataloader_in_setup(tmp_path):
    loader = _loader()
    seen = Seen(lambda t, m: (t.train_dataloader, fit_dataloader(t)))
    _trainer(tmp_path, [seen], enable_checkpointing=False).fit(Tiny(), loader)
    public, internal = seen.seen[0]
    assert public is None, "Lightning now exposes trainer.train_dataloader in setup: use it"
    assert internal is loader, "trainer.fit_loop._data_source no longer holds the fit's loader during setup"
