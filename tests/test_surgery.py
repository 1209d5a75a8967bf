"""Model surgery: BatchNorm insertion and activation replacement on many model shapes, idempotence, the
callbacks in real Trainer runs, and checkpoint round trips (resume, load_from_checkpoint, restore)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_gradguard
from lightning_gradguard import (
    ActivationReplacement, BatchNormInsertion, Normalized, WeightInitialization, insert_batchnorm,
    replace_activations, restore, surgery_spec,
)
from lightning_gradguard.demo import DeepMLP, SyntheticDataModule
from tests.helpers import load_events, read_texts


def _n(m):
    return sum(p.numel() for p in m.parameters())


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def test_sequential_before_activation_drops_bias_and_leaves_output_alone():
    net = mlp()
    before = _n(net)
    changes = insert_batchnorm(net)
    assert [c.path for c in changes] == ["0", "2"]
    assert isinstance(net[0], Normalized) and net[0].layer.bias is None
    assert isinstance(net[0].post, nn.BatchNorm1d) and net[0].post.num_features == 16
    assert isinstance(net[4], nn.Linear) and net[4].bias is not None  # output layer untouched
    assert _n(net) == before - 16 - 16 + 32 + 32 == before + sum(c.params_delta for c in changes)
    assert net(torch.randn(5, 8)).shape == (5, 3)


def test_after_activation_wraps_the_activation_and_keeps_bias():
    net = mlp()
    changes = insert_batchnorm(net, position="after_activation")
    assert [c.path for c in changes] == ["1", "3"]
    assert isinstance(net[1], Normalized) and isinstance(net[1].layer, nn.Sigmoid)
    assert net[0].bias is not None
    assert net(torch.randn(5, 8)).shape == (5, 3)


class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.fc(x))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_nested_custom_module_and_functional_activation():
    net = Nested()
    changes = insert_batchnorm(net, position="after_activation")
    paths = {c.path: c.note for c in changes}
    assert set(paths) == {"stem", "blocks.0.act", "blocks.1.act"}
    assert "functional" in paths["stem"]  # F.relu cannot be wrapped: BN placed right after the layer
    assert isinstance(net.stem, Normalized) and isinstance(net.blocks[0].act, Normalized)
    assert net(torch.randn(3, 4)).shape == (3, 2)


def test_cnn_gets_batchnorm2d_and_head_is_left_alone():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 2 * 2, 10))
    changes = insert_batchnorm(cnn)
    assert [c.path for c in changes] == ["0", "3"]
    assert isinstance(cnn[0].post, nn.BatchNorm2d) and cnn[0].post.num_features == 4
    assert isinstance(cnn[6], nn.Linear)
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_linear_over_sequences_normalizes_the_feature_dim():
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    insert_batchnorm(net)
    x = torch.randn(4, 7, 6) * 3 + 2  # (B, T, F)
    h = net[0](x)
    assert h.shape == (4, 7, 5)
    flat = h.reshape(-1, 5)
    assert torch.allclose(flat.mean(0), torch.zeros(5), atol=1e-5)  # per feature over B*T
    assert torch.allclose(flat.var(0, unbiased=False), torch.ones(5), atol=1e-3)


def test_model_already_containing_batchnorm_is_skipped_and_surgery_is_idempotent():
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [c.path for c in insert_batchnorm(net)] == ["3"]
    keys = list(net.state_dict())
    assert insert_batchnorm(net) == [] and replace_activations(net, {"sigmoid": "elu"}) == []
    assert list(net.state_dict()) == keys
    assert len(surgery_spec(net)) == 1


def test_input_batchnorm():
    net = mlp()
    changes = insert_batchnorm(net, input_batchnorm=True)
    assert isinstance(net[0].pre, nn.BatchNorm1d) and net[0].pre.num_features == 8
    assert changes[0].after == "BatchNorm1d → Linear 8→16 → BatchNorm1d"


@pytest.mark.parametrize(
    "target, check",
    [
        ({"name": "leaky_relu", "negative_slope": 0.2}, lambda m: isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2),
        ({"name": "prelu", "num_parameters": "per-channel"}, lambda m: isinstance(m, nn.PReLU) and m.num_parameters == 16),
        ({"name": "prelu"}, lambda m: isinstance(m, nn.PReLU) and m.num_parameters == 1),
        ({"name": "rrelu", "lower": 0.1, "upper": 0.2}, lambda m: isinstance(m, nn.RReLU) and m.upper == 0.2),
        ({"name": "elu", "alpha": 0.5}, lambda m: isinstance(m, nn.ELU) and m.alpha == 0.5),
        ("selu", lambda m: isinstance(m, nn.SELU)),
        ("gelu", lambda m: isinstance(m, nn.GELU)),
        ("silu", lambda m: isinstance(m, nn.SiLU)),
    ],
)
def test_replacement_targets(target, check):
    net = mlp()
    changes = replace_activations(net, {"sigmoid": target, "tanh": target})
    assert [c.path for c in changes] == ["1", "3"]
    assert check(net[1]) and check(net[3])
    assert net(torch.randn(2, 8)).shape == (2, 3)


class FunctionalInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Nested()

    def forward(self, x):
        return torch.sigmoid(self.body(x))  # in the root's own forward


def test_functional_activations_are_rewritten_with_fx_or_reported():
    net = FunctionalInside()
    changes = replace_activations(net, {"relu": "leaky_relu", "sigmoid": "elu"})
    rows = {c.before: c for c in changes}
    assert rows["relu (functional)"].note == "fx rewrite"
    assert isinstance(net.body, torch.fx.GraphModule)
    assert any(isinstance(m, nn.LeakyReLU) for m in net.body.modules())
    assert "not replaceable" in rows["sigmoid (functional)"].note  # root forward: reported
    assert net(torch.randn(3, 4)).shape == (3, 2)


# ------------------------------------------------------------------------------------- idempotence
def _tree(net):
    """The module tree: every module's path and type, every parameter's and buffer's path and shape."""
    return ([(n, type(m).__name__) for n, m in net.named_modules()],
            [(n, tuple(t.shape)) for n, t in net.state_dict().items()])


def _twice(net, surgery):
    first = surgery(net)
    tree, spec = _tree(net), surgery_spec(net)
    second = surgery(net)
    assert first, "the first call must change something, or the test proves nothing"
    assert [c for c in second if c.after != "-"] == []  # "not replaceable" rows are reported again, nothing changes
    assert _tree(net) == tree and surgery_spec(net) == spec
    return net


@pytest.mark.parametrize("kw", [dict(), dict(input_batchnorm=True), dict(position="after_activation"),
                                dict(position="after_activation", input_batchnorm=True)])
def test_insert_batchnorm_twice_is_once(kw):
    net = _twice(mlp(), lambda m: insert_batchnorm(m, **kw))
    assert net(torch.randn(4, 8)).shape == (4, 3)


def test_insert_batchnorm_after_functional_or_nested_activations_twice_is_once():
    _twice(Nested(), lambda m: insert_batchnorm(m, position="after_activation"))


def test_replace_activation_modules_twice_is_once():
    net = _twice(mlp(), lambda m: replace_activations(m, {"sigmoid": {"name": "prelu", "num_parameters": "per-channel"},
                                                           "tanh": {"name": "leaky_relu", "negative_slope": 0.2}}))
    with torch.no_grad():
        net[1].weight.fill_(0.5)
    same_target = {"leaky_relu": {"name": "leaky_relu", "negative_slope": 0.2}, "prelu": "prelu"}
    assert replace_activations(net, same_target) == [] and float(net[1].weight[0]) == 0.5  # trained slopes kept


def test_replace_functional_activations_twice_is_once_and_a_second_mapping_still_applies():
    net = _twice(Nested(), lambda m: replace_activations(m, {"relu": "elu"}))
    assert not isinstance(net, torch.fx.GraphModule)  # root forward: reported, not rewritten

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.sigmoid(F.relu(self.fc(x)))

    net = _twice(nn.Sequential(Inner(), nn.Linear(4, 2)), lambda m: replace_activations(m, {"relu": "elu"}))
    changes = replace_activations(net, {"sigmoid": "tanh"})  # the rewritten module is rewritten again
    assert [c.path for c in changes] == ["0.gradguard_act_1"]
    assert isinstance(net[0].gradguard_act_0, nn.ELU) and isinstance(net[0].gradguard_act_1, nn.Tanh)
    assert net(torch.randn(3, 4)).shape == (3, 2)


def test_restore_twice_is_once():
    net = mlp()
    insert_batchnorm(net, position="after_activation")
    replace_activations(net, {"sigmoid": "elu", "tanh": "elu"})
    checkpoint = {"gradguard_surgery": surgery_spec(net), "state_dict": net.state_dict()}
    fresh = _twice(mlp(), lambda m: restore(m, checkpoint))
    assert _tree(fresh) == _tree(net)
    fresh.load_state_dict(checkpoint["state_dict"])


def test_a_chain_of_replacements_is_refused():
    with pytest.raises(ValueError, match=r"mapping\['sigmoid'\] -> 'tanh' is itself a source"):
        replace_activations(mlp(), {"sigmoid": "tanh", "tanh": "elu"})
    with pytest.raises(ValueError, match="a chain is not idempotent"):
        ActivationReplacement({"sigmoid": "leaky_relu", "leaky_relu": {"name": "leaky_relu", "negative_slope": 0.2}})


class MyConv(nn.Conv2d):
    pass


def test_batchnorm_type_follows_the_layers_base_class():
    net = nn.Sequential(MyConv(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    insert_batchnorm(net)
    assert type(net[0].post) is nn.BatchNorm2d and type(net[2].post) is nn.BatchNorm1d


# ------------------------------------------------------------------------------------------ Trainer
def _trainer(tmp_path, callbacks, **kw):
    opts = dict(max_epochs=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"),
                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    opts.update(kw)
    return pl.Trainer(**opts)


class RestoringMLP(DeepMLP):
    def on_load_checkpoint(self, checkpoint):
        lightning_gradguard.restore(self, checkpoint)


def _dm():
    return SyntheticDataModule(num_samples=128, input_shape=[16])


def _model(cls=DeepMLP):
    return cls(input_shape=[16], num_classes=4, depth=3, width=16, activation="sigmoid")


def test_callbacks_in_fit_and_checkpoint_round_trips(tmp_path):
    bn, act = BatchNormInsertion(), ActivationReplacement({"sigmoid": "elu"})
    model = _model(RestoringMLP)
    n_before = _n(model)
    trainer = _trainer(tmp_path, [bn, act])
    trainer.fit(model, datamodule=_dm())
    assert len(bn.changes) == 3 and len(act.changes) == 3
    assert _n(model) == n_before + sum(c.params_delta for c in bn.changes + act.changes)
    texts = read_texts(load_events(trainer.logger.log_dir), "gradguard/surgery")
    assert any("BatchNorm1d" in t for t in texts) and any("ELU" in t for t in texts)
    # validate/test never re-apply
    keys = list(model.state_dict())
    trainer.validate(model, datamodule=_dm(), verbose=False)
    trainer.test(model, datamodule=_dm(), verbose=False)
    assert list(model.state_dict()) == keys
    ckpt = tmp_path / "s.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert [op["op"] for op in saved["gradguard_surgery"]] == ["batchnorm", "activations"]
    # (a) resume with ckpt_path: same structure, weights bit-identical, then training goes on
    resumed = _model(RestoringMLP)
    trainer2 = _trainer(tmp_path, [BatchNormInsertion(), ActivationReplacement({"sigmoid": "elu"})])
    trainer2.fit(resumed, datamodule=_dm(), ckpt_path=ckpt)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in resumed.state_dict().items())
    trainer3 = _trainer(tmp_path, [BatchNormInsertion(), ActivationReplacement({"sigmoid": "elu"})], max_epochs=2)
    trainer3.fit(_model(RestoringMLP), datamodule=_dm(), ckpt_path=ckpt)
    assert trainer3.current_epoch == 2
    # (b) load_from_checkpoint on a fresh module (its on_load_checkpoint calls restore)
    loaded = RestoringMLP.load_from_checkpoint(ckpt)
    assert list(loaded.state_dict()) == keys
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in loaded.state_dict().items())
    # (c) by hand, for a module without the hook
    fresh = _model()
    restore(fresh, str(ckpt))
    fresh.load_state_dict(saved["state_dict"])
    x = torch.randn(4, 16)
    loaded.eval(), fresh.eval()
    assert torch.equal(loaded(x), fresh(x))


def test_without_restore_load_from_checkpoint_fails_loudly(tmp_path):
    trainer = _trainer(tmp_path, [BatchNormInsertion()])
    trainer.fit(_model(), datamodule=_dm())
    ckpt = tmp_path / "p.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        DeepMLP.load_from_checkpoint(ckpt)


def test_weight_init_sees_the_replaced_activations_whatever_the_order(tmp_path):
    init = WeightInitialization("auto", verbose=False)
    trainer = _trainer(tmp_path, [init, ActivationReplacement({"sigmoid": "selu"}, verbose=False)], max_steps=1)
    with pytest.warns(UserWarning, match="SELU self-normalizes only with standardized inputs"):
        trainer.fit(_model(), datamodule=SyntheticDataModule(num_samples=64, input_shape=[16], noise=5.0))
    assert [r.scheme for r in init.records][:3] == ["lecun_normal"] * 3


def test_selu_without_init_warns(tmp_path):
    trainer = _trainer(tmp_path, [ActivationReplacement({"sigmoid": "selu"}, verbose=False)], max_steps=1)
    with pytest.warns(UserWarning, match="LeCun-normal init"):
        trainer.fit(_model(), datamodule=_dm())




@pytest.mark.parametrize("group, preset", [("batchnorm", "before"), ("batchnorm", "after"), ("batchnorm", "input"),
                                           ("activation", "elu"), ("activation", "leaky_relu"),
                                           ("activation", "selu"), ("activation", "prelu")])
def test_presets_compose_and_instantiate(compose_cfg, group, preset):
    cfg = compose_cfg([f"gradguard/{group}={preset}"])
    cb = instantiate(cfg.callbacks[group])
    assert isinstance(cb, BatchNormInsertion if group == "batchnorm" else ActivationReplacement)


def test_batchnorm_preset_trains_the_deep_sigmoid_mlp(compose_cfg):
    """The README's before/after, shortened: 20 sigmoid layers on digits, 8 epochs."""
    from lightning_gradguard.demo.app import run

    common = ["model.depth=20", "model.activation=sigmoid", "trainer.max_epochs=8", "trainer.enable_progress_bar=false",
              "trainer.enable_checkpointing=false", "~gradguard/monitor"]
    before = run(compose_cfg(common))["test_acc"]
    after = run(compose_cfg([*common, "gradguard/batchnorm=before", "callbacks.batchnorm.verbose=false"]))["test_acc"]
    assert before < 0.25, before
    assert after >= 0.85, after


# ------------------------------------------------------------------------- blocks traced once per kind
class _Block(nn.Module):
    """``act`` looked up by name in forward; the output reshaped by the layer's width (read in forward)."""

    def __init__(self, fan_in, width, act="relu"):
        super().__init__()
        self.fc, self.act = nn.Linear(fan_in, width), act

    def forward(self, x):
        return getattr(F, self.act)(self.fc(x)).reshape(-1, self.fc.out_features)


class _ConstBlock(nn.Module):
    """A plain tensor attribute (no key): traced on its own."""

    def __init__(self):
        super().__init__()
        self.fc, self.shift = nn.Linear(6, 6), torch.full((6,), 0.5)

    def forward(self, x):
        return F.relu(self.fc(x) + self.shift)


def _count_traces(monkeypatch):
    calls = []
    original = torch.fx.Tracer.trace

    def counting(self, root, *args, **kwargs):
        calls.append(type(root).__name__)
        return original(self, root, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting)
    return calls


def test_alike_blocks_are_traced_once_and_each_keeps_its_own_behaviour(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(_Block(6, 6), _Block(6, 6), _Block(6, 6), _Block(6, 4), _Block(4, 4, "tanh"), _Block(4, 4),
                        nn.Sequential(nn.Linear(4, 6), _ConstBlock(), _ConstBlock()))
    reference = copy.deepcopy(net)
    x = torch.randn(5, 6)
    calls = _count_traces(monkeypatch)
    changes = replace_activations(net, {"relu": "elu", "tanh": "leaky_relu"})
    # three 6→6 blocks share one trace; 6→4, the tanh block and the 4→4 block differ (width, act); the two
    # blocks holding a tensor are traced one by one
    assert calls.count("_Block") == 4 and calls.count("_ConstBlock") == 2
    assert sum(c.note == "fx rewrite" for c in changes) == 8
    for path in ("0", "1", "2", "3", "5", "6.1", "6.2"):
        assert isinstance(net.get_submodule(path).get_submodule("gradguard_act_0"), nn.ELU), path
    assert isinstance(net[4].gradguard_act_0, nn.LeakyReLU)
    # the same function as replacing by hand: ELU for ReLU, LeakyReLU for tanh, each block its own weights
    expected = x
    for block in reference:
        for sub in ([block] if not isinstance(block, nn.Sequential) else list(block)):
            if isinstance(sub, _Block):
                act = F.elu if sub.act == "relu" else F.leaky_relu
                expected = act(sub.fc(expected)).reshape(-1, sub.fc.out_features)
            elif isinstance(sub, _ConstBlock):
                expected = F.elu(sub.fc(expected) + sub.shift)
            else:
                expected = sub(expected)
    torch.testing.assert_close(net(x), expected)
    assert not hasattr(reference[0], "gradguard_act_0")  # the originals are left as they were


class _Cfg(nn.Module):
    """A child module holding a list that the parent's forward reads."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims


class _Permuting(nn.Module):
    def __init__(self, dims, scale):
        super().__init__()
        self.lin, self.cfg, self.scale = nn.Linear(4, 4), _Cfg(dims), scale

    def forward(self, x):
        return (F.relu(self.lin(x)).permute(*self.cfg.dims) * self.scale).long() * self.scale


class _Callable(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin, self.fn = nn.Linear(4, 4), fn

    def forward(self, x):
        return self.fn(F.relu(self.lin(x)))


def test_blocks_that_differ_in_a_child_attribute_or_a_value_type_are_not_traced_alike():
    torch.manual_seed(0)
    net = nn.Sequential(_Permuting([0, 1, 2], 1), _Permuting([0, 2, 1], 1), _Permuting([0, 1, 2], 1.0),
                        _Permuting([0, 1, 2], True))
    reference = copy.deepcopy(net)
    changes = replace_activations(net, {"relu": "elu"})
    assert sum(c.note == "fx rewrite" for c in changes) == 4
    x = torch.randn(2, 3, 4)
    for block, ref in zip(net, reference):
        expected = (F.elu(ref.lin(x)).permute(*ref.cfg.dims) * ref.scale).long() * ref.scale
        out = block(x)
        assert out.dtype == expected.dtype and torch.equal(out, expected)
    # a callable attribute: no key, each block traced on its own with its own function
    net = nn.Sequential(_Callable(torch.tanh), _Callable(torch.sigmoid))
    reference = copy.deepcopy(net)
    replace_activations(net, {"relu": "elu"})
    x = torch.randn(3, 4)
    for block, ref in zip(net, reference):
        torch.testing.assert_close(block(x), ref.fn(F.elu(ref.lin(x))))
