"""lightning_gradguard: keep deep networks trainable in PyTorch Lightning.

Callbacks (thin Lightning adapters) and the torch-only core functions they use; see README.md.

Every public name is loaded on first use (PEP 562 ``__getattr__``), so ``import lightning_gradguard.init``
(or ``.clipping``, ``.stats``, ``.surgery``, the ``gradguard report`` command) needs torch only and never
imports Lightning; only the callbacks do.

Example:
    >>> from lightning_gradguard import GradGuard, GradientMonitor
    >>> callbacks = [GradGuard(monitor=False), GradientMonitor()]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it (loaded lazily)
_EXPORTS: dict[str, str] = {
    "GradGuard": "lightning_gradguard.callbacks",
    "WeightInitialization": "lightning_gradguard.callbacks",
    "BatchNormInsertion": "lightning_gradguard.callbacks",
    "ActivationReplacement": "lightning_gradguard.callbacks",
    "GradientClipping": "lightning_gradguard.callbacks",
    "GradientMonitor": "lightning_gradguard.callbacks",
    "insert_batchnorm": "lightning_gradguard.surgery",
    "replace_activations": "lightning_gradguard.surgery",
    "restore": "lightning_gradguard.surgery",
    "surgery_spec": "lightning_gradguard.surgery",
    "Normalized": "lightning_gradguard.surgery",
    "HealthDetector": "lightning_gradguard.health",
    "Finding": "lightning_gradguard.health",
    "LayerRow": "lightning_gradguard.health",
    "layer_groups": "lightning_gradguard.stats",
    "grad_statistics": "lightning_gradguard.stats",
    "GradStatsPlan": "lightning_gradguard.stats",
    "UpdateTracker": "lightning_gradguard.stats",
    "ActivationAccumulator": "lightning_gradguard.act_stats",
    "StepNorms": "lightning_gradguard.shared_norms",
    "BackgroundWriter": "lightning_gradguard.host_transfer",
    "clip_by_value_": "lightning_gradguard.clipping",
    "clip_by_norm_": "lightning_gradguard.clipping",
    "clip_by_norm_per_group_": "lightning_gradguard.clipping",
    "adaptive_clip_": "lightning_gradguard.clipping",
    "global_norm": "lightning_gradguard.clipping",
    "PercentileClipper": "lightning_gradguard.clipping",
    "ZScoreClipper": "lightning_gradguard.clipping",
    "SpikeDetector": "lightning_gradguard.step_skip",
    "StepSkipper": "lightning_gradguard.step_skip",
    "initialize": "lightning_gradguard.init",
    "variance_scaling_": "lightning_gradguard.init",
    "compute_fans": "lightning_gradguard.init",
    "InitRecord": "lightning_gradguard.init",
    "find_layers": "lightning_gradguard.graph",
    "LayerInfo": "lightning_gradguard.graph",
    "register_activation": "lightning_gradguard.activations",
    "broadcast_object": "lightning_gradguard.distributed",
    "reduce_sum_max": "lightning_gradguard.distributed",
    "check_strategy": "lightning_gradguard.distributed",
    "probe": "lightning_gradguard.probe",
    "decide": "lightning_gradguard.doctor",
    "DoctorOptions": "lightning_gradguard.doctor",
    "Diagnosis": "lightning_gradguard.doctor",
    "ModelTrials": "lightning_gradguard.trials",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from lightning_gradguard.callbacks import (
        ActivationReplacement, BatchNormInsertion, GradGuard, GradientClipping, GradientMonitor, WeightInitialization,
    )
    from lightning_gradguard.clipping import (
        PercentileClipper, ZScoreClipper, adaptive_clip_, clip_by_norm_, clip_by_norm_per_group_, clip_by_value_,
        global_norm,
    )
    from lightning_gradguard.activations import register_activation
    from lightning_gradguard.distributed import broadcast_object, check_strategy, reduce_sum_max
    from lightning_gradguard.doctor import Diagnosis, DoctorOptions, decide
    from lightning_gradguard.probe import probe
    from lightning_gradguard.graph import LayerInfo, find_layers
    from lightning_gradguard.health import Finding, HealthDetector, LayerRow
    from lightning_gradguard.init import InitRecord, compute_fans, initialize, variance_scaling_
    from lightning_gradguard.act_stats import ActivationAccumulator
    from lightning_gradguard.host_transfer import BackgroundWriter
    from lightning_gradguard.shared_norms import StepNorms
    from lightning_gradguard.stats import GradStatsPlan, UpdateTracker, grad_statistics, layer_groups
    from lightning_gradguard.trials import ModelTrials
    from lightning_gradguard.step_skip import SpikeDetector, StepSkipper
    from lightning_gradguard.surgery import Normalized, insert_batchnorm, replace_activations, restore, surgery_spec
