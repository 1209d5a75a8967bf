"""``ActivationReplacement``: swap saturating (or dying) activations for non-saturating ones, before training."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradguard._validation import check_bool
from lightning_gradguard.callbacks._surgery_base import SurgeryCallback
from lightning_gradguard.graph import NORM_TYPES
from lightning_gradguard.surgery import Change, replace_activations
from lightning_gradguard.surgery.activations import normalize_mapping


class ActivationReplacement(SurgeryCallback):
    """Replace activations by name before training: ``{"sigmoid": "elu", "tanh": "elu", "relu": "leaky_relu"}``.

    Targets: ``leaky_relu`` (negative_slope), ``rrelu`` (lower, upper), ``prelu`` (num_parameters: 1 or
    ``"per-channel"``, init), ``elu`` (alpha), ``selu``, ``gelu``, ``silu`` (plus relu, sigmoid, tanh), given
    as a name or a mapping with ``name`` and options: ``{"sigmoid": {"name": "leaky_relu", "negative_slope": 0.2}}``.
    Activation modules are swapped; functional ones inside submodules are rewritten with torch.fx; those
    that cannot be are listed as "not replaceable" (see :func:`lightning_gradguard.surgery.replace_activations`).

    SELU self-normalizes only with LeCun-normal init, standardized inputs and a plain sequential stack
    (Klambauer et al. 2017): with a ``selu`` target this callback warns when no ``WeightInitialization``
    is on the Trainer, when the model holds normalization or (non-alpha) dropout layers, and when the first
    training batch is not standardized (|mean| > 0.5 or |std − 1| > 0.5).

    Args:
        mapping: source activation name → target (name or mapping). Default: sigmoid and tanh → elu.
        verbose: print the table of changes.

    Raises:
        ValueError / TypeError: unknown source/target names or options, at construction.

    Example::

        from lightning_gradguard import ActivationReplacement
        trainer = Trainer(callbacks=[ActivationReplacement({"sigmoid": "elu", "tanh": "elu"})])
    """

    title = "gradguard activation replacement"

    def __init__(
        self,
        mapping: Optional[Mapping[str, Union[str, Mapping[str, Any]]]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if mapping is None:
            mapping = {"sigmoid": "elu", "tanh": "elu"}
        self.mapping: dict[str, dict[str, Any]] = normalize_mapping(owner, mapping)
        self.verbose = check_bool(owner, "verbose", verbose)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mapping=sorted((k, v["name"]) for k, v in self.mapping.items()))

    def operate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", sample: Any) -> list[Change]:
        changes = replace_activations(pl_module, self.mapping, sample_input=sample)
        if any(spec["name"] == "selu" for spec in self.mapping.values()):
            self._check_selu(trainer, pl_module, sample)
        return changes

    def _check_selu(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", sample: Any) -> None:
        from lightning_gradguard.callbacks.weight_init import WeightInitialization

        problems = []
        if not any(isinstance(cb, WeightInitialization) for cb in trainer.callbacks):
            problems.append("LeCun-normal init: add WeightInitialization('auto') (it picks lecun_normal for SELU)")
        blockers = sorted({type(m).__name__ for m in pl_module.modules()
                           if isinstance(m, NORM_TYPES) or (isinstance(m, torch.nn.Dropout) and not isinstance(m, torch.nn.AlphaDropout))})
        if blockers:
            problems.append(f"a plain stack without {', '.join(blockers)} (use AlphaDropout, no normalization layers)")
        try:
            x = sample()
        except Exception:  # noqa: BLE001 - the check is advice only
            x = None
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            mean, std = float(x.mean()), float(x.std())
            if abs(mean) > 0.5 or abs(std - 1.0) > 0.5:
                problems.append(f"standardized inputs (the first batch has mean {mean:.2f}, std {std:.2f})")
        for p in problems:
            rank_zero_warn(f"ActivationReplacement: SELU self-normalizes only with {p}")
