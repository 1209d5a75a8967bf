"""Gradient clipping: numerics against torch's own functions, AGC by hand, AutoClip history, and the
callback in real Trainer runs (accumulation, bf16-mixed, manual optimization with two optimizers)."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_gradguard import (
    GradientClipping, PercentileClipper, adaptive_clip_, clip_by_norm_, clip_by_value_, global_norm,
)
from lightning_gradguard.demo import DeepMLP, SequenceDataModule, SyntheticDataModule, VanillaRNN
from tests.helpers import load_events


def _net_with_grads(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    net(torch.randn(8, 3, 6, 6)).pow(2).sum().mul(50).backward()
    return net


@pytest.mark.parametrize("norm_type", [2.0, "inf"])
def test_norm_equals_torch_clip_grad_norm(norm_type):
    a, b = _net_with_grads(), _net_with_grads()
    before = clip_by_norm_(list(a.parameters()), 0.5, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5, float(norm_type) if norm_type != "inf" else math.inf)
    assert torch.allclose(before, expected)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7)
    assert global_norm(a.parameters(), norm_type) <= 0.5 + 1e-5


def test_value_equals_torch_clip_grad_value():
    a, b = _net_with_grads(), _net_with_grads()
    clip_by_value_(list(a.parameters()), 0.05)
    torch.nn.utils.clip_grad_value_(b.parameters(), 0.05)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_agc_matches_direct_per_unit_computation():
    net = _net_with_grads()
    ref = copy.deepcopy(net)
    for p in ref.parameters():
        p.grad = next(q.grad for n, q in net.named_parameters() if q.shape == p.shape and torch.equal(q, p)).clone()
    adaptive_clip_(list(net.parameters()), clip_factor=0.01, eps=1e-3)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        g, w = q.grad, q.detach()
        units = g.shape[0] if g.ndim > 1 else 1
        g2, w2 = g.reshape(units, -1), w.reshape(units, -1)
        for i in range(units):
            gn, wn = g2[i].norm().item(), max(w2[i].norm().item(), 1e-3)
            expected = g2[i] * (0.01 * wn / gn) if gn > 0.01 * wn else g2[i]
            assert torch.allclose(p.grad.reshape(units, -1)[i], expected, rtol=1e-5, atol=1e-8), (name, i)


def test_agc_eps_keeps_zero_initialized_weights_trainable():
    w = nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.ones(3, 4)
    adaptive_clip_([w], clip_factor=0.1, eps=1e-3)
    assert torch.allclose(w.grad.norm(dim=1), torch.full((3,), 1e-4))  # clipped to λ·eps, not to zero


def test_percentile_threshold_follows_history_and_ignores_nonfinite():
    clipper = PercentileClipper(percentile=25.0, history_size=8, warmup_steps=3, warmup_threshold=None)
    p = nn.Parameter(torch.zeros(1))
    norms = [4.0, 1.0, float("nan"), 3.0, 2.0, 10.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    seen = []
    for k, n in enumerate(norms):
        p.grad = torch.tensor([n])
        before, thr = clipper.clip_([p])
        if math.isfinite(n):
            seen.append(n)
        hist = seen[-8:]
        if len(seen) < 3:
            assert math.isinf(thr.item())
        else:
            assert thr.item() == pytest.approx(np.percentile(hist, 25.0), rel=1e-6), k
            assert p.grad.abs().item() <= thr.item() + 1e-5
    assert int(clipper.count) == 10 and clipper.history.numel() == 8
    state = clipper.state_dict()
    other = PercentileClipper(percentile=25.0, history_size=8, warmup_steps=3)
    other.load_state_dict(state)
    assert torch.equal(other.threshold(), clipper.threshold())


# ------------------------------------------------------------------------------------------ Trainer
def _trainer(tmp_path, callbacks, **kw):
    opts = dict(
        max_steps=4, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, log_every_n_steps=1,
    )
    opts.update(kw)
    return pl.Trainer(**opts)


class StepProbe(pl.Callback):
    """Records the global gradient norm the optimizer will use; listed after GradientClipping, its hook
    runs after the clipping (the closure runs inside optimizer.step, so a step pre-hook would be too early)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(float(global_norm([p for g in optimizer.param_groups for p in g["params"]])))


def _mlp():
    return DeepMLP(input_shape=[16], num_classes=4, depth=3, width=32, lr=0.5)


@pytest.mark.parametrize("algorithm", ["value", "norm", "agc", "percentile"])
def test_callback_clips_in_a_real_fit_and_logs(tmp_path, algorithm):
    probe = StepProbe()
    clip = GradientClipping(algorithm, threshold=0.01, warmup_steps=5, warmup_threshold=0.01)  # 4 steps: all warm-up
    trainer = _trainer(tmp_path, [clip, probe])
    trainer.fit(_mlp(), datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    assert len(probe.norms) == 4
    if algorithm in ("norm", "percentile"):
        assert max(probe.norms) <= 0.01 + 1e-5
    events = load_events(trainer.logger.log_dir)
    before = [e.value for e in events.Scalars("gradguard/clip/norm_before")]
    after = [e.value for e in events.Scalars("gradguard/clip/norm_after")]
    assert len(before) == 4 and all(a < b for a, b in zip(after, before))
    assert after == pytest.approx(probe.norms, rel=1e-4)
    assert events.Scalars("gradguard/clip/clipped_fraction")[-1].value == 1.0


def test_accumulation_clips_once_per_optimizer_step(tmp_path):
    clip = GradientClipping("norm", threshold=0.05)
    probe = StepProbe()
    trainer = _trainer(tmp_path, [clip, probe], max_steps=3, accumulate_grad_batches=4)
    trainer.fit(_mlp(), datamodule=SyntheticDataModule(num_samples=512, input_shape=[16]))
    assert int(clip._steps) == 3 == trainer.global_step
    assert all(n <= 0.05 + 1e-5 for n in probe.norms)


def test_bf16_mixed_on_cpu(tmp_path):
    clip = GradientClipping("norm", threshold=0.05)
    probe = StepProbe()
    trainer = _trainer(tmp_path, [clip, probe], precision="bf16-mixed")
    trainer.fit(_mlp(), datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    assert all(n <= 0.05 + 1e-4 for n in probe.norms) and len(probe.norms) == 4


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (Lightning's only way to have several)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt in (opt_a, opt_b):
            opt.zero_grad()
            loss = F.cross_entropy(self.b(torch.relu(self.a(x))), y) * 100
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


def test_manual_optimization_with_two_optimizers_clips_each(tmp_path):
    clip = GradientClipping("norm", threshold=0.01)
    probe = StepProbe()
    trainer = _trainer(tmp_path, [clip, probe], max_steps=6)
    trainer.fit(TwoOptimizers(), datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    assert len(probe.norms) == 6 and all(n <= 0.01 + 1e-5 for n in probe.norms)


def test_refuses_trainer_gradient_clip_val(tmp_path):
    trainer = _trainer(tmp_path, [GradientClipping("norm", 1.0)], gradient_clip_val=0.5)
    with pytest.raises(MisconfigurationException, match=r"gradient_clip_val=0.5.*clip the same gradients"):
        trainer.fit(_mlp(), datamodule=SyntheticDataModule(num_samples=64, input_shape=[16]))


class NaNAt(DeepMLP):
    """Puts a NaN into one layer's gradient at step 1."""

    def on_after_backward(self):
        if self.global_step == 1:
            self.net[3].weight.grad[0, 0] = float("nan")


@pytest.mark.parametrize("mode", ["raise", "warn", "skip"])
def test_nonfinite_gradients(tmp_path, mode):
    model = NaNAt(input_shape=[16], num_classes=4, depth=3, width=8)
    clip = GradientClipping("norm", threshold=1.0, on_nonfinite=mode)
    trainer = _trainer(tmp_path, [clip])
    dm = SyntheticDataModule(num_samples=256, input_shape=[16])
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=r"step 1 in parameter 'net.3.weight'"):
            trainer.fit(model, datamodule=dm)
    elif mode == "warn":
        with pytest.warns(RuntimeWarning, match=r"'net.3.weight'"):
            trainer.fit(model, datamodule=dm)
    else:
        trainer.fit(model, datamodule=dm)
        assert int(clip._nonfinite) == 1
        assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights


def test_percentile_state_survives_checkpoint(tmp_path):
    clip = GradientClipping("percentile", warmup_steps=2)
    trainer = _trainer(tmp_path, [clip], max_steps=5, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(_mlp(), datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = GradientClipping("percentile", warmup_steps=2)
    trainer2 = _trainer(tmp_path, [resumed], max_steps=5)
    trainer2.fit(_mlp(), datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]), ckpt_path=ckpt)
    assert int(resumed._percentile.count) == 5
    assert torch.equal(resumed._percentile.history.cpu(), clip._percentile.history.cpu())




def test_exploding_rnn_diverges_without_clipping_and_trains_with_it():
    """The README's exploding case, shortened: a ReLU IRNN over 100 steps."""

    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        dm = SequenceDataModule(num_samples=2048, length=100)
        model = VanillaRNN()
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(model, datamodule=dm)
        return trainer.test(model, datamodule=dm, verbose=False)[0]

    baseline = fit([])
    assert not math.isfinite(baseline["test/loss"]) or baseline["test/loss"] > 1e3, baseline
    clipped = fit([GradientClipping("norm", threshold=1.0)])
    assert math.isfinite(clipped["test/loss"]) and clipped["test/acc"] > 0.35


@pytest.mark.parametrize("preset", ["value", "norm", "agc", "percentile"])
def test_hydra_presets_compose_and_instantiate(compose_cfg, preset):
    from hydra.utils import instantiate

    cfg = compose_cfg([f"gradguard/clip={preset}", "callbacks.grad_clip.on_nonfinite=skip"])
    callback = instantiate(cfg.callbacks.grad_clip)
    assert isinstance(callback, GradientClipping) and callback.algorithm == preset
    assert callback.on_nonfinite == "skip"


def test_hydra_bad_override_names_field_value_and_choices(compose_cfg):
    from hydra.errors import ConfigCompositionException, InstantiationException
    from hydra.utils import instantiate

    with pytest.raises(InstantiationException, match=r"algorithm='nrom' is not one of: value, norm, agc, percentile"):
        instantiate(compose_cfg(["gradguard/clip=norm", "callbacks.grad_clip.algorithm=nrom"]).callbacks.grad_clip)
    with pytest.raises(ConfigCompositionException, match=r"callbacks.grad_clip.max_nrom"):
        compose_cfg(["gradguard/clip=norm", "callbacks.grad_clip.max_nrom=1"])


class NaNSpreads(DeepMLP):
    """A NaN that arises in layer net.3 and reaches the layer before it, as backward would carry it."""

    def on_after_backward(self):
        if self.global_step == 1:
            self.net[3].weight.grad[0, 0] = float("nan")
            self.net[1].weight.grad[0, 0] = float("nan")


def test_nonfinite_message_names_the_layer_nearest_the_loss(tmp_path):
    trainer = _trainer(tmp_path, [GradientClipping("norm", threshold=1.0, on_nonfinite="raise")])
    with pytest.raises(FloatingPointError, match=r"step 1 in parameter 'net.3.weight' \(the one nearest the loss"):
        trainer.fit(NaNSpreads(input_shape=[16], num_classes=4, depth=3, width=8),
                    datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))


def test_percentile_nonfinite_warning_names_the_parameter_and_leaves_the_gradients_unscaled(tmp_path):
    seen = {}

    class Keep(pl.Callback):  # after clipping: the gradients the optimizer steps on
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                seen["grad"] = pl_module.net[1].weight.grad.clone()

    trainer = _trainer(tmp_path, [GradientClipping("percentile", warmup_steps=1, on_nonfinite="warn"), Keep()], max_steps=2)
    with pytest.warns(RuntimeWarning, match=r"step 1 in parameter 'net.3.weight'.*gradients left unscaled"):
        trainer.fit(NaNAt(input_shape=[16], num_classes=4, depth=3, width=8),
                    datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    assert torch.isfinite(seen["grad"]).all()  # not multiplied by threshold / NaN


def test_shared_tensor_norms_and_keep_nonfinite_and_percentile_never_reads_the_host():
    from lightning_gradguard.clipping import PercentileClipper, clip_by_norm_, global_norm
    from tests.test_zscore import _NoHostReads

    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))
    net(torch.randn(3, 5)).pow(2).sum().backward()
    params = list(net.parameters())
    sq = torch.stack([p.grad.pow(2).sum() for p in params])
    assert float(global_norm(params, tensor_sq=sq)) == pytest.approx(float(global_norm(params)), rel=1e-6)
    with pytest.raises(ValueError, match="norm_type"):
        global_norm(params, "inf", tensor_sq=sq)
    params[0].grad[0, 0] = float("inf")
    kept = [p.grad.clone() for p in params]
    clip_by_norm_(params, 1.0, keep_nonfinite=True)
    for p, k in zip(params, kept):
        torch.testing.assert_close(p.grad, k)
    clip_by_norm_(params, 1.0)  # default: scaled by 1/inf = 0, the Inf turns NaN
    assert torch.isnan(params[0].grad[0, 0])
    clipper = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=2)
    for step in range(6):
        net.zero_grad()
        net(torch.randn(3, 5)).pow(2).sum().backward()
        if step == 3:
            params[1].grad[0] = float("nan")
        with _NoHostReads():
            clipper.clip_(params, keep_nonfinite=True)
    assert int(clipper.count) == 5  # the NaN step was not recorded


@pytest.mark.parametrize("kwargs, message", [
    ({"percentile": 101.0}, "percentile=101.0"), ({"history_size": 0}, "history_size=0"), ({"warmup_steps": -1}, "warmup_steps=-1"),
])
def test_percentile_clipper_refuses_bad_arguments(kwargs, message):
    from lightning_gradguard.clipping import PercentileClipper

    with pytest.raises(ValueError, match=message):
        PercentileClipper(**kwargs)
