"""Every gradguard callback across Lightning's configurations: precision, torch.compile, resume mid-training,
a zoo of model types, LightningCLI, and diagnostics that meet an exotic module."""

from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import (
    ActivationReplacement, BatchNormInsertion, GradientClipping, GradientMonitor, WeightInitialization,
)
from lightning_gradguard._text import parse_markdown_table
from lightning_gradguard.demo import DeepMLP, SyntheticDataModule
from tests.helpers import load_events, read_texts


def _trainer(tmp_path, callbacks, **kw):
    opts = dict(max_steps=3, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"), enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, log_every_n_steps=1,
                num_sanity_val_steps=0)
    opts.update(kw)
    return pl.Trainer(**opts)


def _all():
    return [ActivationReplacement({"tanh": "elu"}, verbose=False), BatchNormInsertion(verbose=False),
            WeightInitialization("auto", verbose=False), GradientMonitor(warn=False), GradientClipping("norm", 1.0)]


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    """On CPU, Lightning turns 16-mixed into bf16-mixed (it warns: fp16 AMP is not supported on CPU), so there
    is no GradScaler; the scaler path (unscaled gradients in on_before_optimizer_step, overflow steps counted
    as AMP overflow) needs a GPU and is the skipped test below."""
    model = DeepMLP(input_shape=[16], num_classes=4, depth=3, width=16, activation="tanh")
    trainer = _trainer(tmp_path, _all(), precision=precision)
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    events = load_events(trainer.logger.log_dir)
    after = [e.value for e in events.Scalars("gradguard/clip/norm_after")]
    assert len(after) == 3 and all(0 < v <= 1.0 + 1e-3 for v in after)
    assert all(e.value > 0 for e in events.Scalars("grad_norm/net.1.layer"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GradScaler (16-mixed) needs a CUDA GPU")
def test_16_mixed_gradscaler_on_gpu(tmp_path):  # pragma: no cover - runs where a GPU is
    clip = GradientClipping("norm", 1.0)
    trainer = _trainer(tmp_path, [GradientMonitor(warn=False), clip], accelerator="gpu", devices=1, precision="16-mixed")
    trainer.fit(DeepMLP(input_shape=[16], num_classes=4, depth=3, width=16), datamodule=SyntheticDataModule(input_shape=[16]))
    after = [e.value for e in load_events(trainer.logger.log_dir).Scalars("gradguard/clip/norm_after")]
    assert all(v <= 1.0 + 1e-2 for v in after)  # unscaled gradients were clipped


# ------------------------------------------------------------------------------------------ compile
def test_torch_compile(tmp_path):
    """A compiled network inside the LightningModule (``self.net = torch.compile(net)``): torch.compile is
    lazy, so the setup-time surgery and init change the network before its first compiled forward; stats
    and clipping then work on the compiled model. (Compiling the whole LightningModule also compiles
    ``self.log`` inside ``training_step``, which dynamo rejects without any gradguard callback.)

    Compiled through AOTAutograd (``aot_eager``: dynamo's graph capture and the compiled backward, minus
    inductor's C++ build), every logged statistic, activation statistics included, equals the eager run's."""

    def run(compiled: bool, where):
        pl.seed_everything(0)
        model = DeepMLP(input_shape=[16], num_classes=4, depth=2, width=16, activation="tanh")
        if compiled:
            model.net = torch.compile(model.net, backend="aot_eager")
        trainer = _trainer(where, _all(), max_steps=5)
        trainer.fit(model, datamodule=SyntheticDataModule(num_samples=128, input_shape=[16]))
        assert any(isinstance(m, nn.ELU) for m in model.modules())
        events = load_events(trainer.logger.log_dir)
        return {t.replace("net._orig_mod.", "net."): [e.value for e in events.Scalars(t)] for t in events.Tags()["scalars"]}

    eager, compiled = run(False, tmp_path / "eager"), run(True, tmp_path / "compiled")
    assert sorted(compiled) == sorted(eager)
    acts = [t for t in eager if t.startswith("act_")]
    assert acts and any("net.1" in t for t in acts)  # activation statistics of the compiled layers are there
    assert len(compiled["gradguard/clip/norm_before"]) == 5
    for tag, values in eager.items():
        assert compiled[tag] == pytest.approx(values, rel=1e-4, abs=1e-6), tag


# ------------------------------------------------------------------------------------------ resume
class Plain(pl.LightningModule):
    """No shuffling, no dropout: an uninterrupted run and a resumed one see the same batches."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1]) * 10

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(128, 16, generator=g), torch.randint(0, 4, (128,), generator=g)),
                          batch_size=16, shuffle=False)


def _resume_callbacks():
    return [ActivationReplacement({"tanh": "elu"}, verbose=False), BatchNormInsertion(verbose=False),
            WeightInitialization("auto", seed=0, verbose=False), GradientMonitor(patience=1, warn=False),
            GradientClipping("percentile", warmup_steps=3, warmup_threshold=1.0)]


def test_resume_mid_training_is_identical_to_an_uninterrupted_run(tmp_path):
    pl.seed_everything(0, verbose=False)
    straight_cbs = _resume_callbacks()
    straight = Plain()
    _trainer(tmp_path / "a", straight_cbs, max_steps=-1, max_epochs=4).fit(straight)

    pl.seed_everything(0, verbose=False)
    first = Plain()
    t1 = _trainer(tmp_path / "b", _resume_callbacks(), max_steps=-1, max_epochs=2)
    t1.fit(first)
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)  # "killed" here

    pl.seed_everything(123, verbose=False)  # a different process: nothing may depend on fresh RNG state
    resumed_cbs = _resume_callbacks()
    resumed = Plain()
    t2 = _trainer(tmp_path / "c", resumed_cbs, max_steps=-1, max_epochs=4)
    t2.fit(resumed, ckpt_path=ckpt)
    assert resumed_cbs[2].resumed_from == str(ckpt) and resumed_cbs[2].records == []  # no re-init
    assert len(resumed_cbs[1].changes) == 2  # same surgery (the checkpoint's keys), not applied twice
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    clip_a, clip_c = straight_cbs[4].state_dict(), resumed_cbs[4].state_dict()
    assert clip_a["steps"] == clip_c["steps"] == 32 and clip_a["clipped"] == clip_c["clipped"]
    assert torch.allclose(clip_a["percentile"]["history"], clip_c["percentile"]["history"], atol=1e-5)
    det_a, det_c = straight_cbs[3].detector.state_dict(), resumed_cbs[3].detector.state_dict()
    assert det_a["tracks"].keys() == det_c["tracks"].keys()
    assert [f["kind"] for f in det_a["findings"]] == [f["kind"] for f in det_c["findings"]]


# ------------------------------------------------------------------------------------------ model zoo
class Seq(pl.LightningModule):
    """Wraps a body (B, T, F) -> logits; the zoo's models differ only in the body."""

    def __init__(self, body: nn.Module, extra_step=None):
        super().__init__()
        self.body = body
        self.extra_step = extra_step

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 6, 8, generator=g)
        return DataLoader(TensorDataset(x, torch.randint(0, 4, (64,), generator=g)), batch_size=16)


class Last(nn.Module):
    def forward(self, x):
        out = x[0] if isinstance(x, tuple) else x
        return out[:, -1]


class RNNBody(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = getattr(nn, kind)(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class AttentionBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class TiedBody(nn.Module):
    """Token embedding and output layer share one weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.emb = nn.Embedding(4, 16)
        self.out = nn.Linear(16, 4, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x).mean(1)))


class FrozenBody(nn.Module):
    """A frozen 'pretrained' layer, a trainable head, and a branch that gets no gradient."""

    def __init__(self):
        super().__init__()
        self.pretrained = nn.Linear(8, 16).requires_grad_(False)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.pretrained(x.mean(1))))


ZOO = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4)),
    "cnn_bn": lambda: nn.Sequential(nn.Conv1d(6, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)),
    "lstm": lambda: RNNBody("LSTM"),
    "gru": lambda: RNNBody("GRU"),
    "transformer": lambda: nn.Sequential(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                              enable_nested_tensor=False), Last(), nn.Linear(8, 4)),
    "attention": AttentionBody,
    "tied": TiedBody,
    "frozen": FrozenBody,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_model_zoo(tmp_path, name):
    body = ZOO[name]()
    model = Seq(body)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = _trainer(tmp_path, _all())
    trainer.fit(model)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} was changed"
    events = load_events(trainer.logger.log_dir)
    assert len(events.Scalars("gradguard/clip/norm_before")) == 3
    assert any(t.startswith("grad_norm/") for t in events.Tags()["scalars"])
    layers = parse_markdown_table(read_texts(events, "gradguard/layers")[0])
    # every trainable weighted layer, those inside torch containers (TransformerEncoder, MultiheadAttention)
    # included, is found by the monitor, has its own gradient-norm tag, and was initialized
    found = {row["layer"] for row in layers}
    init_table = "\n".join(read_texts(events, "gradguard/init"))
    assert init_table, "WeightInitialization wrote no init table"
    weighted = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)
    for mname, module in model.named_modules():
        if not isinstance(module, weighted) or not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if name == "tied" and mname.endswith(".out"):
            continue  # the tied output layer's weight is the embedding's: reported under the owner
        assert mname in found, f"{mname} ({type(module).__name__}) not found; layers: {sorted(found)}"
        if mname.endswith("unused"):
            continue  # no gradient ever reaches it
        assert f"grad_norm/{mname}" in events.Tags()["scalars"], mname
        assert mname in init_table, f"{mname} was not initialized:\n{init_table}"
    if name == "frozen":
        assert {"layer": "body.pretrained", "frozen": "yes"}.items() <= next(l for l in layers if l["layer"] == "body.pretrained").items()
        assert all(not t.endswith("/body.pretrained") for t in events.Tags()["scalars"] if t.startswith("grad_norm/"))


# ------------------------------------------------------------------------------------------ robustness
class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return {"logits": self.fc(x)}


class Exotic(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.block = DictOut()
        self.block.fc.register_forward_hook(lambda m, i, o: None)
        self.wrapped = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.wrapped(self.block(batch[0])["logits"]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_exotic_module_outputs_warn_once_and_training_goes_on(tmp_path, monkeypatch):
    calls = {"n": 0}

    def flaky(self, layer, out, *a, **k):  # a diagnostics failure inside a hook
        calls["n"] += 1
        raise RuntimeError("cannot handle this output")

    monkeypatch.setattr("lightning_gradguard.act_stats.ActivationAccumulator.add", flaky)
    trainer = _trainer(tmp_path, [GradientMonitor(warn=False)], max_steps=4)
    with pytest.warns(UserWarning, match=r"no activation statistics for layer `block.fc`") as rec:
        trainer.fit(Exotic(), datamodule=SyntheticDataModule(num_samples=128, input_shape=[16]))
    assert sum("block.fc" in str(w.message) for w in rec) == 1  # once, not per step
    assert trainer.global_step == 4 and calls["n"] >= 4


# ------------------------------------------------------------------------------------------ LightningCLI
CLI_CASES = [
    ("lightning_gradguard.GradientClipping", ["--trainer.callbacks.algorithm=agc", "--trainer.callbacks.threshold=0.02"],
     lambda cb: cb.algorithm == "agc" and cb.threshold == 0.02),
    ("lightning_gradguard.WeightInitialization", ["--trainer.callbacks.scheme=he_normal"], lambda cb: cb.scheme == "he_normal"),
    ("lightning_gradguard.BatchNormInsertion", ["--trainer.callbacks.position=after_activation"],
     lambda cb: cb.position == "after_activation"),
    ("lightning_gradguard.ActivationReplacement", ['--trainer.callbacks.mapping={"sigmoid": "selu"}'],
     lambda cb: cb.mapping == {"sigmoid": {"name": "selu"}}),
    ("lightning_gradguard.GradientMonitor", ["--trainer.callbacks.log_every_n_steps=5"], lambda cb: cb.log_every_n_steps == 5),
    ("lightning_gradguard.GradGuard", ["--trainer.callbacks.architecture_changes=false"], lambda cb: not cb.architecture_changes),
]


@pytest.mark.parametrize("target, args, check", CLI_CASES, ids=[c[0].split(".")[-1] for c in CLI_CASES])
def test_lightning_cli_builds_each_callback(tmp_path, target, args, check):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        DeepMLP, SyntheticDataModule, run=False,
        args=[f"--trainer.callbacks+={target}", *args, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
    )
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == target.split(".")[-1]]
    assert check(cb)


def test_lightning_cli_reports_the_same_validation_error(tmp_path, capsys):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    with pytest.raises((SystemExit, ValueError)) as info:  # jsonargparse raises when given args=
        LightningCLI(DeepMLP, SyntheticDataModule, run=False,
                     args=["--trainer.callbacks+=lightning_gradguard.GradientClipping", "--trainer.callbacks.threshold=-1",
                           f"--trainer.default_root_dir={tmp_path}"])
    text = str(info.value) + capsys.readouterr().err
    assert "GradientClipping: threshold=-1.0 must be a number > 0.0" in text


class _SyncDebug(pl.Callback):
    """Turns CUDA's sync debug mode to 'error' around the callbacks listed between two instances."""

    def __init__(self, mode: str):
        self.mode = mode

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % 10:  # non-logging steps only
            torch.cuda.set_sync_debug_mode(self.mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_non_logging_steps_never_sync_on_gpu(tmp_path):  # pragma: no cover - runs where a GPU is
    callbacks = [_SyncDebug("error"), GradientMonitor(log_every_n_steps=10, warn=False),
                 GradientClipping("percentile", on_nonfinite="skip"), _SyncDebug("default")]
    trainer = _trainer(tmp_path, callbacks, accelerator="gpu", devices=1, max_steps=12)
    trainer.fit(DeepMLP(input_shape=[16], num_classes=4, depth=3, width=16), datamodule=SyntheticDataModule(input_shape=[16]))
    torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 12
