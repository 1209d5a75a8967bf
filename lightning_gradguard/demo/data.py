"""Data modules for the demo app and tests: bundled digits (default), synthetic, optional FashionMNIST.

No data set is downloaded at run time: digits ship inside scikit-learn, synthetic data is generated,
and FashionMNIST is only read from a local ``root`` the user already has.
"""

from __future__ import annotations

from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard._validation import check_number


def _split_sizes(owner: str, n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    check_number(owner, "val_fraction", val_fraction, min_value=0.0, max_value=0.5, min_inclusive=False)
    check_number(owner, "test_fraction", test_fraction, min_value=0.0, max_value=0.5, min_inclusive=False)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return n - n_val - n_test, n_val, n_test


class _TensorDataModule(pl.LightningDataModule):
    """Holds train/val/test tensors; subclasses fill them in ``_load``."""

    input_shape: tuple[int, ...]
    num_classes: int

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        owner = type(self).__name__
        self.batch_size = check_number(owner, "batch_size", batch_size, min_value=1, integer=True)
        self.num_workers = check_number(owner, "num_workers", num_workers, min_value=0, integer=True)
        self._splits: Optional[dict[str, TensorDataset]] = None

    def _load(self) -> dict[str, TensorDataset]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self._splits is None:
            self._splits = self._load()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self._splits is not None
        return DataLoader(
            self._splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Per-feature standardization with statistics from the train split only."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant pixels (digits' borders) stay 0
    return [(t - mean) / std for t in (train, *others)]


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): no download.

    A fixed split (``seed``) into train/val/test; inputs standardized per pixel with the train split's
    mean and std. Batches are ``(B, 1, 8, 8)`` float images and ``(B,)`` labels.

    Example:
        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.input_shape, dm.num_classes
        ((1, 8, 8), 10)
    """

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        _split_sizes(type(self).__name__, 1797, val_fraction, test_fraction)
        self.seed = check_number(type(self).__name__, "seed", seed, integer=True)

    def _load(self) -> dict[str, TensorDataset]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DigitsDataModule needs scikit-learn: pip install 'lightning_gradguard[examples]'"
            ) from err
        x_np, y_np = load_digits(return_X_y=True)
        x = torch.tensor(x_np, dtype=torch.float32)
        y = torch.tensor(y_np, dtype=torch.long)
        n_train, n_val, _ = _split_sizes(type(self).__name__, len(x), self.val_fraction, self.test_fraction)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        idx = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
        xs = _standardize(x[idx["train"]], x[idx["val"]], x[idx["test"]])
        return {
            split: TensorDataset(xs[i].reshape(-1, *self.input_shape), y[idx[split]])
            for i, split in enumerate(("train", "val", "test"))
        }


class SyntheticDataModule(_TensorDataModule):
    """Generated classification data for tests: Gaussian clusters, one per class, in ``input_shape``.

    Example:
        >>> dm = SyntheticDataModule(num_samples=256, input_shape=[16], num_classes=4)
    """

    def __init__(
        self, num_samples: int = 512, input_shape: Sequence[int] = (16,), num_classes: int = 4,
        noise: float = 1.0, batch_size: int = 32, seed: int = 0, num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        owner = type(self).__name__
        self.num_samples = check_number(owner, "num_samples", num_samples, min_value=8, integer=True)
        self.input_shape = tuple(int(s) for s in input_shape)
        if not self.input_shape or any(s < 1 for s in self.input_shape):
            raise ValueError(f"{owner}: input_shape={list(input_shape)!r} must be a non-empty list of positive sizes")
        self.num_classes = check_number(owner, "num_classes", num_classes, min_value=2, integer=True)
        self.noise = check_number(owner, "noise", noise, min_value=0.0)
        self.seed = check_number(owner, "seed", seed, integer=True)

    def _load(self) -> dict[str, TensorDataset]:
        g = torch.Generator().manual_seed(self.seed)
        centers = torch.randn(self.num_classes, *self.input_shape, generator=g) * 2.0
        y = torch.randint(0, self.num_classes, (self.num_samples,), generator=g)
        x = centers[y] + self.noise * torch.randn(self.num_samples, *self.input_shape, generator=g)
        n_train, n_val, _ = _split_sizes(type(self).__name__, self.num_samples, 0.15, 0.15)
        cuts = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
        return {split: TensorDataset(x[c], y[c]) for split, c in zip(("train", "val", "test"), cuts)}


class FashionMNISTDataModule(_TensorDataModule):
    """FashionMNIST read from a local copy (``root``) through torchvision; never downloaded.

    Optional: needs ``torchvision`` and the data already under ``root`` (torchvision's layout).

    Example:
        >>> dm = FashionMNISTDataModule(root="~/data")  # doctest: +SKIP
    """

    input_shape = (1, 28, 28)
    num_classes = 10

    def __init__(
        self, root: str = "", batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not isinstance(root, str) or not root:
            raise ValueError(
                f"FashionMNISTDataModule: root={root!r} must be the folder holding FashionMNIST "
                "(torchvision layout), e.g. data=fashion_mnist data.root=/data"
            )
        self.root, self.val_fraction, self.seed = root, val_fraction, seed

    def _load(self) -> dict[str, TensorDataset]:
        try:
            from torchvision.datasets import FashionMNIST
        except ImportError as err:
            raise ImportError("FashionMNISTDataModule needs torchvision (pip install torchvision)") from err
        import os

        root = os.path.expanduser(self.root)
        try:
            train = FashionMNIST(root, train=True, download=False)
            test = FashionMNIST(root, train=False, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"FashionMNISTDataModule: no FashionMNIST under root={self.root!r} (nothing is downloaded): {err}"
            ) from err
        x = train.data.float().div(255).unsqueeze(1)
        y = train.targets.long()
        n_val = int(len(x) * self.val_fraction)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        tr, va = perm[n_val:], perm[:n_val]
        x_test = test.data.float().div(255).unsqueeze(1)
        mean, std = x[tr].mean(), x[tr].std()
        norm = lambda t: (t - mean) / std  # noqa: E731
        return {
            "train": TensorDataset(norm(x[tr]), y[tr]),
            "val": TensorDataset(norm(x[va]), y[va]),
            "test": TensorDataset(norm(x_test), test.targets.long()),
        }
