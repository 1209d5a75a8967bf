"""Lightning callbacks: thin adapters over the torch-only core."""

from lightning_gradguard.callbacks.gradient_clipping import GradientClipping
from lightning_gradguard.callbacks.gradient_monitor import GradientMonitor
from lightning_gradguard.callbacks.weight_init import WeightInitialization

__all__ = ["GradientClipping", "GradientMonitor", "WeightInitialization"]
