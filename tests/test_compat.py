"""Real architectures: timm CNNs and ViTs, Hugging Face transformers (tiny configs, random weights).

For each model: layers found, activations recognised, no BatchNorm doubled, the model still runs after
every surgery, tied weights keep their value, and a 3-step ``fit`` runs with every callback and with
``GradGuard()``. The expected answers come from the model's own forward pass (module execution order),
not from the code under test.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard import (
    ActivationReplacement, BatchNormInsertion, GradGuard, GradientClipping, GradientMonitor, WeightInitialization,
    find_layers, initialize, insert_batchnorm, layer_groups, replace_activations,
)
from tests import zoo

warnings.filterwarnings("ignore", ".*does not have many workers.*")

try:
    zoo.import_timm()
    import transformers  # noqa: F401
except ImportError as err:
    if os.environ.get("CI"):  # CI installs both (see .ci/run): a missing one is a failure there, not a skip
        raise
    pytest.skip(f"timm and transformers are test dependencies ({err})", allow_module_level=True)

MODELS = [("timm", n) for n in zoo.TIMM_MODELS] + [("hf", n) for n in zoo.HF_MODELS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # tiny models: threads cost more than they give on a shared 2-core runner
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(kind: str, name: str) -> tuple[pl.LightningModule, Any]:
    if kind == "timm":
        return zoo.ImageClassifier(zoo.make_timm(name)), zoo.image_batch()[0]
    return zoo.LanguageModel(zoo.make_hf(name)), zoo.text_batch()


def _batch(kind: str) -> Any:
    return zoo.image_batch() if kind == "timm" else zoo.text_batch()


# ------------------------------------------------------------------------ ground truth, test-side
def _family_of(module: nn.Module) -> Optional[str]:
    """Activation family from the libraries' own classes (imported here, not taken from gradguard)."""
    import transformers.activations as hf
    from timm.layers import activations as ta

    table = [
        ((nn.ReLU6,), "relu6"), ((nn.ReLU,), "relu"), ((nn.GELU, ta.GELU, ta.GELUTanh, ta.QuickGELU, hf.GELUActivation,
         hf.NewGELUActivation, hf.FastGELUActivation, hf.QuickGELUActivation), "gelu"),
        ((nn.SiLU, ta.Swish), "silu"), ((nn.Hardswish, ta.HardSwish), "hardswish"), ((nn.Mish, ta.Mish), "mish"),
        ((nn.Sigmoid, nn.Hardsigmoid, ta.Sigmoid, ta.HardSigmoid), "sigmoid"), ((nn.Tanh, ta.Tanh), "tanh"),
    ]
    for classes, family in table:
        if isinstance(module, classes):
            return family
    return None


def _is_layer(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, Conv1D))


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(m).__name__ in (
        "T5LayerNorm", "LlamaRMSNorm")


def _execution_order(model: nn.Module, batch: Any) -> tuple[list[tuple[str, str, Any]], set[str]]:
    """(kind, module path, module) for every layer, norm and activation module, in the order they start;
    and the layers whose output tensor is itself the input of a normalization layer (in eval mode dropout
    hands its input on unchanged)."""
    events: list[tuple[str, str, Any]] = []
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    feeds_norm: set[str] = set()
    handles = []

    def layer_done(mod: nn.Module, args: Any, out: Any, path: str) -> None:
        if isinstance(out, torch.Tensor):
            outputs[out.data_ptr()] = (path, out)  # the reference keeps the memory from being reused

    def norm_start(mod: nn.Module, args: Any, path: str) -> None:
        events.append(("norm", path, mod))
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.data_ptr() in outputs and outputs[x.data_ptr()][1].shape == x.shape:
            feeds_norm.add(outputs[x.data_ptr()][0])

    for path, m in model.named_modules():
        if _is_layer(m):
            handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: events.append(("layer", p, mod))))
            handles.append(m.register_forward_hook(lambda mod, a, o, p=path: layer_done(mod, a, o, p)))
        elif _is_norm(m):
            handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: norm_start(mod, a, p)))
        elif _family_of(m):
            handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: events.append(("act", p, mod))))
    try:
        with torch.no_grad():
            model.eval()
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
    return events, feeds_norm


def _next_after(events: list[tuple[str, str, Any]]) -> dict[str, tuple[str, Any]]:
    """Layer path → what starts next among layers, norms and activations (first call of the layer)."""
    out: dict[str, tuple[str, Any]] = {}
    for i, (kind, path, _) in enumerate(events):
        if kind == "layer" and path not in out and i + 1 < len(events):
            out[path] = (events[i + 1][0], events[i + 1][2])
    return out


def _forward_backward(model: nn.Module, kind: str) -> float:
    model.train()
    if kind == "timm":
        x, y = zoo.image_batch()
        loss = nn.functional.cross_entropy(model(x), y)
    else:
        loss = model(**zoo.text_batch()).loss
    loss.backward()
    return float(loss.detach())


def _tied(model: nn.Module) -> list[list[str]]:
    holders: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(n)
    return [v for v in holders.values() if len(v) > 1]


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("kind", "name"), MODELS, ids=[f"{k}-{n}" for k, n in MODELS])
def test_layers_activations_surgery_and_ties(kind: str, name: str) -> None:
    module, sample = _build(kind, name)
    layers = find_layers(module, sample)
    found = {info.name for info in layers}
    expected = [p for p, m in module.named_modules() if _is_layer(m)]
    assert len(found & set(expected)) >= 0.9 * len(expected), f"found {len(found & set(expected))}/{len(expected)}"

    # every layer followed (in its own forward) by a known activation module has that activation
    events, feeds_norm = _execution_order(module, sample)
    following = _next_after(events)
    with_act = {p: _family_of(m) for p, (k, m) in following.items() if k == "act"}
    by_name = {info.name: info.activation for info in layers}
    wrong = {p: (fam, by_name.get(p)) for p, fam in with_act.items() if by_name.get(p) != fam}
    assert not wrong, f"activation misread (expected, got): {wrong}"

    # the monitor's groups: every trainable parameter once, a tied one listing all its holders
    groups = layer_groups(module, sample_input=sample)
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) == sum(1 for p in module.parameters() if p.requires_grad)
    for names in _tied(module):
        owner = [g for g in groups if any(p is module.get_parameter(names[0]) for p in g.params)]
        assert len(owner) == 1 and len(owner[0].shared_with) == len(names) - 1, (names, owner)

    # init keeps tied weights (owned by the embedding) and runs
    ties = {tuple(names): module.get_parameter(names[0]).detach().clone() for names in _tied(module)}
    records = initialize(module, "auto", sample_input=sample, seed=0)
    assert any(r.scheme not in ("-",) for r in records)
    for names, before in ties.items():
        assert all(module.get_parameter(n) is module.get_parameter(names[0]) for n in names)
        assert torch.equal(module.get_parameter(names[0]).detach(), before), f"tied {names} changed by init"
    assert math.isfinite(_forward_backward(module, kind))

    # BatchNorm insertion: never in front of an existing norm; the model still runs, ties intact
    if name in ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "densenet121"):
        assert feeds_norm, "the ground truth sees no conv → BatchNorm in a timm CNN"
    for position in ("before_activation", "after_activation"):
        candidate = copy.deepcopy(module)
        changes = insert_batchnorm(candidate, position=position, sample_input=sample)
        doubled = [c.path for c in changes if c.path in feeds_norm]
        assert not doubled, f"BatchNorm inserted in front of an existing norm: {doubled}"
        assert math.isfinite(_forward_backward(candidate, kind))
        for names in _tied(module):
            assert len({id(candidate.get_parameter(n)) for n in names}) == 1
    # activation replacement: every family present swapped for another; the model still runs
    candidate = copy.deepcopy(module)
    changes = replace_activations(candidate, {"relu": "leaky_relu", "gelu": "elu", "silu": "elu", "hardswish": "elu",
                                              "sigmoid": "elu", "tanh": "elu"}, sample_input=sample)
    assert math.isfinite(_forward_backward(candidate, kind))
    assert changes or not with_act


def _fit(module: pl.LightningModule, kind: str, callbacks: list, tmp_path: Any) -> pl.Trainer:
    batches = [_batch(kind) for _ in range(3)]
    loader = DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(max_steps=3, callbacks=callbacks, logger=TensorBoardLogger(str(tmp_path)), accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=1)
    trainer.fit(module, loader)
    assert trainer.global_step == 3
    return trainer


@pytest.mark.parametrize(("kind", "name"), MODELS, ids=[f"{k}-{n}" for k, n in MODELS])
def test_fit_with_every_callback_and_gradguard(kind: str, name: str, tmp_path: Any) -> None:
    module, _ = _build(kind, name)
    ties = {tuple(names): module.get_parameter(names[0]).detach().clone() for names in _tied(module)}
    init = WeightInitialization(verbose=False)
    monitor = GradientMonitor(log_every_n_steps=1)
    callbacks = [init, BatchNormInsertion(verbose=False), ActivationReplacement({"sigmoid": "elu", "tanh": "elu"}, verbose=False),
                 GradientClipping("norm", threshold=1.0), monitor]
    _fit(module, kind, callbacks, tmp_path / "all")
    assert init.records and monitor.groups
    for names in ties:
        assert len({id(module.get_parameter(n)) for n in names}) == 1, f"{names} no longer tied"
    # a layer of the model has its own gradient-norm row (Conv1D on GPT-2 included)
    assert any(g.info is not None and g.info.kind in ("Linear", "Conv2d", "Conv1D") for g in monitor.groups)

    module, _ = _build(kind, name)
    guard = GradGuard(verbose=False, trial_steps=8, probe_batches=2)  # shorter trials: the decisions are not checked here
    _fit(module, kind, [guard], tmp_path / "guard")
    assert {d.remedy for d in guard.decisions} >= {"init", "clipping"}


def test_a_model_loaded_with_from_pretrained_is_kept_unless_forced(tmp_path: Any) -> None:
    module = zoo.LanguageModel(zoo.make_hf("bert"))
    module.net.config._name_or_path = "bert-tiny-finetuned"  # what from_pretrained records (no download here)
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    records = initialize(module, "auto", sample_input=zoo.text_batch(), seed=0)
    assert all(r.scheme == "-" for r in records) and "loaded by from_pretrained" in records[-1].note
    assert all(torch.equal(p.detach(), weights[n]) for n, p in module.named_parameters())
    guard = GradGuard(verbose=False, trial_steps=4, probe_batches=2)
    _fit(module, "hf", [guard], tmp_path)
    init = next(d for d in guard.decisions if d.remedy == "init")
    assert init.status == "not applied" and "loaded, trained or adapter" in init.measurement
    query = "net.bert.encoder.layer.0.attention.self.query.weight"
    before = module.get_parameter(query).detach().clone()
    records = initialize(module, "auto", sample_input=zoo.text_batch(), seed=0, force=True)
    assert not torch.equal(module.get_parameter(query).detach(), before)
    assert not any("loaded" in r.note for r in records)
