"""Demo data modules and models used by ``examples/`` and the tests (not needed to use the callbacks)."""

from lightning_gradguard.demo.data import DigitsDataModule, FashionMNISTDataModule, SyntheticDataModule
from lightning_gradguard.demo.models import DeepMLP, SmallCNN
from lightning_gradguard.demo.sequence import SequenceDataModule, VanillaRNN

__all__ = ["DigitsDataModule", "FashionMNISTDataModule", "SyntheticDataModule", "DeepMLP", "SmallCNN", "SequenceDataModule", "VanillaRNN"]
