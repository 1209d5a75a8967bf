"""Small real architectures for the compatibility tests: timm and Hugging Face models from tiny configs.

Random weights only, nothing is downloaded. timm imports torchvision at import time; see
:func:`import_timm` for the one documented shim this needs next to a CPU torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn


class _StubMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (_StubClass,), {})


class _StubClass(metaclass=_StubMeta):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchvision is not installed: tests/zoo.py imported timm with a stub in its place")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():  # a class (ToTensor, InterpolationMode, FrozenBatchNorm2d): a placeholder
            return _StubMeta(name, (_StubClass,), {})
        return importlib.import_module(f"{self.__name__}.{name}")  # a submodule or function: a stub module


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def import_timm() -> Any:
    """Import timm without torchvision.

    timm imports torchvision at import time (image transforms, datasets, ``FrozenBatchNorm2d``) but never
    calls it to build or run a model. The only torchvision wheel on the package registry for torch 2.13 is
    a CUDA build that does not load next to the CPU torch, and once installed it breaks ``import lightning``
    (torchmetrics imports torchvision when present), and ``pip install timm`` would pull the newest
    torchvision and, with it, a CUDA torch 2.14. So CI installs timm with ``--no-deps`` (see ``.ci/run``),
    and this function imports it with stub ``torchvision`` modules whose classes raise when instantiated;
    the stubs are removed from ``sys.modules`` and the import system right after, so nothing else sees a
    torchvision. Where a real torchvision is installed, it is used.
    """
    if "timm" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("timm")
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def _timm_models() -> dict[str, Callable[[Any], nn.Module]]:
    """timm models, shrunk through their own constructor arguments (32×32 inputs, 10 classes)."""
    return {
        "resnet18": lambda timm: timm.create_model("resnet18", channels=(8, 16, 32, 64), stem_width=8),
        "efficientnet_b0": lambda timm: timm.models.efficientnet._gen_efficientnet(
            "efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.34),
        "mobilenetv3_small_100": lambda timm: timm.models.mobilenetv3._gen_mobilenet_v3("mobilenetv3_small_100", 0.25),
        "convnext_atto": lambda timm: timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32)),
        "vit_tiny_patch16_224": lambda timm: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
        "regnetx_002": lambda timm: timm.models.regnet.RegNet(
            timm.models.regnet.RegNetCfg(depth=4, w0=8, wa=32.0, wm=2.0, group_size=8)),
        "densenet121": lambda timm: timm.create_model("densenet121", growth_rate=8, block_config=(2, 2, 2, 2)),
        "mlp_mixer": lambda timm: timm.models.mlp_mixer.MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32),
        "swin": lambda timm: timm.models.swin_transformer.SwinTransformer(
            img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
    }


TIMM_MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "vit_tiny_patch16_224",
               "regnetx_002", "densenet121", "mlp_mixer", "swin")


def make_timm(name: str) -> nn.Module:
    timm = import_timm()
    torch.manual_seed(0)
    net = _timm_models()[name](timm)
    net.reset_classifier(10)
    return net


def _hf_models() -> dict[str, Callable[[], nn.Module]]:
    import transformers as t

    small = dict(vocab_size=64)
    return {
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(**small, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(**small, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(**small, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)),
        "bart": lambda: t.BartForConditionalGeneration(t.BartConfig(**small, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)),
        "phi": lambda: t.PhiForCausalLM(t.PhiConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32)),
    }


HF_MODELS = ("bert", "gpt2", "t5", "bart", "llama", "phi")


def make_hf(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _hf_models()[name]()


def image_batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def text_batch(n: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class ImageClassifier(pl.LightningModule):
    """A timm model trained as a user would: ``forward(x)``, cross-entropy on ``(x, y)`` batches."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class LanguageModel(pl.LightningModule):
    """A Hugging Face model trained on dict batches (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> Any:
        return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)
