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
from lightning_gradguard.init import NAMED_SCHEMES, TRUNCATED_NORMAL_STD, kept_layers
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


# ------------------------------------------------------------------------ core units (what mutation testing asks)
def test_format_table_lists_every_field():
    from lightning_gradguard._text import text_table
    from lightning_gradguard.init import InitRecord, format_table

    records = [
        InitRecord("net.0", "Linear", (16, 8), "relu", "he_normal", 8, 0.5, 0.123456, ""),
        InitRecord("emb", "Embedding", (10, 4), "linear", "-", 0, 0.0, 1.0, "embedding kept"),
    ]
    head = ("layer", "type", "shape", "activation", "scheme", "fan", "target std", "achieved std", "note")
    assert format_table(records) == text_table(head, [
        ("net.0", "Linear", "16x8", "relu", "he_normal", "8", "0.5", "0.1235", ""),
        ("emb", "Embedding", "10x4", "linear", "-", "-", "0", "1", "embedding kept"),
    ])


def test_auto_scheme_table():
    from lightning_gradguard.init import auto_scheme

    assert auto_scheme("leaky_relu", 0.3) == ("he_normal", pytest.approx(2.0 / 1.09))
    assert auto_scheme("relu", 0.0, "uniform") == ("he_uniform", 2.0)
    assert auto_scheme("selu", 0.0) == ("lecun_normal", 1.0)
    assert auto_scheme("selu", 0.0, "uniform") == ("lecun_uniform", 1.0)
    assert auto_scheme("tanh", 0.5) == ("glorot_normal", 1.0)
    assert auto_scheme("unknown", 0.0, "uniform") == ("glorot_uniform", 1.0)


def test_variance_scaling_scheme_uses_scale_mode_and_distribution():
    net = nn.Sequential(nn.Linear(200, 50))
    (rec,) = initialize(net, "variance_scaling", scale=3.0, mode="fan_out", vs_distribution="uniform", seed=0)
    std = math.sqrt(3.0 / 50)
    assert (rec.scheme, rec.fan) == ("variance_scaling", 50) and rec.target_std == pytest.approx(std, rel=1e-12)
    w = net[0].weight.detach()
    assert w.abs().max().item() <= math.sqrt(3) * std + 1e-7 and w.abs().max().item() > 0.97 * math.sqrt(3) * std
    assert rec.achieved_std == pytest.approx(float(w.std()), rel=1e-6)
    assert rec.achieved_std == pytest.approx(std, rel=0.05)
    (rec,) = initialize(net, "variance_scaling", scale=0.5, mode="fan_avg", vs_distribution="untruncated_normal", seed=0)
    assert (rec.fan, rec.target_std) == (125, pytest.approx(math.sqrt(0.5 / 125)))
    assert net[0].weight.abs().max().item() > 2.5 * rec.target_std  # normal tails: not truncated, not uniform


def test_he_uniform_carries_the_leaky_slope():
    net = nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.5), nn.Linear(64, 4))
    rows = initialize(net, "auto", distribution="uniform", seed=0)
    assert rows[0].scheme == "he_uniform"
    assert rows[0].target_std == pytest.approx(math.sqrt(2 / 1.25 / 64))
    rows = initialize(net, "he_uniform", seed=0)  # a named He scheme takes the slope of the layer's activation too
    assert rows[0].target_std == pytest.approx(math.sqrt(2 / 1.25 / 64))


def test_orthogonal_gain_and_target():
    net = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 1))
    rows = initialize(net, "orthogonal", gain=2.0, seed=0)
    w = net[0].weight.detach()  # 32x8: orthonormal columns times the gain
    assert torch.allclose(w.T @ w, 4.0 * torch.eye(8), atol=1e-5)
    w = net[1].weight.detach()  # 8x32: orthonormal rows
    assert torch.allclose(w @ w.T, 4.0 * torch.eye(8), atol=1e-5)
    # target: gain / sqrt(the larger side); fan: that side
    assert [(r.fan, r.target_std) for r in rows] == [(32, pytest.approx(2 / math.sqrt(32))),
                                                    (32, pytest.approx(2 / math.sqrt(32))),
                                                    (8, pytest.approx(2 / math.sqrt(8)))]
    assert net[2].weight.detach().norm().item() == pytest.approx(2.0, rel=1e-5)  # one unit row, times the gain


def test_zeros_and_ones_schemes_report_no_target():
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    rows = initialize(net, "auto", overrides={"0": "zeros", "1": "ones"}, bias="ones", seed=0)
    assert [(r.scheme, r.fan, r.target_std, r.achieved_std) for r in rows] == [("zeros", 0, 0.0, 0.0),
                                                                               ("ones", 0, 0.0, 0.0)]
    assert torch.count_nonzero(net[0].weight) == 0 and torch.all(net[1].weight == 1)
    assert torch.all(net[0].bias == 1) and torch.all(net[1].bias == 1)


def test_unknown_scheme_reaching_the_filler_is_named():
    from lightning_gradguard.init import _fill

    with pytest.raises(ValueError, match="unknown scheme 'glorot'"):
        _fill(torch.empty(2, 2), "glorot", (2, 2), None)


def test_a_seed_gives_the_same_weights_whatever_torchs_rng(monkeypatch):
    def weights(scheme, seed, rng):
        torch.manual_seed(rng)
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        initialize(net, scheme, seed=seed)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    for scheme in ("auto", "orthogonal", "variance_scaling", "he_uniform"):
        assert torch.equal(weights(scheme, 3, 1), weights(scheme, 3, 2))
        assert not torch.equal(weights(scheme, 3, 1), weights(scheme, 4, 1))
        assert not torch.equal(weights(scheme, None, 1), weights(scheme, None, 2))  # no seed: torch's RNG
    # Lightning's seed_everything sets PL_GLOBAL_SEED: it seeds the init when no seed is given, never over one
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert torch.equal(weights("auto", None, 1), weights("auto", None, 2))
    assert torch.equal(weights("auto", None, 1), weights("auto", 7, 5))
    assert torch.equal(weights("auto", 3, 1), weights("auto", 3, 9))
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert torch.equal(weights("auto", 3, 1), weights("auto", 3, 8))


def test_biases_frozen_weights_and_records():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(1, 1))
    net[2].weight.requires_grad_(False)
    rows = initialize(net, "auto", bias="ones", seed=0)
    assert torch.all(net[2].bias == 1)  # initialized after its frozen weight
    assert rows[1].note == "frozen kept: weight" and rows[0].note == ""
    assert rows[0] == type(rows[0])("0", "Linear", (8, 8), "relu", "he_normal", 8, pytest.approx(0.5),
                                    pytest.approx(float(net[0].weight.detach().std())), "")
    assert rows[2].achieved_std == 0.0  # one weight: no spread
    two = nn.Sequential(nn.Linear(2, 1))
    (rec,) = initialize(two, "auto", seed=0)
    assert rec.achieved_std == pytest.approx(float(two[0].weight.detach().std())) and rec.achieved_std > 0
    keep = nn.Sequential(nn.Linear(8, 8))
    before = keep[0].bias.detach().clone()
    initialize(keep, "auto", bias="keep", seed=0)
    assert torch.equal(keep[0].bias.detach(), before)


def test_every_element_of_every_trainable_weight_is_written():
    """Parameters set to NaN before the init are finite after it: no gate block, layer or row is skipped."""
    torch.manual_seed(0)
    modules = {
        "rnn": nn.RNN(6, 8, num_layers=2), "lstm": nn.LSTM(6, 8, num_layers=2, proj_size=5),
        "gru": nn.GRU(6, 9), "mha": nn.MultiheadAttention(16, 4), "mha_kdim": nn.MultiheadAttention(16, 4, kdim=7, vdim=5),
    }
    for name, m in modules.items():
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float("nan"))
        initialize(nn.ModuleDict({name: m}), "auto", seed=0, layers=find_layers(nn.ModuleDict({name: m}), method="modules"))
        for pname, p in m.named_parameters():
            assert torch.isfinite(p).all(), f"{name}.{pname} not initialized"


def test_recurrent_and_attention_fans_per_block():
    rnn = nn.Sequential(nn.RNN(10, 20))
    (rec,) = initialize(rnn, "auto", seed=0, layers=find_layers(rnn, method="modules"))
    # a plain RNN has one block: Glorot over (10, 20)
    assert (rec.fan, rec.target_std) == (15, pytest.approx(math.sqrt(2 / 30)))
    lstm = nn.Sequential(nn.LSTM(10, 20))
    (rec,) = initialize(lstm, "auto", seed=0, layers=find_layers(lstm, method="modules"))
    assert (rec.fan, rec.target_std, rec.shape) == (15, pytest.approx(math.sqrt(2 / 30)), (80, 10))
    assert rec.achieved_std == pytest.approx(float(lstm[0].weight_ih_l0.detach().std()))
    hh = lstm[0].weight_hh_l0.detach()
    for b in range(4):  # each gate's recurrent block is orthogonal
        blk = hh[b * 20:(b + 1) * 20]
        assert torch.allclose(blk @ blk.T, torch.eye(20), atol=1e-5)
    mha = nn.MultiheadAttention(16, 4)
    holder = nn.ModuleDict({"att": mha})
    rec = {r.layer: r for r in initialize(holder, "auto", seed=0, layers=find_layers(holder, method="modules"))}
    # in_proj_weight (48, 16) is three (16, 16) projections: Glorot per block
    assert (rec["att"].fan, rec["att"].target_std) == (16, pytest.approx(math.sqrt(2 / 32)))


def test_attention_init_leaves_its_out_proj_to_its_own_row():
    """``initialize`` touches a layer's own parameters only: MultiheadAttention's out_proj is a layer of its own."""
    mha = nn.MultiheadAttention(16, 4)
    holder = nn.ModuleDict({"att": mha})
    layers = [i for i in find_layers(holder, method="modules") if i.name == "att"]
    before = mha.out_proj.weight.detach().clone()
    (rec,) = initialize(holder, "auto", bias="ones", seed=0, layers=layers)
    assert torch.equal(mha.out_proj.weight.detach(), before)
    assert torch.all(mha.in_proj_bias == 1) and not torch.all(mha.out_proj.bias == 1)
    mha.out_proj.weight.requires_grad_(False)
    (rec,) = initialize(holder, "auto", seed=0, layers=layers)
    assert rec.note == ""  # out_proj's frozen weight is not this layer's
    # a parameter of out_proj tied elsewhere is not this layer's either
    tied = nn.ModuleDict({"att": nn.MultiheadAttention(8, 2), "lin": nn.Linear(8, 8)})
    tied.lin.weight = tied.att.out_proj.weight
    rows = {r.layer: r for r in initialize(tied, "auto", seed=0, layers=find_layers(tied, method="modules"))}
    assert rows["att"].note == "" and rows["lin"].note == "weight tied to att.out_proj (initialized there)"


def test_notes_list_every_frozen_and_tied_parameter():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight, b.bias = a.weight, a.bias
    c = nn.Linear(4, 4)
    c.weight.requires_grad_(False)
    c.bias.requires_grad_(False)
    d = nn.Linear(4, 4)
    d.weight = a.weight
    d.bias.requires_grad_(False)
    net = nn.Sequential(a, b, c, d)
    rows = initialize(net, "auto", seed=0)
    assert [r.note for r in rows] == ["", "weight tied to 0, bias tied to 0 (initialized there)",
                                      "frozen kept: weight, bias", "frozen kept: bias; weight tied to 0 (initialized there)"]
    lstm = nn.Sequential(nn.LSTM(4, 8))
    (rec,) = initialize(lstm, "auto", seed=0, layers=find_layers(lstm, method="modules"))
    assert rec.scheme == "glorot_normal (+orthogonal recurrent)"
    (rec,) = initialize(lstm, "glorot_uniform", seed=0, layers=find_layers(lstm, method="modules"))
    assert rec.scheme == "glorot_uniform"


def test_record_of_a_weight_normalized_layer_shows_the_weight():
    from torch.nn.utils.parametrizations import weight_norm

    net = nn.Sequential(weight_norm(nn.Linear(8, 4)))
    (rec,) = initialize(net, "auto", seed=0, layers=find_layers(net, method="modules"))
    assert rec.shape == (4, 8) and rec.achieved_std == pytest.approx(float(net[0].weight.detach().std()))


def test_adapter_layers_with_only_a_trainable_bias_are_kept():
    for name in ("lora_gate", "ia3_scale", "adapter_up"):
        layer = nn.Linear(8, 8)
        layer.weight.requires_grad_(False)
        net = nn.ModuleDict({"fc": nn.Linear(8, 8), name: layer})
        before = layer.bias.detach().clone()
        layers = find_layers(net, method="modules")
        assert kept_layers(net, layers) == {name: f"adapter ({name.split('_')[0]}_*) keeps its own init"}
        initialize(net, "auto", bias="ones", seed=0, layers=layers)
        assert torch.equal(layer.bias.detach(), before), name
        assert torch.all(net.fc.bias == 1)


def test_a_frozen_trained_weight_does_not_keep_the_layers_bias():
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(32, 1) @ torch.randn(1, 32))  # looks trained
    layer.weight.requires_grad_(False)
    net = nn.Sequential(layer)
    assert kept_layers(net) == {}
    (rec,) = initialize(net, "auto", bias="ones", seed=0)
    assert torch.all(layer.bias == 1) and rec.note == "frozen kept: weight"


def test_kept_layers_finds_its_own_layers_or_uses_the_given_ones():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():
        net[2].weight.add_(0.3 * torch.randn(32, 1) @ torch.randn(1, 32))
    assert list(kept_layers(net)) == ["2"] and kept_layers(net)["2"].startswith("trained: top singular value")
    assert kept_layers(net, [i for i in find_layers(net) if i.name == "0"]) == {}


class _Pretrained(nn.Module):
    """What ``from_pretrained`` leaves: a ``config`` naming the checkpoint and a ``base_model_prefix``."""

    base_model_prefix = "model"

    def __init__(self, name="org/tiny"):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(_name_or_path=name)
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)


def test_layers_of_a_loaded_model_are_kept():
    net = nn.ModuleDict({"enc": _Pretrained(), "enc_head": nn.Linear(8, 8), "fresh": _Pretrained(name="")})
    layers = find_layers(net, method="modules")
    assert kept_layers(net, layers) == {"enc.fc1": "loaded by from_pretrained", "enc.fc2": "loaded by from_pretrained"}
    whole = _Pretrained()
    assert kept_layers(whole, find_layers(whole, method="modules")) == {
        "fc1": "loaded by from_pretrained", "fc2": "loaded by from_pretrained"}


class _HeadFirst(nn.Module):
    """An embedding tied to a projection that runs before it in forward order."""

    def __init__(self):
        super().__init__()
        self.head, self.emb = nn.Linear(8, 20, bias=False), nn.Embedding(20, 8)
        self.head.weight = self.emb.weight

    def forward(self, x, ids):
        return self.head(x).sum() + self.emb(ids).sum()


class _Reversed(nn.Module):
    """Tied layers whose names sort the other way round from their forward order; a tied pair that is no layer."""

    def __init__(self):
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(8), nn.LayerNorm(8)
        self.norm_b.weight = self.norm_a.weight
        self.z_in, self.a_out = nn.Linear(8, 8), nn.Linear(8, 8)
        self.a_out.weight = self.z_in.weight

    def forward(self, x):
        return self.a_out(self.norm_b(self.norm_a(self.z_in(x))))


def test_tied_owner_is_the_embedding_else_the_first_in_forward_order():
    net = _HeadFirst()
    before = net.emb.weight.detach().clone()
    rows = {r.layer: r for r in initialize(net, "auto", seed=0, sample_input=(torch.randn(2, 8), torch.tensor([1, 2])))}
    assert torch.equal(net.emb.weight.detach(), before)  # owned by the embedding, which is kept
    assert rows["head"].note == "weight tied to emb (initialized there)"
    net = _Reversed()
    rows = initialize(net, "auto", seed=0)
    assert [r.layer for r in rows] == ["z_in", "a_out"]
    assert (rows[0].note, rows[1].note) == ("", "weight tied to z_in (initialized there)")


def test_tied_linear_layers_are_initialized_by_the_first_in_forward_order():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    net = nn.Sequential(a, nn.Tanh(), b)
    rows = initialize(net, "auto", seed=0)
    # layer 2 initializes only its bias: no scheme of its own for the weight
    assert [(r.layer, r.scheme, r.fan) for r in rows] == [("0", "glorot_normal", 8), ("2", "-", 0)]
    assert rows[1].note == "weight tied to 0 (initialized there)"
    assert rows[0].note == ""
    emb_first = _tied_model()
    rows = {r.layer: r for r in initialize(emb_first, "auto", seed=0)}
    assert (rows["head"].scheme, rows["head"].fan, rows["head"].target_std) == ("-", 0, 0.0)
    assert rows["head"].note == "weight tied to emb (initialized there)"


class _TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def _tied_model():
    return _TiedModel()


def test_bad_arguments_name_the_function_the_field_and_the_choices():
    net = nn.Sequential(nn.Linear(4, 4))
    cases = [
        (dict(scheme="he_normall"), r"^initialize: scheme='he_normall' is not one of: auto, glorot_uniform, .* \(did you "
                                    r"mean 'he_normal'\?\)$"),
        (dict(distribution="gaussian"), r"^initialize: distribution='gaussian' is not one of: normal, uniform$"),
        (dict(fan_convention="torch"), r"^initialize: fan_convention='torch' is not one of: data_flow, keras$"),
        (dict(bias="one"), r"^initialize: bias='one' is not one of: zeros, ones, keep \(did you mean 'ones'\?\)$"),
        (dict(overrides={"0": "lsuv"}), r"^initialize: overrides\['0'\]='lsuv' is not one of: glorot_uniform, "),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            initialize(net, **kwargs)
    with pytest.raises(ValueError, match=r"^variance_scaling_: scale=0\.0 must be a number > 0\.0$"):
        variance_scaling_(torch.empty(4, 4), scale=0.0)
    with pytest.raises(ValueError, match=r"^variance_scaling_: scale=-1\.0 must be a number > 0\.0$"):
        variance_scaling_(torch.empty(4, 4), scale=-1.0)
    with pytest.raises(ValueError, match=r"^compute_fans: convention='tf' is not one of: data_flow, keras$"):
        compute_fans(nn.Linear(2, 2), convention="tf")


def test_defaults():
    w = torch.empty(400, 100)
    std = variance_scaling_(w, generator=torch.Generator().manual_seed(0))  # LeCun: 1/fan_in, truncated normal
    assert std == pytest.approx(0.1)
    assert w.abs().max().item() <= 2 * 0.1 / TRUNCATED_NORMAL_STD + 1e-7 and w.std().item() == pytest.approx(0.1, rel=0.02)
    net = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30))
    assert [r.scheme for r in initialize(net, seed=0)] == ["he_normal", "glorot_normal"]  # scheme="auto"
    (a, b) = initialize(net, "variance_scaling", seed=0)  # scale 1, fan_in, truncated normal
    assert (a.fan, a.target_std, b.target_std) == (50, pytest.approx(math.sqrt(1 / 50)), pytest.approx(math.sqrt(1 / 40)))
    assert net[0].weight.abs().max().item() <= 2 * a.target_std / TRUNCATED_NORMAL_STD + 1e-7
    initialize(net, "auto", overrides={"nothing.*": "zeros"})  # not strict by default: no error


def test_model_without_parameters_and_a_traced_fallback():
    assert initialize(nn.Sequential(nn.ReLU()), "auto", seed=0) == []
    rows = initialize(Untraceable(), "auto", sample_input=torch.randn(4, 8), seed=0)
    assert [(r.activation, r.scheme) for r in rows] == [("selu", "lecun_normal"), ("relu", "he_normal"),
                                                        ("tanh", "glorot_normal"), ("linear", "glorot_normal")]


def test_rows_of_layers_left_alone():
    torch.manual_seed(0)
    net = nn.ModuleDict({"emb": nn.Embedding(10, 8), "a": nn.Linear(8, 8), "b": nn.Linear(32, 32), "c": nn.Linear(8, 8)})
    with torch.no_grad():
        net.b.weight.add_(0.3 * torch.randn(32, 1) @ torch.randn(1, 32))  # looks trained
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    layers = find_layers(net, method="modules")
    rows = {r.layer: r for r in initialize(net, "auto", exclude=["a"], seed=0, layers=layers)}
    keep = lambda r: (r.scheme, r.fan, r.target_std, r.note)  # noqa: E731
    assert keep(rows["emb"]) == ("-", 0, 0.0, "embedding kept (name it in overrides to init)")
    assert keep(rows["a"]) == ("-", 0, 0.0, "excluded")
    assert keep(rows["b"])[:3] == ("-", 0, 0.0)
    assert rows["b"].note.startswith("kept: trained: top singular value ") and rows["b"].note.endswith(
        "× the random edge (force=True re-initializes)")
    for name in ("emb", "a", "b"):
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if k.startswith(name + "."))
    assert rows["c"].scheme == "glorot_normal" and not torch.equal(before["c.weight"], net.c.weight.detach())


def test_lsuv_defaults_and_orthogonal_start():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(256, 32)
    rows = initialize(net, "lsuv", sample_input=x, seed=0)
    for r in rows:  # default tolerance 0.1
        var = float(r.note.split()[2])
        assert abs(var - 1) <= 0.1, r.note
    w = net[0].weight.detach()  # orthogonal columns, rescaled: W^T W is a multiple of the identity
    gram = w.T @ w
    assert torch.allclose(gram, gram[0, 0] * torch.eye(32), atol=1e-4 * gram[0, 0].item())
    # biases spread wider than the target variance: it can never reach 1, so it stops after 10 rescales
    net = nn.Sequential(nn.Linear(16, 64))
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([1.5, -1.5] * 32))
    (rec,) = initialize(net, "lsuv", sample_input=torch.randn(128, 16), bias="keep", seed=0)
    assert rec.note.endswith("after 10 rescale(s)")


def test_fans_of_other_weight_shapes_are_integers():
    from transformers.pytorch_utils import Conv1D

    cases = {
        "hf_conv1d": (compute_fans(Conv1D(8, 4)), (4, 8)),  # GPT-2's Conv1D stores (in, out)
        "bilinear": (compute_fans(nn.Bilinear(4, 5, 3)), (20, 15)),  # (out, in1, in2): in1·in2, out·in2
        "vector": (compute_fans(nn.Linear(1, 1), torch.empty(7)), (7, 7)),
        "lstm_ih": (compute_fans(nn.LSTM(6, 5), nn.LSTM(6, 5).weight_ih_l0, blocks=4), (6, 5)),
        "tconv_groups": (compute_fans(nn.ConvTranspose2d(4, 6, 3, groups=2)), (18, 27)),
    }
    for name, (got, want) in cases.items():
        assert got == want and all(type(f) is int for f in got), (name, got)


def test_variance_scaling_fan_floor_and_seeded_distributions():
    assert variance_scaling_(torch.empty(1, 1), scale=2.0) == pytest.approx(math.sqrt(2.0))  # fan 1
    assert variance_scaling_(torch.empty(3, 3), scale=2.0, fans=(0, 0)) == pytest.approx(math.sqrt(2.0))  # at least 1
    assert variance_scaling_(torch.empty(3, 3), mode="fan_avg", fans=(1, 2)) == pytest.approx(math.sqrt(1 / 1.5))
    for dist in ("truncated_normal", "untruncated_normal", "uniform"):
        a, b = torch.empty(50, 50), torch.empty(50, 50)
        variance_scaling_(a, distribution=dist, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(1)
        variance_scaling_(b, distribution=dist, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b), dist
    with pytest.raises(ValueError, match=r"^variance_scaling_: mode='fan' is not one of: fan_in, fan_out, fan_avg"):
        variance_scaling_(torch.empty(2, 2), mode="fan")
    with pytest.raises(ValueError, match=r"^variance_scaling_: distribution='normal' is not one of: truncated_normal, "
                                         r"untruncated_normal, uniform"):
        variance_scaling_(torch.empty(2, 2), distribution="normal")


def test_lsuv_arguments_reach_the_rescaling():
    x = torch.randn(256, 32)
    net = nn.Sequential(nn.Linear(32, 64))  # orthogonal start: output variance 32/64, outside any small tolerance
    (rec,) = initialize(net, "lsuv", sample_input=x, seed=0, lsuv_tol=10.0)
    assert rec.note.endswith("after 0 rescale(s)")
    net = nn.Sequential(nn.Linear(16, 64))
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([1.5, -1.5] * 32))  # the variance can never reach 1: the cap binds
    (rec,) = initialize(net, "lsuv", sample_input=torch.randn(128, 16), bias="keep", seed=0, lsuv_max_iters=2)
    assert rec.note.endswith("after 2 rescale(s)")
    with pytest.raises(ValueError, match=r"^initialize: scheme='lsuv' needs sample_input \(a training batch\)$"):
        initialize(net, "lsuv")


def test_strict_lists_the_layers_and_a_trained_child_does_not_keep_its_parent():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"matches no weighted layer; layers are: 0, 2, 4$"):
        initialize(net, "auto", exclude=["head"], strict=True)
    torch.manual_seed(0)
    holder = nn.ModuleDict({"att": nn.MultiheadAttention(32, 4)})
    with torch.no_grad():
        holder.att.out_proj.weight.add_(0.3 * torch.randn(32, 1) @ torch.randn(1, 32))  # looks trained
    kept = kept_layers(holder, find_layers(holder, method="modules"))
    assert list(kept) == ["att.out_proj"]  # the attention's own projections are fresh
