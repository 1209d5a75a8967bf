"""lightning_gradguard: keep deep networks trainable in PyTorch Lightning.

Callbacks (thin Lightning adapters) and the torch-only core functions they use; see README.md.

Example:
    >>> from lightning_gradguard import GradGuard, GradientMonitor
    >>> callbacks = [GradGuard(monitor=False), GradientMonitor()]
"""

from lightning_gradguard.callbacks import (
    ActivationReplacement, BatchNormInsertion, GradGuard, GradientClipping, GradientMonitor, WeightInitialization,
)
from lightning_gradguard.activations import register_activation
from lightning_gradguard.clipping import (
    PercentileClipper, adaptive_clip_, clip_by_norm_, clip_by_norm_per_group_, clip_by_value_, global_norm,
)
from lightning_gradguard.graph import LayerInfo, find_layers
from lightning_gradguard.health import Finding, HealthDetector
from lightning_gradguard.init import InitRecord, compute_fans, initialize, variance_scaling_
from lightning_gradguard.stats import grad_statistics, layer_groups
from lightning_gradguard.surgery import Normalized, insert_batchnorm, replace_activations, restore, surgery_spec

__version__ = "0.1.0"

__all__ = [
    "GradGuard",
    "WeightInitialization",
    "BatchNormInsertion",
    "ActivationReplacement",
    "insert_batchnorm",
    "replace_activations",
    "restore",
    "surgery_spec",
    "Normalized",
    "GradientClipping",
    "GradientMonitor",
    "HealthDetector",
    "Finding",
    "layer_groups",
    "grad_statistics",
    "clip_by_value_",
    "clip_by_norm_",
    "clip_by_norm_per_group_",
    "adaptive_clip_",
    "global_norm",
    "PercentileClipper",
    "initialize",
    "variance_scaling_",
    "compute_fans",
    "InitRecord",
    "find_layers",
    "LayerInfo",
    "register_activation",
]
