"""Weight initialization: Keras-exact schemes (statistical checks), fans, auto detection, the callback."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from lightning_gradguard import WeightInitialization, compute_fans, find_layers, initialize, variance_scaling_
from lightning_gradguard.demo import DeepMLP, SyntheticDataModule
from lightning_gradguard.demo.app import build
from lightning_gradguard.init import NAMED_SCHEMES, TRUNCATED_NORMAL_STD
from tests.helpers import load_events, read_texts

SHAPES = {
    "linear": nn.Linear(300, 200),
    "conv2d": nn.Conv2d(32, 64, 3),
    "conv1d": nn.Conv1d(16, 48, 5),
    "lstm": nn.LSTM(120, 80),
}


def _fan(fans, mode):
    return {"fan_in": fans[0], "fan_out": fans[1], "fan_avg": (fans[0] + fans[1]) / 2}[mode]


@pytest.mark.parametrize("scheme", list(NAMED_SCHEMES))
@pytest.mark.parametrize("kind", list(SHAPES))
def test_named_scheme_variance_and_shape(scheme, kind):
    module = SHAPES[kind]
    net = nn.Sequential(module)
    initialize(net, "auto", overrides={"0": scheme}, seed=0)
    scale, mode, dist = NAMED_SCHEMES[scheme]
    if kind == "lstm":
        w, fans = module.weight_ih_l0[:80], (120, 80)  # one gate block
        assert compute_fans(module, module.weight_ih_l0, blocks=4) == fans
    else:
        w, fans = module.weight, compute_fans(module)
    expected_std = math.sqrt(scale / _fan(fans, mode))
    std = w.detach().std().item()
    n = w.numel()
    assert abs(std - expected_std) < 4 * expected_std / math.sqrt(2 * n) + 1e-3 * expected_std, (std, expected_std)
    assert abs(w.mean().item()) < 4 * expected_std / math.sqrt(n)
    top = w.abs().max().item()
    if dist == "uniform":
        limit = math.sqrt(3) * expected_std
        assert top <= limit + 1e-7 and top > 0.95 * limit  # bounded and filling its range
    else:  # truncated at 2 raw std
        raw = expected_std / TRUNCATED_NORMAL_STD
        assert top <= 2 * raw + 1e-7 and top > 1.9 * raw


def test_untruncated_normal_has_tails_and_exact_variance():
    w = torch.empty(400, 400)
    std = variance_scaling_(w, 2.0, "fan_in", "untruncated_normal", generator=torch.Generator().manual_seed(0))
    assert std == pytest.approx(math.sqrt(2 / 400))
    assert w.std().item() == pytest.approx(std, rel=0.01)
    assert (w.abs() > 2 * std).float().mean().item() == pytest.approx(0.0455, abs=0.005)  # normal's 2σ tail


def test_fans_follow_the_data_flow():
    assert compute_fans(nn.Linear(7, 3)) == (7, 3)
    assert compute_fans(nn.Conv2d(3, 16, 5)) == (75, 400)
    assert compute_fans(nn.Conv3d(2, 4, 3)) == (54, 108)
    assert compute_fans(nn.Conv2d(8, 16, 3, groups=4)) == (18, 144)
    assert compute_fans(nn.ConvTranspose2d(8, 4, 3)) == (72, 36)  # input is dim 0 of a transposed weight
    assert compute_fans(nn.Embedding(1000, 32)) == (1000, 32)
    gru = nn.GRU(10, 20)
    assert compute_fans(gru, gru.weight_hh_l0, blocks=3) == (20, 20)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.2)
        x = torch.tanh(self.b(x))
        x = self.c(x).sigmoid()
        return F.softmax(self.d(F.dropout(x, 0.1, self.training)), dim=-1)


class Untraceable(Functional):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            x = x * 1.0
        x = F.selu(self.a(x))
        x = self.b(x).relu()
        return self.d(torch.tanh(self.c(x)))


def test_auto_sequential_mixed_activations():
    net = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Dropout(), nn.Tanh(), nn.Linear(16, 16), nn.SELU(),
        nn.Linear(16, 16), nn.LeakyReLU(0.3), nn.Linear(16, 16), nn.ELU(), nn.Linear(16, 4),
    )
    rows = initialize(net, "auto", seed=0)
    assert [(r.activation, r.scheme) for r in rows] == [
        ("relu", "he_normal"), ("tanh", "glorot_normal"), ("selu", "lecun_normal"), ("leaky_relu", "he_normal"),
        ("elu", "he_normal"), ("linear", "glorot_normal"),
    ]
    leaky = rows[3]
    assert leaky.target_std == pytest.approx(math.sqrt(2 / (1 + 0.3**2) / 16))


def test_auto_functional_module_and_softmax_output():
    rows = initialize(Functional(), "auto", distribution="uniform", seed=0)
    assert [(r.layer, r.activation, r.scheme) for r in rows] == [
        ("a", "leaky_relu", "he_uniform"), ("b", "tanh", "glorot_uniform"), ("c", "sigmoid", "glorot_uniform"),
        ("d", "softmax", "glorot_uniform"),
    ]


def test_auto_falls_back_to_execution_order_when_fx_fails():
    layers = find_layers(Untraceable(), sample_input=torch.randn(4, 8))
    assert [(i.name, i.activation, i.source) for i in layers] == [
        ("a", "selu", "trace"), ("b", "relu", "trace"), ("c", "tanh", "trace"), ("d", "linear", "trace")
    ]
    without_batch = find_layers(Untraceable())
    assert {i.activation for i in without_batch[:-1]} == {"unknown"}  # listed as such, default Glorot
    assert initialize(Untraceable(), "auto", seed=0)[0].scheme == "glorot_normal"


def test_auto_cnn():
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10),
    )
    rows = initialize(cnn, "auto", seed=0)
    assert [(r.activation, r.scheme, r.fan) for r in rows] == [
        ("relu", "he_normal", 9), ("tanh", "glorot_normal", 72), ("linear", "glorot_normal", 41)
    ]


def test_overrides_exclude_frozen_and_strict():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    net[2].weight.requires_grad_(False)
    frozen_before = net[2].weight.clone()
    excluded_before = net[4].weight.clone()
    rows = initialize(net, "auto", overrides={"0": "lecun_uniform"}, exclude=["4"], seed=0, bias="ones")
    assert rows[0].scheme == "lecun_uniform" and torch.all(net[0].bias == 1)
    assert torch.equal(net[2].weight, frozen_before) and "frozen" in rows[1].note
    assert torch.equal(net[4].weight, excluded_before) and rows[2].note == "excluded"
    with pytest.raises(ValueError, match=r"pattern 'encoder\.\*'.*matches no weighted layer"):
        initialize(net, "auto", overrides={"encoder.*": "he_normal"}, strict=True)


def test_lsuv_reaches_unit_variance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(256, 32)
    rows = initialize(net, "lsuv", sample_input=x, seed=0, lsuv_tol=0.05)
    assert all(r.scheme == "lsuv" for r in rows)
    with torch.no_grad():
        h = x
        for i, layer in enumerate(net):
            h = layer(h)
            if isinstance(layer, nn.Linear):
                assert abs(h.var().item() - 1) <= 0.05, (i, h.var().item())




def _trainer(tmp_path, callbacks, **kw):
    from lightning.pytorch.loggers import TensorBoardLogger

    opts = dict(
        max_epochs=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"), enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
    )
    opts.update(kw)
    return pl.Trainer(**opts)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_callback_in_a_real_fit_inits_once_and_logs_table(tmp_path):
    dm = SyntheticDataModule(num_samples=128, input_shape=[16])
    model = DeepMLP(input_shape=[16], num_classes=4, depth=3, width=32, activation="tanh")
    callback = WeightInitialization("auto", seed=3)
    trainer = _trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(model, datamodule=dm)
    assert [r.scheme for r in callback.records] == ["glorot_normal"] * 4
    events = load_events(trainer.logger.log_dir)
    (text,) = read_texts(events, "gradguard/init")
    assert "net.1" in text and "glorot_normal" in text and "achieved std" in text
    # validate / test after fit leave the weights bit-identical
    after_fit = _weights(model)
    trainer.validate(model, datamodule=dm, verbose=False)
    trainer.test(model, datamodule=dm, verbose=False)
    assert all(torch.equal(after_fit[k], v) for k, v in model.state_dict().items())
    # the same seed gives the same init, independent of torch's global RNG
    other = DeepMLP(input_shape=[16], num_classes=4, depth=3, width=32, activation="tanh")
    torch.manual_seed(123)
    initialize(other, "auto", seed=3)
    fresh = DeepMLP(input_shape=[16], num_classes=4, depth=3, width=32, activation="tanh")
    torch.manual_seed(456)
    initialize(fresh, "auto", seed=3)
    assert torch.equal(other.net[1].weight, fresh.net[1].weight)


def test_resume_from_checkpoint_keeps_trained_weights(tmp_path):
    dm = SyntheticDataModule(num_samples=128, input_shape=[16])
    model = DeepMLP(input_shape=[16], num_classes=4, depth=2, width=16)
    trainer = _trainer(tmp_path, [WeightInitialization("he_normal")], max_epochs=1)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    resumed = DeepMLP(input_shape=[16], num_classes=4, depth=2, width=16)
    callback = WeightInitialization("he_normal")
    trainer2 = _trainer(tmp_path, [callback], max_epochs=1)
    trainer2.fit(resumed, datamodule=dm, ckpt_path=ckpt)  # already at max_epochs: restores, trains nothing
    assert callback.resumed
    assert all(torch.equal(saved[k], v) for k, v in resumed.state_dict().items())


class LazyModel(pl.LightningModule):
    """Builds its layers in configure_model (they do not exist in Callback.setup)."""

    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_models_built_in_configure_model_are_initialized(tmp_path):
    callback = WeightInitialization("he_uniform", seed=0)
    model = LazyModel()
    trainer = _trainer(tmp_path, [callback], max_steps=1)
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=64, input_shape=[16]))
    assert [r.scheme for r in callback.records] == ["he_uniform", "he_uniform"]
    assert "configure_model" not in model.__dict__  # the wrapper removed itself


def test_hydra_presets_compose_and_fix_a_deep_tanh_net(compose_cfg):
    cfg = compose_cfg(["gradguard/init=lecun_uniform", "callbacks.weight_init.seed=1"])
    callback = instantiate(cfg.callbacks.weight_init)
    assert isinstance(callback, WeightInitialization) and callback.scheme == "lecun_uniform"
    with pytest.raises(InstantiationException, match="scheme='glorot'"):
        build(compose_cfg(["gradguard/init=auto", "callbacks.weight_init.scheme=glorot"]))


def test_auto_init_trains_the_deep_tanh_mlp_that_default_init_cannot(compose_cfg):
    """The README's before/after, shortened: 30 tanh layers on digits, 6 epochs."""
    from lightning_gradguard.demo.app import run

    common = ["model.depth=30", "model.activation=tanh", "trainer.max_epochs=6", "trainer.enable_progress_bar=false",
              "trainer.enable_checkpointing=false"]
    before = run(compose_cfg(common))["test_acc"]
    after = run(compose_cfg([*common, "gradguard/init=auto", "callbacks.weight_init.verbose=false"]))["test_acc"]
    assert before < 0.25, before
    assert after > 0.75, after
