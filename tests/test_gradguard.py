"""GradGuard: the probe leaves everything as it found it, each decision rule fires when its measurement says
so and not otherwise, the remedies reach the real model, and checkpoints resume without a new probe."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_gradguard
from lightning_gradguard import GradGuard, GradientMonitor, Normalized
from lightning_gradguard.callbacks.gradguard import _loss_of
from lightning_gradguard.demo import DeepMLP, DigitsDataModule, SequenceDataModule, SyntheticDataModule, VanillaRNN
from lightning_gradguard.probe import probe
from tests.helpers import load_events, read_texts


def _trainer(tmp_path, callbacks, **kw):
    opts = dict(max_epochs=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"), enable_progress_bar=False,
                enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    opts.update(kw)
    return pl.Trainer(**opts)


def _decisions(gg):
    return {d.remedy: d.status for d in gg.decisions}


class WithBN(DeepMLP):
    def __init__(self):
        super().__init__(input_shape=[16], num_classes=4, depth=3, width=16, batchnorm=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(F.dropout(self(x), 0.5, self.training), y)


def test_probe_restores_weights_bn_stats_grads_and_rng():
    model = WithBN()
    dm = SyntheticDataModule(num_samples=128, input_shape=[16])
    dm.setup()
    batches = [b for _, b in zip(range(3), dm.train_dataloader())]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    result = probe(model, batches, _loss_of)
    assert len(result.losses) == 3 and result.flow_ratio > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats included
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_healthy_model_gets_a_remedy_only_beyond_noise(tmp_path):
    from lightning_gradguard.doctor import beats

    pl.seed_everything(0, verbose=False)
    gg = GradGuard(monitor=False, verbose=False, budget_steps=40)
    model = DeepMLP()
    _trainer(tmp_path, [gg], max_steps=2).fit(model, datamodule=DigitsDataModule())
    d = _decisions(gg)
    assert d["clipping"] == "not applied"
    assert gg.cost_steps <= 40  # the budget, in passes
    race = {r.name: r for r in gg.diagnosis.race}
    ref = race["no remedy"]
    if gg.diagnosis.winner != "no remedy":  # do no harm: applied only for a held-out gain beyond noise
        win = race[gg.diagnosis.winner]
        steps = max(s for s in win.steps if s in ref.steps and s > 0)
        assert beats(win.scores[win.steps.index(steps)], ref.scores[ref.steps.index(steps)], 2.0, 0.02)
    assert any(isinstance(m, Normalized) for m in model.modules()) == ("batchnorm" in gg.remedies)


def test_deep_sigmoid_fires_batchnorm_and_activation_rules_and_fixes_it(tmp_path):
    pl.seed_everything(0, verbose=False)
    gg = GradGuard(verbose=False, budget_steps=40)
    model = DeepMLP(depth=20, activation="sigmoid")
    trainer = _trainer(tmp_path, [gg], max_epochs=5)
    trainer.fit(model, datamodule=DigitsDataModule())
    rows = {d.remedy: d for d in gg.decisions}
    assert "flow ratio" in rows["batchnorm"].measurement and rows["batchnorm"].status == "applied"
    assert any(isinstance(m, Normalized) for m in model.modules())  # applied to the real model
    acc = trainer.test(model, datamodule=DigitsDataModule(), verbose=False)[0]["test/acc"]
    assert acc >= 0.85, acc
    texts = read_texts(load_events(trainer.logger.log_dir), "gradguard/decisions")
    assert texts and "batchnorm" in texts[0] and "probe and trials" in texts[0] and "held-out loss after steps" in texts[0]
    assert texts[0].startswith("| remedy | decision | measurement |")  # markdown: TensorBoard renders a table
    init_row = next(d.measurement for d in gg.decisions if d.remedy == "init")
    assert "winner" in init_row or "chosen" in init_row  # says why, not only the losses
    assert any(t.startswith("grad_norm/") for t in load_events(trainer.logger.log_dir).Tags()["scalars"])  # its monitor


def test_conservative_only_suggests(tmp_path):
    pl.seed_everything(0, verbose=False)
    gg = GradGuard(architecture_changes=False, monitor=False, verbose=False, budget_steps=40)
    model = DeepMLP(depth=20, activation="sigmoid")
    _trainer(tmp_path, [gg], max_steps=1).fit(model, datamodule=DigitsDataModule())
    statuses = _decisions(gg)
    assert statuses["batchnorm"].startswith("suggested") or statuses["activation"].startswith("suggested")
    assert not any(isinstance(m, Normalized) for m in model.modules())
    assert any(isinstance(m, nn.Sigmoid) for m in model.modules())


def test_dead_relu_rule(tmp_path):
    model = DeepMLP(input_shape=[16], num_classes=4, depth=3, width=16)
    with torch.no_grad():
        model.net[3].bias.fill_(-50.0)
    gg = GradGuard(init="off", batchnorm="off", monitor=False, verbose=False)
    _trainer(tmp_path, [gg], max_steps=1).fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    row = next(d for d in gg.decisions if d.remedy == "activation")
    assert "dead units 100%" in row.measurement
    assert _decisions(gg)["init"] == "off"


def test_recurrent_model_gets_clipping(tmp_path):
    pl.seed_everything(0, verbose=False)
    gg = GradGuard(monitor=False, verbose=False, trial_steps=8)
    _trainer(tmp_path, [gg], max_steps=2).fit(VanillaRNN(), datamodule=SequenceDataModule(num_samples=512))
    row = next(d for d in gg.decisions if d.remedy == "clipping")
    assert row.status == "applied" and "recurrent layer" in row.measurement
    assert "clipping" in gg.subs


def test_off_and_force_modes(tmp_path):
    gg = GradGuard(init="off", batchnorm="force", activation="off", clipping="force", monitor=False, verbose=False)
    model = DeepMLP(input_shape=[16], num_classes=4, depth=2, width=8)
    _trainer(tmp_path, [gg], max_steps=1).fit(model, datamodule=SyntheticDataModule(num_samples=128, input_shape=[16]))
    d = _decisions(gg)
    assert d["init"] == "off" and d["activation"] == "off" and d["batchnorm"] == "forced" and d["clipping"] == "forced"
    assert any(isinstance(m, Normalized) for m in model.modules())


def test_existing_monitor_is_not_duplicated(tmp_path):
    gg = GradGuard(verbose=False)
    _trainer(tmp_path, [GradientMonitor(), gg], max_steps=1).fit(
        DeepMLP(input_shape=[16], num_classes=4, depth=1, width=8), datamodule=SyntheticDataModule(num_samples=64, input_shape=[16]))
    assert "monitor" not in gg.subs and _decisions(gg)["monitor"] == "already on the Trainer"


class RestoringMLP(DeepMLP):
    def on_load_checkpoint(self, checkpoint):
        lightning_gradguard.restore(self, checkpoint)


def test_checkpoint_resume_reapplies_decisions_without_probing(tmp_path):
    pl.seed_everything(0, verbose=False)
    gg = GradGuard(monitor=False, verbose=False)
    model = RestoringMLP(depth=20, activation="sigmoid")
    trainer = _trainer(tmp_path, [gg], max_epochs=1)
    trainer.fit(model, datamodule=DigitsDataModule())
    ckpt = tmp_path / "g.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    resumed_gg = GradGuard(monitor=False, verbose=False)
    resumed = RestoringMLP(depth=20, activation="sigmoid")
    trainer2 = _trainer(tmp_path, [resumed_gg], max_epochs=1)
    trainer2.fit(resumed, datamodule=DigitsDataModule(), ckpt_path=ckpt)
    assert resumed_gg.cost_steps == 0  # no probe, no trial
    assert resumed_gg.remedies == gg.remedies
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in resumed.state_dict().items())
    loaded = RestoringMLP.load_from_checkpoint(ckpt)
    assert list(loaded.state_dict()) == list(saved["state_dict"])


class Manual(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_manual_optimization_is_not_probed(tmp_path):
    gg = GradGuard(monitor=False, verbose=False)
    _trainer(tmp_path, [gg], max_steps=2).fit(Manual(), datamodule=SyntheticDataModule(num_samples=64, input_shape=[16]))
    d = {x.remedy: x for x in gg.decisions}
    assert d["init"].status == "applied" and "manual optimization" in d["init"].measurement
    assert d["batchnorm"].status == "not probed"




@pytest.mark.parametrize("preset", ["auto", "conservative", "off"])
def test_presets(compose_cfg, preset):
    cfg = compose_cfg([f"gradguard={preset}"])
    gg = instantiate(cfg.callbacks.gradguard)
    assert isinstance(gg, GradGuard)
    assert gg.architecture_changes == (preset != "conservative")
    assert (gg.modes["init"] == "off") == (preset == "off")


def test_exploding_norm_rule_turns_clipping_on_and_not_otherwise(tmp_path):
    pl.seed_everything(0, verbose=False)
    gg = GradGuard(monitor=False, verbose=False, trial_steps=8, init="off", batchnorm="off", activation="off")
    bad = DeepMLP(input_shape=[16], num_classes=4, depth=8, width=64, init_std=1.0)  # N(0, 1): norms explode
    _trainer(tmp_path, [gg], max_steps=1).fit(bad, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    row = next(d for d in gg.decisions if d.remedy == "clipping")
    assert row.status == "applied" and "> 1000" in row.measurement, row
    calm = GradGuard(monitor=False, verbose=False, trial_steps=8, init="off", batchnorm="off", activation="off")
    _trainer(tmp_path, [calm], max_steps=1).fit(DeepMLP(input_shape=[16], num_classes=4, depth=2, width=16),
                                                datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    assert _decisions(calm)["clipping"] == "not applied"


def test_every_hook_a_sub_callback_implements_is_forwarded():
    from lightning.pytorch.callbacks import Callback

    from lightning_gradguard import ActivationReplacement, BatchNormInsertion, GradientClipping, WeightInitialization

    hooks = [n for n in vars(Callback) if not n.startswith("_") and callable(getattr(Callback, n))]
    subs = (ActivationReplacement, BatchNormInsertion, GradientClipping, GradientMonitor, WeightInitialization)
    used = {h for h in hooks for cls in subs if getattr(cls, h) is not getattr(Callback, h)}
    assert {"setup", "on_before_optimizer_step", "teardown", "on_exception"} <= used
    assert [h for h in sorted(used) if getattr(GradGuard, h) is getattr(Callback, h)] == []


class CrashesOnStep(DeepMLP):
    def on_train_batch_start(self, batch, batch_idx):  # runs after the callbacks' on_train_batch_start
        assert any(m._forward_hooks for m in self.modules()), "the monitor attaches hooks on a logging step"
        raise RuntimeError("boom")


def test_a_crash_reaches_the_monitor_through_gradguard_and_its_hooks_are_removed(tmp_path):
    gg = GradGuard(init="off", batchnorm="off", activation="off", clipping="off", probe_batches=1, trial_steps=4,
                   verbose=False)
    model = CrashesOnStep(input_shape=[16], num_classes=4, depth=2, width=8)
    with pytest.raises(RuntimeError, match="boom"):  # raised while the monitor's forward hooks are attached
        _trainer(tmp_path, [gg], max_steps=2).fit(model, datamodule=SyntheticDataModule(num_samples=64, input_shape=[16]))
    assert "monitor" in gg.subs
    assert not any(m._forward_hooks for m in model.modules())


def test_logger_false_works_and_prints_the_table(tmp_path, capsys):
    gg = GradGuard(budget_steps=20, probe_batches=1, trial_steps=4)  # monitor=True by default
    model = DeepMLP(input_shape=[16], num_classes=4, depth=3, width=16)
    _trainer(tmp_path, [gg], max_steps=2, logger=False).fit(model, datamodule=SyntheticDataModule(num_samples=128, input_shape=[16]))
    d = {x.remedy: x for x in gg.decisions}
    assert d["monitor"].status == "not applied" and "no logger" in d["monitor"].measurement
    assert "monitor" not in gg.subs


def test_budget_fraction_counts_the_fit_steps_and_is_enforced(tmp_path):
    pl.seed_everything(0, verbose=False)
    gg = GradGuard(monitor=False, verbose=False, budget_fraction=0.5)
    model = DeepMLP(input_shape=[16], num_classes=4, depth=6, width=16, activation="tanh")
    _trainer(tmp_path, [gg], max_steps=60).fit(model, datamodule=SyntheticDataModule(num_samples=512, input_shape=[16]))
    assert gg.budget_rule.startswith("0.5 × 60 fit steps")
    assert 0 < gg.cost_steps <= 30  # probe + every trial pass, within 0.5 × 60
    raced = [r for r in gg.diagnosis.race if len(r.scores) > 1]
    assert len(raced) >= 2 and raced[0].name == "no remedy"  # the reference is always raced


class _Untraceable(nn.Module):
    """fx cannot trace it (data-dependent branch): find_layers falls back to module order."""

    def __init__(self):
        super().__init__()
        self.lora_a, self.b = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.lora_a(x)
        return self.b(torch.relu(h) if h.sum() > 0 else h)


class _Missed(nn.Module):
    """Layers tracing does not see (MultiheadAttention's out_proj), one never called, a tied pair."""

    def __init__(self):
        super().__init__()
        self.emb, self.attn = nn.Embedding(10, 8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.unused, self.lora_head = nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.lora_head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.lora_head(self.attn(h, h, h)[0])


@pytest.mark.parametrize("model", [_Untraceable(), _Missed(), nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))])
def test_kept_layers_need_no_trace_the_weighted_submodules_are_what_find_layers_lists(model):
    """GradGuard asks kept_layers about every weighted submodule instead of tracing the model (find_layers): the
    same layers (those tracing misses are added after it), so the same answer."""
    from lightning_gradguard.callbacks.gradguard import weighted_submodules
    from lightning_gradguard.graph import find_layers
    from lightning_gradguard.init import kept_layers

    traced = find_layers(model)
    listed = weighted_submodules(model)
    assert sorted(i.name for i in traced) == sorted(i.name for i in listed)
    if not isinstance(model, nn.Sequential):  # the paths besides fx: the module-order fallback, layers tracing missed
        assert "modules" in {i.source for i in traced}
    assert kept_layers(model, traced) == kept_layers(model, listed)


class _AdaptersOnly(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lora_a, self.lora_b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.lora_b(torch.tanh(self.lora_a(x)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_init_is_not_tried_when_every_layer_keeps_its_weights(tmp_path):
    pl.seed_everything(0, verbose=False)
    gg = GradGuard(verbose=False, monitor=False, budget_steps=30)
    model = _AdaptersOnly()
    _trainer(tmp_path, [gg], max_steps=1, logger=False).fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    init = next(d for d in gg.decisions if d.remedy == "init")
    assert init.status == "not applied" and "all 2 layers hold loaded, trained or adapter weights" in init.measurement
    assert all("init" not in r.remedies for r in gg.diagnosis.race)
    assert "init" not in gg.remedies
