"""Lightning callbacks: thin adapters over the torch-only core."""

from lightning_gradguard.callbacks.activation_replacement import ActivationReplacement
from lightning_gradguard.callbacks.batchnorm_insertion import BatchNormInsertion
from lightning_gradguard.callbacks.gradguard import GradGuard
from lightning_gradguard.callbacks.gradient_clipping import GradientClipping
from lightning_gradguard.callbacks.gradient_monitor import GradientMonitor
from lightning_gradguard.callbacks.weight_init import WeightInitialization

__all__ = ["ActivationReplacement", "BatchNormInsertion", "GradGuard", "GradientClipping", "GradientMonitor", "WeightInitialization"]
