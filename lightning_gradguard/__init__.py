"""lightning_gradguard: keep deep networks trainable in PyTorch Lightning."""

from lightning_gradguard.callbacks import WeightInitialization
from lightning_gradguard.graph import LayerInfo, find_layers
from lightning_gradguard.init import InitRecord, compute_fans, initialize, variance_scaling_

__version__ = "0.1.0"

__all__ = [
    "WeightInitialization",
    "initialize",
    "variance_scaling_",
    "compute_fans",
    "InitRecord",
    "find_layers",
    "LayerInfo",
]
