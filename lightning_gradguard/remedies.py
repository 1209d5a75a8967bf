"""A remedy set applied to a model: the structural remedies, then init; and the clipping GradGuard trains
and fits with. Torch only; used by :mod:`lightning_gradguard.trials` (on copies) and by ``GradGuard``.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2))
    >>> apply_remedies(model, {"activation": {"mapping": {"sigmoid": "elu"}}, "init": {"scheme": "auto"}}, seed=0)
    >>> type(model[1]).__name__
    'ELU'
    >>> clip_options({}, "norm")
    {'threshold': 1.0, 'algorithm': 'norm'}
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from lightning_gradguard.init import initialize
from lightning_gradguard.surgery import insert_batchnorm, replace_activations


def apply_remedies(model: nn.Module, remedies: dict[str, dict[str, Any]], seed: Optional[int] = None,
                   layers: Optional[list[Any]] = None) -> None:
    """Apply structural remedies, then init (so init sees the final activations). ``layers``: the model's
    :func:`~lightning_gradguard.graph.find_layers` after the structural remedies, when the caller has them."""
    if "activation" in remedies:
        replace_activations(model, remedies["activation"]["mapping"])
    if "batchnorm" in remedies:
        insert_batchnorm(model, **remedies["batchnorm"])
    if "init" in remedies:
        initialize(model, remedies["init"].get("scheme", "auto"), seed=seed, force=bool(remedies["init"].get("force", False)),
                   layers=layers)


#: the clipping GradGuard uses for each algorithm, in its trials and in the ``GradientClipping`` it applies:
#: AutoClip with a warm-up at norm 1, AGC λ=0.01, value 0.01, norm 1, z-score (ZClip) with its own defaults
CLIP_DEFAULTS: dict[str, dict[str, float]] = {
    "percentile": {"warmup_threshold": 1.0}, "agc": {"threshold": 0.01}, "value": {"threshold": 0.01},
    "norm": {"threshold": 1.0}, "zscore": {},
}


def clip_options(options: dict[str, Any], algorithm: str = "percentile") -> dict[str, Any]:
    """``GradientClipping`` keyword arguments for a clipping remedy: its algorithm (else ``algorithm``), the
    :data:`CLIP_DEFAULTS` of that algorithm, and any option the remedy sets itself."""
    algo = options.get("algorithm", algorithm)
    return {**CLIP_DEFAULTS[algo], **options, "algorithm": algo}


def make_clipper(model: nn.Module, options: dict[str, Any]) -> Callable[[], None]:
    """A zero-argument function clipping ``model``'s gradients as ``GradientClipping(**clip_options(options))``
    would."""
    from lightning_gradguard.clipping import (
        PercentileClipper, ZScoreClipper, adaptive_clip_, agc_exempt_params, clip_by_norm_, clip_by_value_,
    )

    opts = clip_options(options)
    algorithm = opts["algorithm"]
    params = [p for p in model.parameters() if p.requires_grad]
    if algorithm == "percentile":
        clipper = PercentileClipper(warmup_threshold=opts["warmup_threshold"])
        return lambda: clipper.clip_(params) and None
    if algorithm == "zscore":
        zclip = ZScoreClipper()  # ZClip's defaults
        return lambda: zclip.clip_(params) and None
    if algorithm == "agc":
        skip = agc_exempt_params(model)
        body = [p for p in params if id(p) not in skip]
        return lambda: adaptive_clip_(body, opts["threshold"])
    if algorithm == "value":
        return lambda: clip_by_value_(params, opts["threshold"])
    return lambda: clip_by_norm_(params, opts["threshold"]) and None


__all__ = ["apply_remedies", "clip_options", "make_clipper", "CLIP_DEFAULTS"]
