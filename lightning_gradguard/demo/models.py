"""Demo LightningModules: a configurable deep MLP (plain, so gradient problems are real) and a small CNN."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradguard._validation import check_bool, check_choice, check_number
from lightning_gradguard.activations import ACTIVATION_NAMES, make_activation

OPTIMIZERS = ("sgd", "adam")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification with train/val/test loss and accuracy; ``self.net`` maps x to logits."""

    net: nn.Module

    def __init__(self, lr: float, optimizer: str, momentum: float, weight_decay: float) -> None:
        super().__init__()
        owner = type(self).__name__
        self.lr = check_number(owner, "lr", lr, min_value=0.0, min_inclusive=False)
        self.optimizer_name = check_choice(owner, "optimizer", optimizer, OPTIMIZERS)
        self.momentum = check_number(owner, "momentum", momentum, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.weight_decay = check_number(owner, "weight_decay", weight_decay, min_value=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=split != "train")
        return loss

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DeepMLP(ClassifierModule):
    """A plain deep MLP: ``depth`` hidden ``Linear(width) → [BatchNorm1d] → activation`` blocks, then a
    ``Linear`` output layer. PyTorch's default init, no skip connections: deep sigmoid/tanh stacks
    really stop learning, which is what gradguard's remedies are for.

    Args:
        input_shape: shape of one input sample (flattened internally), e.g. ``[1, 8, 8]``.
        num_classes: number of output logits.
        depth: number of hidden layers (>= 1).
        width: units per hidden layer.
        activation: one of relu, leaky_relu, prelu, rrelu, elu, selu, gelu, silu, sigmoid, tanh.
        batchnorm: insert ``BatchNorm1d`` before each activation (off by default).
        init_std: if set, every Linear weight is drawn from N(0, init_std²) and biases are 0 (a "bad init"
            demo, e.g. ``init_std=1.0``); default: PyTorch's own init.
        lr, optimizer, momentum, weight_decay: the optimizer (``sgd`` or ``adam``).

    Example:
        >>> model = DeepMLP(input_shape=[1, 8, 8], num_classes=10, depth=20, activation="sigmoid")
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        depth: int = 2,
        width: int = 128,
        activation: str = "relu",
        batchnorm: bool = False,
        init_std: Optional[float] = None,
        lr: float = 0.02,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        owner = type(self).__name__
        check_number(owner, "depth", depth, min_value=1, integer=True)
        check_number(owner, "width", width, min_value=1, integer=True)
        check_number(owner, "num_classes", num_classes, min_value=2, integer=True)
        check_choice(owner, "activation", activation, ACTIVATION_NAMES)
        check_bool(owner, "batchnorm", batchnorm)
        check_number(owner, "init_std", init_std, min_value=0.0, min_inclusive=False, allow_none=True)
        input_shape = [int(s) for s in input_shape]
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(make_activation(activation))
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)
        if init_std is not None:
            with torch.no_grad():
                for m in self.net.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.normal_(0.0, init_std)
                        m.bias.zero_()


class SmallCNN(ClassifierModule):
    """A small CNN for small images (8×8 digits): two 3×3 conv blocks, a pooling step, a linear head.

    Example:
        >>> model = SmallCNN(input_shape=[1, 8, 8], num_classes=10, channels=16)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: int = 16,
        activation: str = "relu",
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        owner = type(self).__name__
        check_number(owner, "channels", channels, min_value=1, integer=True)
        check_number(owner, "num_classes", num_classes, min_value=2, integer=True)
        check_choice(owner, "activation", activation, ACTIVATION_NAMES)
        input_shape = [int(s) for s in input_shape]
        if len(input_shape) != 3:
            raise ValueError(f"{owner}: input_shape={input_shape!r} must be [channels, height, width]")
        self.save_hyperparameters()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(input_shape[0], c, 3, padding=1),
            make_activation(activation),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            make_activation(activation),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * 4, num_classes),
        )
