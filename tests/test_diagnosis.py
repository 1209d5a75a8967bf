"""Findings that name the cause: exploding before NaN, where a NaN came from, vanishing only over compute
layers, training-progress findings from the loss, non-finite tracking across several optimizers, no finding on
ordinary architectures, and the fault zoo's quick run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientMonitor
from lightning_gradguard.demo import DeepMLP, DigitsDataModule
from lightning_gradguard.health import HealthDetector, LayerRow
from tests.helpers import load_events, read_texts

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_path, callbacks, **kw):
    opts = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                callbacks=callbacks, logger=TensorBoardLogger(tmp_path, name="tb"), limit_val_batches=0)
    opts.update(kw)
    return pl.Trainer(**opts)


def _row(name, norm, weighted=True, **kw):
    return LayerRow(name, f"layer `{name}`", None, norm, weighted=weighted, **kw)


# ----------------------------------------------------------------------------------------- detector units
def test_exploding_above_the_hard_bound_fires_at_once_and_below_it_needs_patience():
    d = HealthDetector(patience=3, exploding_norm=1e3, exploding_hard_norm=1e5)
    assert [f.kind for f in d.update(0, [_row("a", 1e6), _row("b", 1.0)], 1e6)] == ["exploding"]
    soft = HealthDetector(patience=3)
    kinds = [[f.kind for f in soft.update(s, [_row("a", 1e4), _row("b", 1.0)], 1e4)] for s in range(3)]
    assert kinds == [[], [], ["exploding"]]


def test_vanishing_ignores_norm_layers_embeddings_and_exact_zeros():
    d = HealthDetector(patience=1)
    rows = [_row("emb", 1e-9, weighted=False), _row("fc1", 0.5), _row("ln", 1e-12, weighted=False),
            _row("unused", 0.0), _row("fc2", 0.4), _row("head", 1.0)]
    assert d.update(0, rows, 1.0) == []
    # a real collapse: the input-side compute layers are all far below the output side's
    rows = [_row("fc1", 1e-8), _row("bn", 1.0, weighted=False), _row("fc2", 1e-6), _row("fc3", 0.3), _row("head", 1.0)]
    (f,) = d.update(1, rows, 1.0)
    assert f.kind == "vanishing" and f.layer == "fc2" and "collapses at depth 2 of 4" in f.message
    # one small layer in the middle (an attention key projection) is not vanishing by depth
    d2 = HealthDetector(patience=1)
    assert d2.update(0, [_row("q", 0.5), _row("k", 1e-6), _row("v", 0.5), _row("head", 1.0)], 1.0) == []


def test_nonfinite_says_what_preceded_and_whether_the_loss_was_finite():
    d = HealthDetector(patience=3)
    for s, total in enumerate([1.0, 30.0, 900.0]):
        d.update(s, [_row("a", total), _row("b", 1.0)], total)
    (f,) = d.update(3, [_row("a", float("nan"), grad_nonfinite=5.0), _row("b", float("nan"), grad_nonfinite=2.0),
                        _row("c", 1.0)], float("nan"))
    assert f.kind == "nonfinite" and f.layer == "b"  # nearest the loss with NaN
    assert "backward pass" in f.message and "grew ×900" in f.message
    d = HealthDetector()
    d.update_loss(0, 2.3)
    d.update_loss(5, float("nan"), nonfinite_step=4)
    (f,) = d.update(5, [_row("a", float("nan"), grad_nonfinite=1.0)], float("nan"))
    assert "loss itself was already non-finite" in f.message
    d = HealthDetector()
    rows = [_row("a", float("nan"), grad_nonfinite=1.0, act_finite=True), _row("b", float("nan"), grad_nonfinite=1.0,
            act_finite=False), _row("c", float("nan"), grad_nonfinite=1.0, act_finite=False)]
    (f,) = d.update(0, rows, float("nan"))
    assert f.layer == "b" and "forward pass" in f.message and "first layer whose output was non-finite" in f.message


def _losses(d, values, every=10):
    out = []
    for i, v in enumerate(values):
        out += d.update_loss(i * every, v)
    return [f.kind for f in out]


def test_progress_rules_on_loss_curves():
    falling = [2.3 * 0.8**i for i in range(25)]
    assert _losses(HealthDetector(), falling) == []
    assert _losses(HealthDetector(), [2.30 - 0.001 * i for i in range(25)]) == ["not_converging"]
    plateau = [2.3, 2.0, 1.8, 1.7, 1.65] + [1.62 + 0.005 * (i % 2) for i in range(20)]
    assert _losses(HealthDetector(), plateau) == ["plateau"]
    swinging = [2.3, 1.2] + [0.6 + 0.5 * (i % 2) for i in range(23)]
    assert "oscillation" in _losses(HealthDetector(), swinging)
    # a converged loss wobbling at 0.01 is not oscillating
    assert _losses(HealthDetector(), [2.3, 1.0, 0.3] + [0.01 + 0.01 * (i % 2) for i in range(22)]) == []


def test_update_ratio_and_frozen_rules():
    d = HealthDetector(patience=2)
    rows = [_row("a", 1.0, update_ratio=1e-7), _row("b", 1.0, update_ratio=2e-7)]
    assert [f.kind for s in range(2) for f in d.update(s, rows, 1.0)] == ["update_ratio"]
    layers = [("a", "a", True, True), ("b", "b", True, False), ("c", "c", True, True)]
    assert [f.layer for f in HealthDetector().frozen(0, layers)] == ["b"]
    backbone = [("a", "a", True, False), ("b", "b", True, False), ("c", "c", True, True), ("d", "d", True, True),
                ("e", "e", True, True)]
    assert HealthDetector().frozen(0, backbone) == []  # a frozen prefix is fine-tuning, not a mistake


# ----------------------------------------------------------------------------------------- real training
@pytest.mark.parametrize("cadence", [None, 1])
def test_normal_init_relu_net_gets_an_exploding_finding_before_the_nan(tmp_path, cadence):
    """The issue's case: 16-layer ReLU MLP, weights N(0, 1), SGD lr 0.05, digits: the gradients are
    non-finite from step 1; the exploding finding must come no later than that step."""
    pl.seed_everything(0, verbose=False)
    model = DeepMLP(depth=16, width=64, init_std=1.0, lr=0.05, momentum=0.0)
    monitor = GradientMonitor(log_every_n_steps=cadence, warn=False)
    trainer = _trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(model, datamodule=DigitsDataModule())
    found = {f.kind: f for f in reversed(monitor.detector.findings)}
    assert "nonfinite" in found and "exploding" in found, monitor.detector.summary()
    assert found["exploding"].step <= found["nonfinite"].step
    assert "huge before it" in found["nonfinite"].message or "grew" in found["nonfinite"].message
    texts = read_texts(load_events(trainer.logger.log_dir), "gradguard/findings")
    assert any("| exploding |" in t for t in texts), texts


class TwoPlayers(pl.LightningModule):
    """GAN-style manual optimization with two optimizers; the discriminator's backward yields NaN once."""

    def __init__(self, nan_at_batch: int):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.disc = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        self.nan_at_batch = nan_at_batch
        self.step_of_nan = None

    def training_step(self, batch, batch_idx):
        (x,) = batch
        g_opt, d_opt = self.optimizers()
        fake = self.gen(torch.randn(x.shape[0], 8))
        d_loss = F.softplus(self.disc(fake.detach())).mean() + F.softplus(-self.disc(x)).mean()
        if batch_idx == self.nan_at_batch:
            d_loss = d_loss + 0.0 * torch.sqrt(self.disc[2].weight - self.disc[2].weight.detach()).sum()
            self.step_of_nan = self.trainer.global_step
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        for p in self.disc.parameters():  # keep the run finite after the faulty step (what a skip would do)
            p.grad = torch.nan_to_num(p.grad, nan=0.0) if batch_idx != self.nan_at_batch else p.grad
        d_opt.step()
        with torch.no_grad():
            for p in self.disc.parameters():
                p.nan_to_num_(0.0)
        g_loss = F.softplus(-self.disc(self.gen(torch.randn(x.shape[0], 8)))).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        return g_loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.01), torch.optim.SGD(self.disc.parameters(), lr=0.01)


def test_two_optimizers_keep_the_first_nonfinite_step(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(512, 16)), batch_size=32)
    model = TwoPlayers(nan_at_batch=3)
    # the NaN is born in backward and repaired before it reaches the loss or the weights: only a look at every
    # step's gradients sees it (nonfinite_check="auto" looks at them when the loss or the weights turn non-finite)
    monitor = GradientMonitor(log_every_n_steps=10, warn=False, activation_stats=False, nonfinite_check="every_step")
    trainer = _trainer(tmp_path, [monitor], max_steps=24)
    trainer.fit(model, train_dataloaders=data)
    nonfinite = [f for f in monitor.detector.findings if f.kind == "nonfinite"]
    assert model.step_of_nan is not None and model.step_of_nan % 10 != 0  # between logging steps
    # the generator's optimizer steps in between must not wipe the record of the discriminator's NaN
    assert [(f.step, f.layer) for f in nonfinite] == [(model.step_of_nan, "disc.2")], monitor.detector.summary()


class FortyLayers(DeepMLP):
    def __init__(self):
        super().__init__(depth=40, width=32, lr=0.01, momentum=0.0)


def test_gradguard_summary_says_the_loss_is_not_falling(tmp_path):
    """GradGuard's own monitor: a 40-layer ReLU MLP left as it is (remedies off, so the probe's trials do not
    run) learns next to nothing in 110 steps; the end-of-fit summary must say so, not "no problems"."""
    from lightning_gradguard import GradGuard

    pl.seed_everything(0, verbose=False)
    gg = GradGuard(init="off", batchnorm="off", activation="off", clipping="off", verbose=False, seed=0)
    trainer = _trainer(tmp_path, [gg], max_steps=110, log_every_n_steps=10)
    trainer.fit(FortyLayers(), datamodule=DigitsDataModule())
    summary = read_texts(load_events(trainer.logger.log_dir), "gradguard/summary")
    assert summary and "no gradient problems found" not in summary[-1], summary
    assert "not converging" in summary[-1] or "plateau" in summary[-1], summary


# ----------------------------------------------------------------------------------------- ordinary architectures
class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-3):
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TinyTransformer(nn.Module):
    """Token embedding + a learned position table (a bare parameter) + nn.TransformerEncoder + head."""

    def __init__(self, vocab=32, d=16, seq=12, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, seq, d))
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.norm(self.encoder(self.emb(tokens) + self.pos)).mean(dim=1))


class EmbedNorm(nn.Module):
    """Embedding bag + LayerNorm + MLP, with a parameter the forward never uses (gradient None)."""

    def __init__(self, vocab=32, d=32, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, classes)
        self.unused = nn.Linear(d, d)  # e.g. a head kept for another task

    def forward(self, tokens):
        return self.fc2(F.gelu(self.fc1(self.norm(self.emb(tokens).mean(dim=1)))))


def _tokens(n=512, seq=12, vocab=32, classes=4):
    """Learnable sequences: most tokens of a class-``c`` sequence come from that class's 8-token range."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    own = y[:, None] * (vocab // classes) + torch.randint(0, vocab // classes, (n, seq), generator=g)
    noise = torch.randint(0, vocab, (n, seq), generator=g)
    x = torch.where(torch.rand(n, seq, generator=g) < 0.7, own, noise)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


def _images(n=512, classes=4):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, 3, 6, 6, generator=g)
    x = centers[y] + 0.5 * torch.randn(n, 3, 6, 6, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    )


ARCHITECTURES = {
    "transformer_encoder": (lambda: TinyTransformer(), _tokens),
    "cnn_batchnorm": (_cnn, _images),
    "embedding_layernorm_unused_param": (lambda: EmbedNorm(), _tokens),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_finding_on_ordinary_architectures(tmp_path, arch):
    """200 steps of unmodified architectures (norm layers, embeddings, a position table, an unused parameter),
    watched at the default cadence (the Trainer's 50 steps) and on every step (two monitors, one fit): no
    finding at all."""
    pl.seed_everything(0, verbose=False)
    build, data = ARCHITECTURES[arch]
    default = GradientMonitor(histogram_every_n_steps=0, warn=False)
    every = GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False)
    trainer = _trainer(tmp_path, [default, every], max_steps=200)
    trainer.fit(Classifier(build()), train_dataloaders=data())
    for monitor in (default, every):
        assert monitor.detector.findings == [], monitor.detector.summary()
        assert "the training loss is falling" in monitor.detector.summary()
    # windows of >= 10 steps: every step → 20 windows; every 50 → steps 0-50, 51-100, 101-150, 151-199 (the tail)
    assert len(every.detector.losses) == 20 and len(default.detector.losses) == 4


class HFClassifier(nn.Module):
    """A tiny Hugging Face sequence classifier built from a config (random weights, no download)."""

    def __init__(self, kind: str):
        super().__init__()
        import transformers as tf

        if kind == "bert":
            cfg = tf.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16, num_labels=4)
            self.model = tf.BertForSequenceClassification(cfg)
        else:
            cfg = tf.BartConfig(vocab_size=32, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                max_position_embeddings=16, num_labels=4, pad_token_id=1, bos_token_id=0, eos_token_id=2)
            self.model = tf.BartForSequenceClassification(cfg)
        self.kind = kind

    def forward(self, tokens):
        if self.kind == "bart":  # BART classifies from the <eos> token: exactly one per sequence
            tokens = torch.cat([tokens.clamp(min=3), torch.full_like(tokens[:, :1], 2)], dim=1)
        return self.model(input_ids=tokens).logits


@pytest.mark.parametrize("kind", ["bert", "bart"])
def test_no_finding_on_tiny_hugging_face_models(tmp_path, kind):
    """Tiny BERT and BART (query/key projections with near-zero gradients at init, a pooler/classification head
    far larger than the body's layers, LayerNorms, embeddings, position tables): 200 steps, default cadence and
    every step, no finding."""
    pytest.importorskip("transformers")
    pl.seed_everything(0, verbose=False)
    default = GradientMonitor(histogram_every_n_steps=0, warn=False)
    every = GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False)
    trainer = _trainer(tmp_path, [default, every], max_steps=200)
    trainer.fit(Classifier(HFClassifier(kind)), train_dataloaders=_tokens())
    for monitor in (default, every):
        assert monitor.detector.findings == [], monitor.detector.summary()


def test_fault_zoo_quick_run():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_zoo.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "recall: 3/3 = 100%" in proc.stdout and "false alarms: 0/1" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4 and all("| yes (1/1) |" in r for r in rows)
    assert math.isfinite(float(proc.stdout.split("s of training")[0].split()[-1]))
