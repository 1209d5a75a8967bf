"""GradientMonitor: values read back from real event files against direct computation, fault injection,
accumulation / bf16 / several optimizers, other loggers, presets and bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_gradguard import GradientMonitor
from lightning_gradguard.demo import DeepMLP, DigitsDataModule, SyntheticDataModule
from lightning_gradguard.report import finding_lines
from tests.helpers import load_events, read_texts


def _trainer(tmp_path, callbacks, logger=True, **kw):
    opts = dict(
        max_steps=3, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks, log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="tb") if logger is True else logger,
    )
    opts.update(kw)
    return pl.Trainer(**opts)


def _scalar(events, tag, step):
    return next(e.value for e in events.Scalars(tag) if e.step == step)


class Recorder(pl.Callback):
    """Keeps the gradients and weights the optimizer step uses, and the weights after it (ground truth)."""

    def __init__(self):
        self.grads, self.before, self.after = {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        s = trainer.global_step
        self.grads[s] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        self.before[s] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class HalfDead(DeepMLP):
    """The first hidden ReLU layer gets a large negative bias on half of its units: those units are dead."""

    def __init__(self, **kw):
        super().__init__(input_shape=[16], num_classes=4, depth=2, width=8, **kw)
        with torch.no_grad():
            self.net[1].bias[:4] = -100.0


def test_scalars_match_direct_computation(tmp_path):
    rec = Recorder()
    model = HalfDead(lr=0.1)
    trainer = _trainer(tmp_path, [GradientMonitor(memory_fraction=1.0), rec])  # every layer's update ratio each step
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    events = load_events(trainer.logger.log_dir)
    for step in (0, 1, 2):
        for layer in ("net.1", "net.3", "net.5"):
            g = torch.cat([rec.grads[step][f"{layer}.weight"].flatten(), rec.grads[step][f"{layer}.bias"].flatten()])
            w0 = torch.cat([rec.before[step][f"{layer}.weight"].flatten(), rec.before[step][f"{layer}.bias"].flatten()])
            w1 = torch.cat([rec.after[step][f"{layer}.weight"].flatten(), rec.after[step][f"{layer}.bias"].flatten()])
            assert _scalar(events, f"grad_norm/{layer}", step) == pytest.approx(g.norm().item(), rel=1e-5)
            # float32 sums: a mean that cancels to ~1e-10 (the output layer's) is only known to float32 rounding of
            # its terms' magnitudes, whatever the order of summation
            f32 = 4 * torch.finfo(torch.float32).eps * g.abs().mean().item()
            assert _scalar(events, f"grad_mean/{layer}", step) == pytest.approx(g.mean().item(), rel=1e-4, abs=f32)
            assert _scalar(events, f"grad_std/{layer}", step) == pytest.approx(g.std(unbiased=False).item(), rel=1e-4)
            assert _scalar(events, f"grad_max/{layer}", step) == pytest.approx(g.abs().max().item(), rel=1e-6)
            assert _scalar(events, f"grad_zero_frac/{layer}", step) == pytest.approx((g == 0).float().mean().item())
            assert _scalar(events, f"weight_norm/{layer}", step) == pytest.approx(w1.norm().item(), rel=1e-5)
            ratio = ((w1 - w0).norm() / w0.norm()).item()
            assert _scalar(events, f"update_ratio/{layer}", step) == pytest.approx(ratio, rel=1e-4)
        assert _scalar(events, "act_dead_frac/net.1", step) == 0.5
    # dead units have exactly-zero weight gradients: 4 of 8 rows of net.1 plus 4 of 8 bias entries
    assert _scalar(events, "grad_zero_frac/net.1", 0) >= 0.5
    total = math.sqrt(sum(_scalar(events, f"grad_norm/{l}", 0) ** 2 for l in ("net.1", "net.3", "net.5")))
    assert _scalar(events, "gradguard/grad_norm_total", 0) == pytest.approx(total, rel=1e-5)
    flow = _scalar(events, "grad_norm/net.1", 0) / _scalar(events, "grad_norm/net.5", 0)
    assert _scalar(events, "gradguard/flow_ratio", 0) == pytest.approx(flow, rel=1e-5)
    assert "custom_scalars__config__" in events.Tags()["tensors"]


def _findings(trainer):
    """The findings written as markdown rows, read back as ``[kind] step N: message`` lines."""
    return finding_lines(read_texts(load_events(trainer.logger.log_dir), "gradguard/findings"))


def test_deep_sigmoid_mlp_reports_vanishing_at_a_low_layer(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = DeepMLP(depth=20, activation="sigmoid")
    trainer = _trainer(tmp_path, [GradientMonitor(log_every_n_steps=2, patience=2)], max_steps=6)
    with pytest.warns(UserWarning, match=r"Linear 128→128, after sigmoid\).*vanishing gradients: the norm collapses at depth"):
        trainer.fit(model, datamodule=DigitsDataModule())
    texts = _findings(trainer)
    assert len(texts) == 1 and "[vanishing]" in texts[0], texts  # hysteresis: reported once
    # the depth named is where the norm first falls below 1e-3 of the output side's, counted from the input
    depth = int(texts[0].split("collapses at depth ")[1].split(" ")[0])
    assert 5 <= depth <= 19 and f"layer `net.{2 * depth - 1}`" in texts[0]


def test_scaled_up_init_reports_exploding(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = DeepMLP(input_shape=[16], num_classes=4, depth=6, width=64, lr=1e-6)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(8.0)
    trainer = _trainer(tmp_path, [GradientMonitor(patience=2, warn=False)], max_steps=4)
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    texts = _findings(trainer)
    assert any("[exploding]" in t and "exploding gradients" in t for t in texts), texts


class NaNInBackward(DeepMLP):
    """At step 2, layer net.3's backward produces NaN (a hook on its output gradient)."""

    def forward(self, x):
        h = self.net[0](x)
        for i, layer in enumerate(self.net[1:], start=1):
            h = layer(h)
            if i == 3 and self.training and self.trainer.global_step == 2 and h.requires_grad:
                h.register_hook(lambda g: g * float("nan"))
        return h


@pytest.mark.parametrize("check, every", [("every_step", 4), ("auto", 4), ("logging_steps", 1)])
def test_nan_in_one_layers_backward_names_that_layer(tmp_path, check, every):
    model = NaNInBackward(input_shape=[16], num_classes=4, depth=3, width=8, lr=1e-9)
    trainer = _trainer(tmp_path, [GradientMonitor(log_every_n_steps=every, nonfinite_check=check, warn=False)],
                       max_steps=5)
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    texts = [t for t in _findings(trainer) if "[nonfinite]" in t]
    assert len(texts) == 1, _findings(trainer)
    assert "step 2: layer `net.3`" in texts[0]


def test_relu_with_large_negative_bias_reports_dead_relu(tmp_path):
    model = DeepMLP(input_shape=[16], num_classes=4, depth=2, width=8, lr=1e-9)
    with torch.no_grad():
        model.net[3].bias.fill_(-100.0)
    trainer = _trainer(tmp_path, [GradientMonitor(patience=2, warn=False)], max_steps=3)
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    texts = _findings(trainer)
    assert any("[dead_relu]" in t and "net.3" in t and "100% of its units are dead" in t for t in texts), texts


def test_healthy_shallow_net_reports_nothing(tmp_path):
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, [GradientMonitor(patience=2)], max_epochs=3, max_steps=-1)
    trainer.fit(DeepMLP(), datamodule=DigitsDataModule())
    assert _findings(trainer) == []
    summary = read_texts(load_events(trainer.logger.log_dir), "gradguard/summary")
    assert summary and "no gradient problems found" in summary[0]
    events = load_events(trainer.logger.log_dir)
    assert events.Images("gradguard/gradient_flow")  # the end-of-fit picture
    assert any(t.startswith("hist_grad/") for t in events.Tags()["histograms"])


def test_accumulation_logs_once_per_optimizer_step(tmp_path):
    trainer = _trainer(tmp_path, [GradientMonitor(log_every_n_steps=2)], max_steps=6, accumulate_grad_batches=3)
    model = DeepMLP(input_shape=[16], num_classes=4, depth=2, width=8)
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=1024, input_shape=[16]))
    events = load_events(trainer.logger.log_dir)
    assert [e.step for e in events.Scalars("grad_norm/net.1")] == [0, 2, 4]
    assert not any(m._forward_hooks for m in model.modules())  # hooks only around logging steps


def test_bf16_mixed(tmp_path):
    trainer = _trainer(tmp_path, [GradientMonitor()], precision="bf16-mixed")
    trainer.fit(DeepMLP(input_shape=[16], num_classes=4, depth=2, width=8),
                datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    values = [e.value for e in load_events(trainer.logger.log_dir).Scalars("grad_norm/net.1")]
    assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)


class TwoOptimizers(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self.b(torch.relu(self.a(x))), y))
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


def test_several_optimizers(tmp_path):
    trainer = _trainer(tmp_path, [GradientMonitor()], max_steps=4)
    trainer.fit(TwoOptimizers(), datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    events = load_events(trainer.logger.log_dir)
    assert events.Scalars("grad_norm/a") and events.Scalars("grad_norm/b")
    assert events.Scalars("update_ratio/a")[0].value > 0 and events.Scalars("update_ratio/b")[0].value > 0


def test_csv_logger_gets_the_scalars_and_no_tensorboard_is_fine(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [GradientMonitor(histogram_every_n_steps=1, figure_every_n_steps=1)], logger=logger)
    trainer.fit(DeepMLP(input_shape=[16], num_classes=4, depth=2, width=8),
                datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert any(r.get("grad_norm/net.1") for r in rows)


def test_refuses_a_trainer_without_logger(tmp_path):
    trainer = _trainer(tmp_path, [GradientMonitor()], logger=False)
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer.fit(DeepMLP(input_shape=[16], num_classes=4, depth=1, width=4),
                    datamodule=SyntheticDataModule(num_samples=64, input_shape=[16]))


def test_detector_state_survives_checkpoint(tmp_path):
    pl.seed_everything(0, verbose=False)
    monitor = GradientMonitor(patience=1, warn=False)
    trainer = _trainer(tmp_path, [monitor], max_steps=2)
    trainer.fit(DeepMLP(depth=20, activation="sigmoid"), datamodule=DigitsDataModule())
    assert monitor.detector.findings
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = GradientMonitor(patience=1, warn=False)
    trainer2 = _trainer(tmp_path, [resumed], max_steps=3)
    trainer2.fit(DeepMLP(depth=20, activation="sigmoid"), datamodule=DigitsDataModule(), ckpt_path=ckpt)
    assert resumed.detector.findings[0].as_dict() == monitor.detector.findings[0].as_dict()
    assert len([f for f in resumed.detector.findings if f.kind == "vanishing"]) == 1  # no repeat after resume


@pytest.mark.parametrize("preset", ["minimal", "default", "full"])
def test_presets_compose(compose_cfg, preset):
    cfg = compose_cfg([f"gradguard/monitor={preset}"])
    assert isinstance(instantiate(cfg.callbacks.grad_monitor), GradientMonitor)


def test_demo_default_run_shows_the_sections(compose_cfg):
    from lightning_gradguard.demo.app import run

    result = run(compose_cfg(["trainer.max_epochs=1", "trainer.enable_progress_bar=false"]))
    tags = load_events(result["log_dir"]).Tags()
    sections = {t.split("/")[0] for t in tags["scalars"]}
    assert {"grad_norm", "grad_std", "update_ratio", "act_dead_frac", "gradguard"} <= sections
    assert "gradguard/gradient_flow" in tags["images"]



def test_monitoring_does_not_change_training(tmp_path):
    """Hooks, snapshots and histograms only read: the weights after a fit are bit-identical without it."""

    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        model = DeepMLP(input_shape=[16], num_classes=4, depth=3, width=16)
        _trainer(tmp_path, callbacks, max_steps=6).fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
        return model.state_dict()

    plain = fit([])
    watched = fit([GradientMonitor(per_parameter=True, histogram_every_n_steps=1, figure_every_n_steps=2, warn=False)])
    assert all(torch.equal(plain[k], watched[k]) for k in plain)


def test_heatmap_columns_stay_bounded_on_long_runs():
    from lightning_gradguard.callbacks.gradient_monitor import HEATMAP_COLUMNS

    mon = GradientMonitor()
    for k in range(3000):
        mon._add_column(10 * k, {"net.1": 1.0}, {"net.1": 0.1})
    steps = [c[0] for c in mon._columns]
    assert HEATMAP_COLUMNS // 2 <= len(steps) <= HEATMAP_COLUMNS
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] >= 10 * (3000 - 2 * mon._thin)
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    assert gaps == {10 * mon._thin}  # evenly thinned, not a dense tail after a sparse head
