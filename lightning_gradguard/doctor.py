"""The doctor: probe a model on real batches, try candidate remedies briefly, keep what measurably helps.

Torch only. The caller supplies ``loss_fn(model, batch, index) -> loss tensor`` and
``make_optimizer(model) -> optimizer``; :class:`lightning_gradguard.GradGuard` supplies them from a
LightningModule (its ``training_step`` and ``configure_optimizers``).

Rules (each measurement is taken on the user's model, on real training batches):

===============  ===========================================================================================
remedy           candidate when                                          kept when
===============  ===========================================================================================
init             always (unless every weight is frozen, or turned off)   its trial loss is not worse than
                                                                         without (×(1 + ``margin``))
batchnorm        the flow ratio (first / last weighted layer's grad norm) its trial beats the best so far by
                 after init is < ``flow_threshold``                       ``margin``
activation       saturated fraction > ``saturation_threshold`` (sigmoid/   same
                 tanh → ``saturating_target``) or dead fraction >
                 ``dead_threshold`` (ReLU → ``dead_target``)
activation+BN    both of the above are candidates                        same
clipping         a recurrent layer, non-finite gradients, a gradient norm by rule; the algorithm
                 > ``exploding_norm``, max/median norm over the probe      (percentile, AGC or z-score) by
                 batches > ``spike_factor``, or a trial that diverged      trial (2 × ``trial_steps``)
                 without clipping and trains with it
===============  ===========================================================================================

A trial copies the model, applies the remedies to the copy, and trains it ``trial_steps`` optimizer steps;
its score is the mean training loss of the last quarter of those steps (``inf`` if it diverged). Trials stop
when ``budget_seconds`` is spent; a candidate not tried is not applied, and the table says so.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard.activations import RELU_FAMILY, SATURATING_BOUNDS
from lightning_gradguard.init import initialize
from lightning_gradguard.stats import (
    activation_hook_target, activation_statistics, grad_statistics, layer_groups, to_host, unit_dim_for,
)
from lightning_gradguard.surgery import insert_batchnorm, replace_activations

LossFn = Callable[[nn.Module, Any, int], torch.Tensor]
OptFn = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class Probe:
    """What one probe measured (host values)."""

    grad_norms: dict[str, float]
    flow_ratio: float
    total_norms: list[float]
    losses: list[float]
    saturated: dict[str, float]
    dead: dict[str, float]
    nonfinite: bool
    recurrent: bool
    activations: dict[str, Optional[str]]

    @property
    def spike(self) -> float:
        finite = [n for n in self.total_norms if math.isfinite(n)]
        if len(finite) < 2:
            return 1.0
        med = sorted(finite)[len(finite) // 2]
        return max(finite) / med if med > 0 else float("inf")

    @property
    def max_saturated(self) -> float:
        return max(self.saturated.values(), default=0.0)

    @property
    def max_dead(self) -> float:
        return max(self.dead.values(), default=0.0)


@dataclass
class Decision:
    """One row of the decision table."""

    remedy: str
    status: str  # applied / not applied / suggested / forced / off / untried
    measurement: str
    options: dict[str, Any] = field(default_factory=dict)


class _State:
    """Model weights and buffers, RNG states, training mode and gradients: saved, then put back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.weights = copy.deepcopy(model.state_dict())
        self.training = model.training
        self.grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.py_rng = random.getstate()
        try:
            import numpy as np

            self.np_rng: Any = np.random.get_state()
        except ImportError:  # pragma: no cover
            self.np_rng = None

    def restore(self) -> None:
        self.model.load_state_dict(self.weights)
        self.model.train(self.training)
        for n, p in self.model.named_parameters():
            p.grad = self.grads.get(n)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.py_rng)
        if self.np_rng is not None:
            import numpy as np

            np.random.set_state(self.np_rng)


def probe(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn, saturation_eps: float = 0.01) -> Probe:
    """Forward/backward passes on ``batches`` (no optimizer step); the model, its gradients, BN running
    statistics and every RNG are left exactly as they were."""
    state = _State(model)
    groups = [g for g in layer_groups(model) if g.info is not None and not g.frozen]
    modules = dict(model.named_modules())
    sums = {g.name: 0.0 for g in groups}
    sat: dict[str, list[float]] = {}
    dead: dict[str, list[float]] = {}
    totals, losses, nonfinite = [], [], False
    hooks = []
    for g in groups:
        act = g.activation
        if act not in RELU_FAMILY and act not in SATURATING_BOUNDS:
            continue
        target, fn = activation_hook_target(g, modules)

        def hook(mod, inp, out, g=g, act=act, fn=fn):
            y = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(y, torch.Tensor):
                y = fn(y.detach()) if fn is not None else y.detach()
                s = activation_statistics(y, act, unit_dim_for(g.module))
                (dead if act in RELU_FAMILY else sat).setdefault(g.name, []).append(float(s[2] if act in RELU_FAMILY else s[3]))

        hooks.append(target.register_forward_hook(hook))
    try:
        model.train()
        for i, batch in enumerate(batches):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch, i)
            losses.append(float(loss.detach()))
            loss.backward()
            (norms,) = to_host(grad_statistics(groups)[:, 0])  # per-layer L2 norms, one transfer
            sq = 0.0
            for g, n in zip(groups, norms):
                sums[g.name] += n / len(batches)
                sq += n * n
            totals.append(math.sqrt(sq))
            nonfinite = nonfinite or not math.isfinite(sq)
    finally:
        for h in hooks:
            h.remove()
        state.restore()
    names = [g.name for g in groups]
    flow = sums[names[0]] / sums[names[-1]] if len(names) > 1 and sums[names[-1]] > 0 else 1.0
    return Probe(
        sums, flow, totals, losses, {k: sum(v) / len(v) for k, v in sat.items()}, {k: sum(v) / len(v) for k, v in dead.items()},
        nonfinite, any(isinstance(m, nn.RNNBase) for m in model.modules()), {g.name: g.activation for g in groups},
    )


def apply_remedies(model: nn.Module, remedies: dict[str, dict[str, Any]], seed: Optional[int] = None) -> None:
    """Apply structural remedies, then init (so init sees the final activations)."""
    if "activation" in remedies:
        replace_activations(model, remedies["activation"]["mapping"])
    if "batchnorm" in remedies:
        insert_batchnorm(model, **remedies["batchnorm"])
    if "init" in remedies:
        initialize(model, remedies["init"].get("scheme", "auto"), seed=seed)


def trial(
    model: nn.Module, remedies: dict[str, dict[str, Any]], batches: Iterable[Any], loss_fn: LossFn, make_optimizer: OptFn,
    steps: int, seed: int = 0, deepcopy_memo: Optional[dict] = None,
) -> float:
    """Train a copy of ``model`` with ``remedies`` for ``steps`` steps; the mean loss of the last quarter."""
    candidate = copy.deepcopy(model, deepcopy_memo if deepcopy_memo is not None else {})
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        apply_remedies(candidate, remedies, seed=seed)
        opt = make_optimizer(candidate)
        clip = make_clipper(candidate, remedies["clipping"]) if "clipping" in remedies else None
        candidate.train()
        losses = []
        it = iter(batches)
        for i in range(steps):
            batch = next(it)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(candidate, batch, i)
            if not torch.isfinite(loss):
                return float("inf")
            loss.backward()
            if clip is not None:
                clip()
            opt.step()
            losses.append(float(loss.detach()))
        tail = losses[-max(1, steps // 4):]
        score = sum(tail) / len(tail)
        return score if math.isfinite(score) else float("inf")
    finally:
        torch.set_rng_state(rng)
        del candidate


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


def fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.3g}"
