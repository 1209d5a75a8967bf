"""What real model code does, in plain torch: activation registry, composite activations, torch
containers, dict batches, tied parameters, pretrained and adapter weights, wrapped layers' attributes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_gradguard import find_layers, initialize, insert_batchnorm, layer_groups, register_activation
from lightning_gradguard.activations import activation_module_name
from lightning_gradguard.init import kept_layers
from lightning_gradguard.pretrained import TRAINED_RATIO, spectral_ratio


class NewGELU(nn.Module):
    """Hugging Face's gelu_new, written as they write it: a tanh inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class KeywordMLP(nn.Module):
    """A forward that only takes keyword arguments and reads an attention mask, as HF models do; fx cannot
    trace it (data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), NewGELU(), nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if attention_mask.sum() > 0:  # data-dependent: fx gives up, the trace fallback runs
            input_ids = input_ids * attention_mask
        return self.fc2(self.act(self.fc1(input_ids)))


def test_torch_activation_modules_are_named_by_family() -> None:
    assert activation_module_name(nn.Hardswish()) == "hardswish"
    assert activation_module_name(nn.Mish()) == "mish"
    assert activation_module_name(nn.ReLU6()) == "relu6"  # a Hardtanh subclass: the most specific entry wins
    assert activation_module_name(nn.Softplus()) == "relu"

    class MyReLU(nn.ReLU):
        pass

    assert activation_module_name(MyReLU()) == "relu"  # subclasses by isinstance


def test_composite_activation_is_read_by_what_it_computes_once_registered() -> None:
    batch = {"input_ids": torch.randn(4, 8), "attention_mask": torch.ones(4, 8)}
    register_activation(NewGELU, "gelu")
    layers = find_layers(KeywordMLP(), batch)  # a dict batch is passed as keyword arguments
    assert [(info.name, info.activation, info.source) for info in layers] == [
        ("fc1", "gelu", "trace"), ("fc2", "linear", "trace")]  # not "tanh" from the torch.tanh inside


def test_register_activation_rejects_an_unknown_family() -> None:
    with pytest.raises(ValueError, match=r"name='swishy' is not one of: relu, relu6"):
        register_activation(NewGELU, "swishy")


def test_layers_inside_transformer_encoder_and_attention_are_found_and_initialized() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    net = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(16, 3))
    layers = {info.name: info for info in find_layers(net)}
    for i in range(2):
        assert layers[f"0.layers.{i}.linear1"].activation == "relu"
        assert layers[f"0.layers.{i}.linear2"].activation == "linear"
        assert f"0.layers.{i}.self_attn.out_proj" in layers
    out_proj = net[0].layers[0].self_attn.out_proj.weight
    before = out_proj.detach().clone()
    records = {r.layer: r for r in initialize(net, "auto", seed=0)}
    assert records["0.layers.0.self_attn.out_proj"].scheme == "glorot_normal"
    assert records["0.layers.0.linear1"].scheme == "he_normal"
    assert not torch.equal(before, out_proj.detach())
    net.eval()
    with torch.no_grad():  # the fused inference path still runs after init
        assert net(torch.randn(2, 5, 16)).shape == (2, 5, 3)


def _tied_lm() -> nn.Module:
    net = nn.ModuleDict({"emb": nn.Embedding(50, 16), "body": nn.Linear(16, 16), "act": nn.ReLU(), "head": nn.Linear(16, 50, bias=False)})
    net.head.weight = net.emb.weight
    return net


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _tied_lm()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.net
        return n.head(n.act(n.body(n.emb(ids))))


def test_tied_embedding_is_initialized_once_by_its_owner_and_reported_once() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    emb = model.net.emb.weight
    before = emb.detach().clone()
    records = {r.layer: r for r in initialize(model, "auto", seed=0)}
    assert torch.equal(emb.detach(), before), "the output layer re-initialized the tied embedding"
    assert "tied to net.emb" in records["net.head"].note
    groups = layer_groups(model)
    owners = [g for g in groups if any(p is emb for p in g.params)]
    assert [(g.name, g.shared_with) for g in owners] == [("net.emb", ["net.head"])]
    assert "net.head" not in [g.name for g in groups]  # no second row for the same parameter


def test_trained_weights_and_lora_adapters_are_kept_unless_forced() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    u, v = torch.randn(32, 1), torch.randn(1, 32)
    with torch.no_grad():
        net[0].weight.add_(0.3 * u @ v)  # a learned low-rank direction, as training leaves
    assert spectral_ratio(net[0].weight) > TRAINED_RATIO > spectral_ratio(net[2].weight)
    lora = nn.ModuleDict({"lora_A": nn.Linear(32, 4, bias=False), "lora_B": nn.Linear(4, 32, bias=False)})
    nn.init.zeros_(lora["lora_B"].weight)
    net.add_module("adapter", lora)
    trained = net[0].weight.detach().clone()
    assert set(kept_layers(net, find_layers(net, method="modules"))) >= {"0", "adapter.lora_A", "adapter.lora_B"}
    records = {r.layer: r for r in initialize(net, "auto", seed=0, layers=find_layers(net, method="modules"))}
    assert torch.equal(net[0].weight.detach(), trained) and records["0"].note.startswith("kept: trained")
    assert torch.count_nonzero(lora["lora_B"].weight) == 0 and "adapter" in records["adapter.lora_B"].note
    assert records["2"].scheme == "he_normal"  # fresh layers are still initialized
    initialize(net, "auto", seed=0, force=True, layers=find_layers(net, method="modules"))
    assert not torch.equal(net[0].weight.detach(), trained)
    assert torch.count_nonzero(lora["lora_B"].weight) > 0


def test_wrapped_layer_still_answers_for_its_attributes() -> None:
    class ReadsWeight(nn.Module):  # T5's T5DenseActDense reads self.wo.weight.dtype in forward
        def __init__(self) -> None:
            super().__init__()
            self.wi, self.act, self.wo, self.out = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.wi(x)).to(self.wo.weight.dtype)
            return self.out(torch.relu(self.wo(h)))

    net = ReadsWeight()
    changes = insert_batchnorm(net)
    assert [c.path for c in changes] == ["wi", "wo"]
    assert net.wi.weight is net.wi.layer.weight and net.wi.in_features == 8 and net.wi.bias is None
    assert net(torch.randn(4, 8)).shape == (4, 2)
    copy.deepcopy(net)  # the attribute fallback does not break copying


def test_no_batchnorm_in_front_of_a_norm_subclass_with_children() -> None:
    class BatchNormAct2d(nn.BatchNorm2d):  # timm's: a BatchNorm2d subclass holding its activation
        def __init__(self, n: int) -> None:
            super().__init__(n)
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(super().forward(x))

    net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    assert [c.path for c in insert_batchnorm(net)] == ["2"]  # conv 0 already feeds a BatchNorm
    assert net(torch.randn(2, 3, 12, 12)).shape == (2, 4, 6, 6)


def test_an_activation_module_shared_by_layers_is_observed_per_layer() -> None:
    from lightning_gradguard.stats import activation_hook_target, shared_activations

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out, self.act = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.b(self.act(self.a(x)))))

    net = Shared()
    groups = [g for g in layer_groups(net) if g.info is not None]
    assert shared_activations(groups) == {"act"}
    modules = dict(net.named_modules())
    target, fn = activation_hook_target(groups[0], modules, shared_activations(groups))
    assert target is net.a and fn is torch.relu  # the layer itself, the activation applied to its output
