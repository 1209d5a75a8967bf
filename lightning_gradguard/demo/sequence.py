"""A synthetic long-sequence task and a vanilla RNN whose gradients explode: the clipping demo.

Task: each sample is ``length`` steps of one standard-normal feature; the label is the quartile of the
sequence's sum (4 balanced classes), so every step matters and information must travel through the whole
recurrence.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_gradguard._validation import check_choice, check_number
from lightning_gradguard.demo.data import _TensorDataModule
from lightning_gradguard.demo.models import ClassifierModule


class SequenceDataModule(_TensorDataModule):
    """Generated sequences ``(B, length, 1)`` with 4 classes: the quartile of the sum.

    Example:
        >>> dm = SequenceDataModule(length=100)
    """

    num_classes = 4

    def __init__(
        self, num_samples: int = 2048, length: int = 100, batch_size: int = 64, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__(batch_size, num_workers)
        owner = type(self).__name__
        self.num_samples = check_number(owner, "num_samples", num_samples, min_value=16, integer=True)
        self.length = check_number(owner, "length", length, min_value=4, integer=True)
        self.seed = check_number(owner, "seed", seed, integer=True)
        self.input_shape = (self.length, 1)

    def _load(self) -> dict[str, TensorDataset]:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.num_samples, self.length, 1, generator=g)
        z = x.sum(dim=(1, 2)) / self.length**0.5  # standard normal
        y = torch.bucketize(z, torch.tensor([-0.6745, 0.0, 0.6745]))  # quartiles of N(0, 1)
        n_train, n_val = int(self.num_samples * 0.7), int(self.num_samples * 0.15)
        cuts = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
        return {split: TensorDataset(x[c], y[c]) for split, c in zip(("train", "val", "test"), cuts)}


class VanillaRNN(ClassifierModule):
    """``nn.RNN`` (ReLU by default) whose recurrent matrix starts as ``recurrent_gain`` × identity (IRNN,
    Le et al. 2015). With ReLU over 100 steps the gradients explode within the first epoch (NaN loss) unless clipped.

    Example:
        >>> model = VanillaRNN(input_shape=[100, 1], num_classes=4, recurrent_gain=1.0)
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (100, 1),
        num_classes: int = 4,
        hidden_size: int = 64,
        nonlinearity: str = "relu",
        recurrent_gain: float = 1.0,
        lr: float = 0.001,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        owner = type(self).__name__
        check_number(owner, "hidden_size", hidden_size, min_value=1, integer=True)
        check_choice(owner, "nonlinearity", nonlinearity, ("relu", "tanh"))
        check_number(owner, "recurrent_gain", recurrent_gain, min_value=0.0)
        self.save_hyperparameters()
        self.rnn = nn.RNN(int(input_shape[-1]), hidden_size, nonlinearity=nonlinearity, batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(recurrent_gain * torch.eye(hidden_size))
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])
