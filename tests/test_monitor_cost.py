"""GradientMonitor + GradientClipping at low cost: the background writer loses nothing, one read of the
gradients per step for both, per-layer statistics when one activation module is shared, the loss-gated
non-finite check, and (on a GPU) no host sync in 200 steps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientClipping, GradientMonitor
from lightning_gradguard.probe import probe
from lightning_gradguard.report import finding_lines
from lightning_gradguard.shared_norms import step_norms_for
from tests.helpers import load_events, read_texts


class SharedReLU(pl.LightningModule):
    """One ``nn.ReLU`` module after three layers. Zero weights make each layer's output its bias: ``l1`` has no
    dead unit, ``l2`` 6 of 8, ``l3`` 4 of 8."""

    def __init__(self, lr: float = 1e-9, momentum: float = 0.0):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.act = nn.ReLU()
        self.lr, self.momentum = lr, momentum
        with torch.no_grad():
            for layer in (self.l1, self.l2, self.l3):
                layer.weight.zero_()
                layer.bias.fill_(1.0)
            self.l2.bias[:6] = -1.0  # 6 of 8 units dead
            self.l3.bias[:4] = -1.0  # 4 of 8 units dead

    def forward(self, x):
        return self.out(self.act(self.l3(self.act(self.l2(self.act(self.l1(x)))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class RotatingMLP(pl.LightningModule):
    """Seven 64-wide layers (one shared ``nn.ReLU``): larger than the monitor's smallest update-ratio buffer
    (16 KiB), so the update ratios rotate over one layer per logging step, and each new set of layers needs its
    index tensor at a step after the first ones (where a blocking copy of it would be a host sync)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8 if k == 0 else 64, 64) for k in range(6)])
        self.act = nn.ReLU()
        self.out = nn.Linear(64, 2)

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return self.out(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)  # tensor optimizer state


def _data(n: int = 64, features: int = 8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, 2, (n,), generator=g)),
                      batch_size=8)


def _trainer(tmp_path, callbacks, **kw):
    opts = dict(max_steps=3, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, callbacks=callbacks, log_every_n_steps=1,
                logger=TensorBoardLogger(tmp_path, name="tb"))
    opts.update(kw)
    return pl.Trainer(**opts)


def _scalar(events, tag, step):
    return next(e.value for e in events.Scalars(tag) if e.step == step)


def test_a_shared_relu_module_gives_each_layer_its_own_dead_fraction(tmp_path):
    model = SharedReLU()
    trainer = _trainer(tmp_path, [GradientMonitor(warn=False)], max_steps=2)
    trainer.fit(model, train_dataloaders=_data())
    events = load_events(trainer.logger.log_dir)
    for step in (0, 1):
        assert _scalar(events, "act_dead_frac/l1", step) == 0.0
        assert _scalar(events, "act_dead_frac/l2", step) == 0.75
        assert _scalar(events, "act_dead_frac/l3", step) == 0.5
    # GradGuard's probe sees the same, per layer
    batches = list(_data())[:2]
    found = probe(model, batches, lambda m, b, i: F.cross_entropy(m(b[0]), b[1]))
    assert found.dead == {"l1": 0.0, "l2": 0.75, "l3": 0.5}


class SlowWrites(GradientMonitor):
    """A monitor whose writer thread is slow: the training thread runs far ahead of it."""

    def _write(self, trainer, ctx, host):
        import time

        time.sleep(0.02)
        super()._write(trainer, ctx, host)


def test_the_writer_thread_loses_nothing_at_fit_end_and_on_an_exception(tmp_path):
    trainer = _trainer(tmp_path / "a", [SlowWrites(histogram_every_n_steps=5, warn=False)], max_steps=25)
    trainer.fit(SharedReLU(), train_dataloaders=_data(256))
    events = load_events(trainer.logger.log_dir)
    assert [e.step for e in events.Scalars("grad_norm/l2")] == list(range(25))
    assert [e.step for e in events.Histograms("hist_grad/l2/weight")] == [0, 5, 10, 15, 20]
    assert all(t.name != "gradguard-writer" for t in __import__("threading").enumerate())  # joined at teardown

    class Boom(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 12:
                raise RuntimeError("boom")

    trainer = _trainer(tmp_path / "b", [SlowWrites(warn=False), Boom()], max_steps=25)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(SharedReLU(), train_dataloaders=_data(256))
    events = load_events(trainer.logger.log_dir)
    assert [e.step for e in events.Scalars("grad_norm/l2")] == list(range(12))


def test_monitor_and_clipping_read_the_gradients_once_per_step(tmp_path, monkeypatch):
    reads: list[int] = []
    real = torch._foreach_norm
    model = SharedReLU(lr=0.01)
    grads = lambda: {id(p.grad) for p in model.parameters() if p.grad is not None}  # noqa: E731

    def counting(tensors, *args, **kwargs):
        if any(id(t) in grads() for t in tensors):
            reads.append(1)
        return real(tensors, *args, **kwargs)

    class Count(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            reads.clear()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            per_step.append(len(reads))

    per_step: list[int] = []
    monkeypatch.setattr(torch, "_foreach_norm", counting)
    monitor = GradientMonitor(log_every_n_steps=2, nonfinite_check="every_step", warn=False)
    trainer = _trainer(tmp_path, [Count(), monitor, GradientClipping("norm", threshold=0.5)], max_steps=6)
    trainer.fit(model, train_dataloaders=_data())
    # logging steps: the monitor's statistics (packed, no _foreach_norm) serve clipping; other steps: one pass
    assert per_step == [0, 1, 0, 1, 0, 1]
    assert step_norms_for(trainer).hits == 6
    events = load_events(trainer.logger.log_dir)
    # clipping used the monitor's norms: its norm_before equals the monitor's total at a logging step
    assert _scalar(events, "gradguard/clip/norm_before", 2) == pytest.approx(
        _scalar(events, "gradguard/grad_norm_total", 2), rel=1e-5)


class NaNLossAt(SharedReLU):
    """The loss is NaN at step 2 (every gradient follows)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 2 else loss


def test_auto_check_names_the_step_whose_loss_turned_nonfinite_between_logging_steps(tmp_path):
    trainer = _trainer(tmp_path, [GradientMonitor(log_every_n_steps=50, warn=False)], max_steps=5)
    trainer.fit(NaNLossAt(), train_dataloaders=_data())
    texts = [t for t in finding_lines(read_texts(load_events(trainer.logger.log_dir), "gradguard/findings"))
             if "[nonfinite]" in t]
    assert len(texts) == 1 and "step 2:" in texts[0], texts


def _sync_free(cls, hooks, armed):
    """``cls`` whose ``hooks`` run under ``torch.cuda.set_sync_debug_mode("error")`` once ``armed()`` says so:
    any host sync inside gradguard's own code raises, Lightning's own loop is left out of the check."""

    class Guarded(cls):
        pass

    for name in hooks:
        def wrapper(self, *args, __orig=getattr(cls, name), **kwargs):
            if not armed():
                return __orig(self, *args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return __orig(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        setattr(Guarded, name, wrapper)
    return Guarded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_no_host_sync_in_200_steps_logging_every_step_with_percentile_clipping(tmp_path, monkeypatch):  # pragma: no cover
    from lightning_gradguard.act_stats import ActivationAccumulator

    state = {"step": 0}
    armed = lambda: state["step"] >= 5  # noqa: E731 - after the first steps (buffers, indices, optimizer state)

    class Step(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["step"] = trainer.global_step

    hooks = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")
    Monitor = _sync_free(GradientMonitor, hooks, armed)
    Clipping = _sync_free(GradientClipping, hooks, armed)
    monkeypatch.setattr(ActivationAccumulator, "add", _sync_free(ActivationAccumulator, ("add",), armed).add)
    monitor = Monitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False)
    clip = Clipping("percentile", warmup_steps=3, on_nonfinite="skip")
    model = RotatingMLP()  # update ratios rotate past the armed step; tensor optimizer state (restore skipper)
    trainer = pl.Trainer(max_steps=205, accelerator="gpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1000,
                         callbacks=[Step(), monitor, clip], logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(model, train_dataloaders=_data(205 * 8))
    events = load_events(trainer.logger.log_dir)
    assert len(events.Scalars("grad_norm/layers.1")) == 205
    # a sync in the activation statistics would raise inside a forward hook, which the monitor turns into a
    # warning and a missing row: every step has its rows
    assert all(len(events.Scalars(f"act_dead_frac/layers.{k}")) == 205 for k in range(6))
    assert step_norms_for(trainer).hits >= 200  # clipping used the monitor's read of the gradients


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("activation, shape, unit_dim", [
    ("relu", (16, 8), -1), ("relu", (3, 4, 5, 5), 1), ("relu6", (2, 7, 3), -1), ("sigmoid", (4, 6, 5), -1),
    ("tanh", (10, 3), -1), ("linear", (1,), -1),
])
def test_activation_accumulator_equals_the_one_layer_reference(activation, shape, unit_dim, held):
    from lightning_gradguard.act_stats import ActivationAccumulator
    from lightning_gradguard.activations import ACTIVATION_FUNCTIONS
    from lightning_gradguard.stats import activation_statistics

    g = torch.Generator().manual_seed(0)
    fn = ACTIVATION_FUNCTIONS.get(activation, lambda t: t)
    outs = [fn(torch.randn(shape, generator=g) * 3 - 1) for _ in range(3)]
    if len(shape) >= 2:
        outs[0].select(unit_dim, 0).zero_()  # one unit dead for the whole batch
    acc = ActivationAccumulator(eps=0.01)
    for k, out in reversed(list(enumerate(outs))):  # rows come back in layer order whatever the order of arrival
        acc.add(k, out, activation, unit_dim, held=held)
    assert len(acc._pending) == int(held)  # held: the three wait, as one stack, for reduce_pending/finish
    layers, rows = acc.finish(torch.device("cpu"))
    assert layers == [0, 1, 2]
    for k, out in enumerate(outs):
        ref = activation_statistics(out, activation, unit_dim, 0.01)
        torch.testing.assert_close(rows[k], ref, rtol=1e-4, atol=1e-6)
    acc.clear()
    assert len(acc) == 0 and acc.finish(torch.device("cpu"))[1].shape == (0, 4)


def test_held_outputs_are_reduced_in_chunks_of_mixed_shapes_and_one_changed_in_place_is_dropped():
    from lightning_gradguard.act_stats import ActivationAccumulator
    from lightning_gradguard.stats import activation_statistics

    g = torch.Generator().manual_seed(1)
    outs = {k: torch.relu(torch.randn(4, 8, generator=g)) for k in range(5)}
    outs.update({k: torch.tanh(torch.randn(2, 3, 5, generator=g)) for k in range(5, 8)})
    outs[8] = torch.relu(torch.randn(64, 16, generator=g))  # larger than the chunk: alone in its stack
    acc = ActivationAccumulator(eps=0.01)
    for k, out in outs.items():
        acc.add(k, out, "relu" if k < 5 or k == 8 else "tanh", -1, held=True)
    reference = {k: activation_statistics(out, "relu" if k < 5 or k == 8 else "tanh", -1, 0.01) for k, out in outs.items()}
    before = {k: out.clone() for k, out in outs.items()}
    outs[3].mul_(2.0)  # changed in place after its hook: its values are no longer the layer's activation
    scratch = torch.full((70,), float("nan"))  # a free buffer of 2 outputs of 32 elements (30 for tanh)
    acc.reduce_pending(scratch=[scratch])
    assert not torch.isnan(scratch[:64]).any()  # the stacks were made there
    assert all(torch.equal(outs[k], before[k]) for k in outs if k != 3)  # the outputs themselves untouched
    assert len(acc._blocks) == 2 + 2 + 1  # the 4 unchanged ReLU outputs in stacks of 2, 3 tanh ones in 2, the large one
    layers, rows = acc.finish(torch.device("cpu"))
    assert layers == [0, 1, 2, 4, 5, 6, 7, 8] and 3 not in acc and acc.eager == {3}
    for j, k in enumerate(layers):
        torch.testing.assert_close(rows[j], reference[k], rtol=1e-4, atol=1e-6)
    acc.clear()
    acc.add(3, outs[3], "relu", -1, held=True)  # reduced at once from now on: nothing waits
    assert not acc._pending and acc.finish(torch.device("cpu"))[0] == [3]


class ScaledGELU(pl.LightningModule):
    """``h = gelu(l1(x)); h.mul_(3)``: GELU keeps its input for backward, so its output may change in place (a
    ReLU's may not: autograd keeps it for ReLU's backward)."""

    def __init__(self):
        super().__init__()
        self.l1, self.act, self.out = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)

    def forward(self, x):
        h = self.act(self.l1(x))
        h.mul_(3.0)
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_an_output_autograd_does_not_keep_is_reduced_in_its_hook_before_it_changes_in_place(tmp_path):
    from lightning_gradguard.act_stats import kept_by_autograd

    model = ScaledGELU()
    x = next(iter(_data()))[0]
    assert not kept_by_autograd(model.act(model.l1(x))) and kept_by_autograd(torch.relu(model.l1(x)))
    expected = F.gelu(model.l1(x)).mean().item()  # lr 0: the same weights at every step
    trainer = _trainer(tmp_path, [GradientMonitor(warn=False)], max_steps=3)
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x.repeat(3, 1), torch.zeros(24, dtype=torch.long)),
                                                    batch_size=8))
    events = load_events(trainer.logger.log_dir)
    assert [e.step for e in events.Scalars("act_mean/l1")] == [0, 1, 2]
    for e in events.Scalars("act_mean/l1"):  # GELU's own output, not the 3x it became after the hook
        assert e.value == pytest.approx(expected, rel=1e-5)


def test_hooks_stay_between_consecutive_logging_steps_and_are_gone_otherwise(tmp_path):
    class Validated(SharedReLU):
        def validation_step(self, batch, batch_idx):
            self(batch[0] * 100.0)  # through the hooks, between training steps: must record nothing

    seen: dict[int, list[int]] = {}

    class Count(pl.Callback):  # before the monitor: the hooks left by the previous step
        def __init__(self, every):
            self.every = every

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(self.every, []).append(len(pl_module.l2._forward_hooks))  # shared ReLU: hooked via l2

    for every in (1, 2):
        trainer = _trainer(tmp_path / str(every), [Count(every), GradientMonitor(log_every_n_steps=every, warn=False)],
                           max_steps=5, limit_val_batches=2, val_check_interval=2, check_val_every_n_epoch=None)
        model = Validated()
        trainer.fit(model, train_dataloaders=_data(), val_dataloaders=_data())
        events = load_events(trainer.logger.log_dir)
        assert [e.step for e in events.Scalars("act_dead_frac/l2")] == list(range(0, 5, every))
        assert all(e.value == 0.75 for e in events.Scalars("act_dead_frac/l2"))  # validation recorded nothing
        assert not model.l2._forward_hooks and not model.l1._forward_pre_hooks  # all removed at the end
    assert seen == {1: [0, 1, 1, 1, 1], 2: [0, 0, 0, 0, 0]}


def test_to_device_builds_the_same_tensor_as_torch_tensor():
    from lightning_gradguard.host_transfer import to_device

    for values, dtype in (([2, 0, 1], torch.long), ([0.5, -1.0], None), ([], torch.long), ([1, 2], torch.float64)):
        ref = torch.tensor(values, dtype=dtype)
        got = to_device(values, "cpu", dtype)
        assert got.dtype == ref.dtype and torch.equal(got, ref)
    t = torch.arange(3)
    assert to_device(t, torch.device("cpu")) is t  # already there: no copy
    moved = to_device([1.5, 2.5], "meta")  # another device: the copy branch (shape and dtype; meta has no values)
    assert moved.device.type == "meta" and moved.shape == (2,) and moved.dtype == torch.get_default_dtype()
    assert to_device(t, "cpu", torch.float32).dtype == torch.float32


def test_the_gpu_sync_test_model_rotates_update_ratios_past_the_armed_step(tmp_path):
    """The 200-step GPU test arms at step 5; on its model some layers' update ratios are first measured after
    that, so building their index tensors is inside the check (a small model, whose layers all fit in one
    buffer, built its one index at step 0 and missed a blocking copy there)."""
    monitor = GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False)
    trainer = _trainer(tmp_path, [monitor], max_steps=10)
    trainer.fit(RotatingMLP(), train_dataloaders=_data(80))
    events = load_events(trainer.logger.log_dir)
    tags = [t for t in events.Tags()["scalars"] if t.startswith("update_ratio/")]
    first = {t: min(e.step for e in events.Scalars(t)) for t in tags}
    assert len(first) == 7 and max(first.values()) >= 5, first


def test_gradient_norms_with_a_missing_gradient_reuse_one_index_tensor():
    """The every-step check's per-gradient norms put 0 where a parameter has no gradient; the index that places
    the others is made once, not copied to the device at every step."""
    from lightning_gradguard.stats import GradStatsPlan, layer_groups

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    net(x).sum().backward()
    net[0].bias.grad = None
    plan = GradStatsPlan(layer_groups(net, sample_input=x))
    monitor = GradientMonitor()
    expected = torch.tensor([0.0 if p.grad is None else float(p.grad.norm() ** 2) for p in plan.params])
    first, second = monitor._tensor_sq(plan), monitor._tensor_sq(plan)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert len(monitor._pos_cache) == 1
