"""Z-score clipping (ZClip) against the ``zclip`` package, step skipping (spikes and non-finite gradients)
bit-exact for weights and optimizer state, device-side decisions, and resume from a checkpoint."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientClipping, SpikeDetector, StepSkipper, ZScoreClipper, global_norm
from tests.helpers import load_events

SPIKES = {3, 10, 40, 41, 100, 150, 151, 220, 290}  # optimizer steps whose loss (hence gradient) is ×40


class Regression(pl.LightningModule):
    """A small regression net whose gradient norms (~0.2) sit below ZClip's cap of 1, so the z-score rule,
    not the cap, decides; ``spikes``: steps whose loss is multiplied by 40; ``nan_at``: steps with a NaN
    gradient."""

    def __init__(self, spikes=frozenset(SPIKES), nan_at=frozenset(), optimizer="sgd"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.spikes, self.nan_at, self.optimizer = set(spikes), set(nan_at), optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = 0.25 * nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss * (40.0 if self.global_step in self.spikes else 1.0)

    def on_after_backward(self):
        if self.global_step in self.nan_at:
            self.net[2].weight.grad[0, 0] = float("nan")

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)}
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)


def _loader(n=1200):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :1] * 0.5).tanh() + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


class Recorder(pl.Callback):
    """Listed after the clipping callback: records the gradients the optimizer will use."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in pl_module.parameters()]))


class NormBefore(pl.Callback):
    """Listed before the clipping callback: records the global norm before clipping."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(float(global_norm(list(pl_module.parameters()))))


def _fit(callbacks, max_steps=300, model_cls=None, model_kwargs=None, ckpt_path=None, **kw):
    pl.seed_everything(0, verbose=False)
    model = (model_cls or Regression)(**(model_kwargs or {}))
    opts = dict(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)
    opts.update(kw)
    trainer = pl.Trainer(**opts)
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return model, trainer


# ------------------------------------------------------------------------------------------ ZClip equivalence
@pytest.mark.parametrize(
    "zclip_kwargs, ours_kwargs",
    [
        ({}, {}),  # both with no argument: ZClip's defaults are ours
        ({"clip_option": "mean"}, {"clip_option": "mean"}),
        ({"clip_factor": 0.8, "skip_update_on_spike": True, "max_grad_norm": None, "alpha": 0.9, "z_thresh": 2.0,
          "warmup_steps": 10},
         {"clip_factor": 0.8, "skip_update_on_spike": True, "threshold": None, "ema_decay": 0.9, "z_thresh": 2.0,
          "warmup_steps": 10}),
    ],
    ids=["defaults-adaptive_scaling", "mean", "options"],
)
def test_zscore_reproduces_zclip_over_300_steps_with_spikes(zclip_kwargs, ours_kwargs):
    from zclip import ZClipLightningCallback

    ref = Recorder()
    _fit([ZClipLightningCallback(**zclip_kwargs), ref])
    ours, before = Recorder(), NormBefore()
    _fit([before, GradientClipping("zscore", **ours_kwargs), ours])
    a, b = torch.stack(ref.grads), torch.stack(ours.grads)
    assert a.shape == b.shape == (300, 161)
    per_step = (a - b).abs().max(dim=1).values
    assert float(per_step.max()) < 1e-6, f"step {int(per_step.argmax())} differs by {float(per_step.max())}"
    # the z-score rule itself clipped (below the norm and below the cap of 1) at the injected spikes
    after = b.norm(dim=1)
    warmup = zclip_kwargs.get("warmup_steps", 25)
    zclipped = [s for s in SPIKES if s >= warmup and after[s] < min(before.norms[s], 1.0) * 0.99]
    assert len(zclipped) >= 4, (zclipped, after[sorted(SPIKES)])


def test_zscore_clipper_alone_matches_zclip_on_the_same_gradients():
    """The core class, no Lightning: the same gradient sequence through both, state compared too."""
    from zclip import ZClip

    torch.manual_seed(0)
    a, b = nn.Linear(6, 3), nn.Linear(6, 3)
    ref, ours = ZClip(warmup_steps=5), ZScoreClipper(warmup_steps=5)
    for step in range(60):
        g = [torch.randn_like(p) * (0.05 if step % 17 else 3.0) for p in a.parameters()]
        for net in (a, b):
            for p, gi in zip(net.parameters(), g):
                p.grad = gi.clone()
        ref.step(a)
        ours.clip_(list(b.parameters()))
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.allclose(pa.grad, pb.grad, atol=1e-7, rtol=0)
        if ref.initialized:
            # the norms themselves are float32 (last-bit differences between the two norm computations)
            assert float(ours.mean) == pytest.approx(ref.mean, rel=1e-6) and float(ours.var) == pytest.approx(ref.var, rel=1e-6)


class _NoHostReads(TorchFunctionMode):
    """Fails on any read of a tensor value by the host (what would be a device sync on a GPU)."""

    FORBIDDEN = {"item", "__bool__", "tolist", "__float__", "__int__", "numpy", "cpu", "__index__"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FORBIDDEN:
            raise AssertionError(f"host read: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_clipper_detector_and_restore_skipper_never_read_values_on_the_host():
    net = nn.Linear(5, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    clipper, detector, skipper = ZScoreClipper(warmup_steps=3), SpikeDetector(window=4, min_samples=3), StepSkipper("restore")
    skipper.attach(opt)
    net(torch.randn(4, 5)).sum().backward()
    opt.step()  # the first step creates the momentum buffers (a structure change may read the flag)
    for step in range(8):
        net.zero_grad()
        net(torch.randn(4, 5)).pow(2).sum().mul(1 + 30 * (step == 6)).backward()
        with _NoHostReads():
            norm, _ = clipper.clip_(list(net.parameters()))
            skipper.request(detector.update(norm))
            opt.step()
    assert int(skipper.skipped) >= 1
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        bool(torch.tensor(1.0) > 0)  # the guard does catch a host read


# ------------------------------------------------------------------------------------------ step skipping
def _optimizer_state(opt):
    return {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in enumerate(opt.state[p] for g in opt.param_groups for p in g["params"])}


def _assert_bit_identical(state_a, state_b):
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for k in state_a[i]:
            va, vb = state_a[i][k], state_b[i][k]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (i, k)


@pytest.mark.parametrize("mode", ["sync", "restore"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("gradient", ["finite", "nan"])
def test_skipped_step_leaves_weights_and_optimizer_state_bit_identical(mode, optimizer, gradient):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) if optimizer == "sgd"
           else torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1))
    skipper = StepSkipper(mode)
    skipper.attach(opt)

    def closure():
        opt.zero_grad()
        loss = net(torch.randn(8, 5)).pow(2).mean()
        loss.backward()
        if gradient == "nan":
            net[2].weight.grad[0, 0] = float("nan")
        return loss

    skipper.request(torch.tensor(True))
    opt.step(closure)  # a skipped first step creates no state
    assert all(len(opt.state[p]) == 0 for p in net.parameters())
    gradient_kind, gradient = gradient, "finite"
    for _ in range(3):
        skipper.request(torch.tensor(False))
        opt.step(closure)
    gradient = gradient_kind
    weights, state = copy.deepcopy(net.state_dict()), _optimizer_state(opt)
    skipper.request(torch.tensor(True))
    opt.step(closure)
    for k, v in net.state_dict().items():
        assert torch.equal(v, weights[k]), k
    _assert_bit_identical(state, _optimizer_state(opt))
    assert int(skipper.skipped) == 2
    gradient = "finite"
    opt.step(closure)  # no request: a normal step
    assert not torch.equal(net[0].weight, weights["0.weight"])
    skipper.detach(opt)
    assert "step" not in opt.__dict__


class StateAround(pl.Callback):
    """Weights and optimizer state at the start and at the end of the given optimizer steps."""

    def __init__(self, steps):
        self.steps, self.before, self.after = set(steps), {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.before[trainer.global_step] = (copy.deepcopy(pl_module.state_dict()),
                                                _optimizer_state(trainer.optimizers[0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if step in self.steps:
            self.after[step] = (copy.deepcopy(pl_module.state_dict()), _optimizer_state(trainer.optimizers[0]))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_on_nonfinite_skip_skips_the_whole_step_in_a_real_fit(tmp_path, optimizer):
    nan_steps = [4, 7]
    around = StateAround(nan_steps + [5])
    clip = GradientClipping("norm", on_nonfinite="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. an LR scheduler that thinks optimizer.step was replaced
        model, trainer = _fit([clip, around], max_steps=10, model_kwargs=dict(spikes=(), nan_at=nan_steps, optimizer=optimizer),
                              logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1)
    for step in nan_steps:
        (w0, s0), (w1, s1) = around.before[step], around.after[step]
        for k in w0:
            assert torch.equal(w0[k], w1[k]), (step, k)
        _assert_bit_identical(s0, s1)
    (w0, _), (w1, _) = around.before[5], around.after[5]
    assert not torch.equal(w0["net.0.weight"], w1["net.0.weight"])  # a normal step moves
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(clip._nonfinite) == 2 and int(clip._skipper.skipped) == 2
    if optimizer == "adamw":
        assert int(trainer.optimizers[0].state[model.net[0].weight]["step"]) == 10 - 2
    assert "step" not in trainer.optimizers[0].__dict__ or hasattr(trainer.optimizers[0].step, "_wrapped_by_lr_sched")
    events = load_events(tmp_path / "tb" / "version_0")
    skipped = {e.step: e.value for e in events.Scalars("gradguard/clip/skipped_steps")}
    assert skipped[9] == 2.0 and skipped[3] == 0.0 and skipped[4] == 1.0


@pytest.mark.parametrize("kind", ["loss", "grad_norm", "both"])
def test_spike_skipping_skips_injected_spikes_and_logs_them(tmp_path, kind):
    spikes = [30, 64]  # after the detector's min_samples (16); further apart than the window (32), since a
    # recorded spike widens the standard deviation for the next window steps (OLMo-core's rule)
    around = StateAround(spikes)
    clip = GradientClipping("none", skip_spikes=kind, skip_window=32)
    model, _ = _fit([clip, around], max_steps=70, model_kwargs=dict(spikes=spikes),
                    logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1)
    for step in spikes:
        (w0, s0), (w1, s1) = around.before[step], around.after[step]
        assert all(torch.equal(w0[k], w1[k]) for k in w0), step
        _assert_bit_identical(s0, s1)
    events = load_events(tmp_path / "tb" / "version_0")
    skipped = {e.step: e.value for e in events.Scalars("gradguard/clip/skipped_steps")}
    assert skipped[69] == 2.0 and skipped[29] == 0.0 and skipped[30] == 1.0  # only the spikes


def test_spike_detector_follows_olmo_core_rule():
    det = SpikeDetector(sigma=6.0, window=128)
    assert det.min_samples == 64  # OLMo-core: active once window // 2 values are recorded
    values = torch.linspace(1.0, 1.1, 70)
    flags = [bool(det.update(v)) for v in values[:62]]
    assert not any(flags)
    assert not bool(det.update(torch.tensor(50.0)))  # 63rd value: not active yet
    prev = torch.cat([values[:62], torch.tensor([50.0])])
    std, mean = torch.std_mean(prev.double())
    assert bool(det.update(mean + 6.01 * std))
    assert float(det.history[63]) == pytest.approx(float(mean + 6 * std), rel=1e-12)  # recorded at the threshold
    assert not bool(det.update(torch.tensor(float(prev.mean()))))
    assert not bool(det.update(torch.tensor(float("inf"))))  # non-finite: never a spike, never recorded
    assert int(det.count) == 65


# ------------------------------------------------------------------------------------------ resume
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """75 steps per epoch; the checkpoint after epoch 1 is past ZClip's 25-step warm-up and the detector's
    min_samples, so both states matter after the resume."""

    def callbacks():
        return [GradientClipping("zscore", skip_spikes="both", skip_window=16, on_nonfinite="skip")]

    straight, _ = _fit(callbacks(), max_steps=-1, max_epochs=2, model_kwargs=dict(spikes={10, 60, 80, 100, 130}, nan_at={90}))

    ckpt_dir = tmp_path / "ckpt"
    first, _ = _fit(callbacks() + [ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_steps=-1, max_epochs=1,
                    model_kwargs=dict(spikes={10, 60, 80, 100, 130}, nan_at={90}), enable_checkpointing=True)
    resumed_cb = callbacks()
    resumed, trainer = _fit(resumed_cb, max_steps=-1, max_epochs=2, model_kwargs=dict(spikes={10, 60, 80, 100, 130}, nan_at={90}),
                            ckpt_path=str(ckpt_dir / "last.ckpt"))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert int(resumed_cb[0]._skipper.skipped) >= 2  # the spikes at 80/100 and the NaN at 90

    # the control: the same resume without the callback's state gives other weights
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    ckpt["callbacks"] = {}
    torch.save(ckpt, tmp_path / "stateless.ckpt")
    forgetful, _ = _fit(callbacks(), max_steps=-1, max_epochs=2, model_kwargs=dict(spikes={10, 60, 80, 100, 130}, nan_at={90}),
                        ckpt_path=str(tmp_path / "stateless.ckpt"))
    assert not torch.equal(forgetful.net[0].weight, straight.net[0].weight)


# ------------------------------------------------------------------------------------------ config and errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_option": "median"}, r"clip_option='median' is not one of: adaptive_scaling, mean"),
        ({"threshold": -1.0}, r"threshold=-1.0 must be a number > 0.0"),
        ({"z_thresh": 0}, r"z_thresh=0 must be a number > 0.0"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0 must be a number >= 0.0 and < 1.0"),
        ({"warmup_steps": 0}, r"warmup_steps=0 must be >= 1 with algorithm='zscore'"),
        ({"skip_spikes": "norm"}, r"skip_spikes='norm' is not one of: loss, grad_norm, both"),
        ({"skip_window": 1}, r"skip_window=1 must be an integer >= 2"),
        ({"skip_min_samples": 2}, r"skip_min_samples=2 must be an integer >= 3 and <= 129"),
        ({"skip_mode": "lazy"}, r"skip_mode='lazy' is not one of: auto, restore, sync"),
        ({"norm_type": "inf"}, r"norm_type='inf' is not allowed with algorithm='zscore'"),
    ],
)
def test_bad_arguments_name_field_value_and_allowed(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GradientClipping("zscore", **kwargs)


def test_threshold_none_only_for_zscore_and_algorithm_defaults():
    with pytest.raises(ValueError, match=r"threshold=None \(no cap\) needs algorithm='zscore', not algorithm='norm'"):
        GradientClipping("norm", threshold=None)
    z, p, a = GradientClipping("zscore"), GradientClipping("percentile"), GradientClipping("agc")
    assert (z.warmup_steps, z.eps, z.threshold, z.z_thresh, z.ema_decay) == (25, 1e-6, 1.0, 2.5, 0.97)
    assert (p.warmup_steps, a.eps) == (10, 1e-3)


def test_lbfgs_with_skipping_is_refused():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class WithLBFGS(Regression):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(MisconfigurationException, match="LBFGS evaluates its closure several times"):
        _fit([GradientClipping("zscore", on_nonfinite="skip")], max_steps=2, model_cls=WithLBFGS)


def test_hydra_preset_zscore(compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg(["gradguard/clip=zscore", "callbacks.grad_clip.skip_spikes=loss"])
    callback = instantiate(cfg.callbacks.grad_clip)
    assert isinstance(callback, GradientClipping) and callback.algorithm == "zscore"
    assert (callback.z_thresh, callback.warmup_steps, callback.clip_option, callback.skip_spikes) == (
        2.5, 25, "adaptive_scaling", "loss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_zscore_spike_skipping_and_restore_never_sync_on_gpu():  # pragma: no cover - runs where a GPU is
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    clipper, detector, skipper = ZScoreClipper(warmup_steps=3), SpikeDetector(window=8), StepSkipper()  # auto: restore
    skipper.attach(opt)
    x = torch.randn(16, 32, device="cuda")
    net(x).pow(2).mean().backward()
    opt.step()  # the first step creates the momentum buffers
    try:
        for step in range(12):
            if step == 1:  # the first clip_ moves the clipper's state to the GPU (one blocking copy, once)
                torch.cuda.set_sync_debug_mode("error")
            net.zero_grad(set_to_none=False)
            (net(x).pow(2).mean() * (1 + 100 * (step == 10))).backward()
            norm, _ = clipper.clip_(list(net.parameters()))
            skipper.request(detector.update(norm))
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(skipper.skipped) == 1


def test_gradguard_applies_zscore_clipping_when_its_rule_fires(tmp_path):
    # GradGuard no longer races clipping algorithms (its pass budget covers remedy sets, not algorithms):
    # clipping is by rule and ``clip_algorithm`` says which one is applied
    from lightning_gradguard import GradGuard
    from lightning_gradguard.demo import DeepMLP, SyntheticDataModule

    pl.seed_everything(0, verbose=False)
    gg = GradGuard(monitor=False, verbose=False, trial_steps=8, init="off", batchnorm="off", activation="off",
                   clip_algorithm="zscore", budget_steps=30)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[gg])
    bad = DeepMLP(input_shape=[16], num_classes=4, depth=8, width=64, init_std=1.0)  # N(0, 1): norms explode
    trainer.fit(bad, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    row = next(d for d in gg.decisions if d.remedy == "clipping")
    assert row.status == "applied" and "> 1000" in row.measurement, row
    assert gg.remedies["clipping"]["algorithm"] == "zscore" == row.options["algorithm"]
    assert gg.subs["clipping"].algorithm == "zscore"


def test_lightning_cli_builds_zscore_with_skipping(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from lightning_gradguard.demo import DeepMLP, SyntheticDataModule

    cli = LightningCLI(DeepMLP, SyntheticDataModule, run=False, args=[
        "--trainer.callbacks+=lightning_gradguard.GradientClipping", "--trainer.callbacks.algorithm=zscore",
        "--trainer.callbacks.skip_spikes=loss", "--trainer.callbacks.threshold=null",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientClipping)]
    assert (cb.algorithm, cb.skip_spikes, cb.threshold) == ("zscore", "loss", None)


def test_step_skip_core_imports_without_lightning():
    from tests.test_architecture import _modules_after

    loaded = _modules_after("import lightning_gradguard.step_skip, lightning_gradguard.clipping")
    assert "lightning_gradguard.step_skip" in loaded and "lightning" not in loaded
