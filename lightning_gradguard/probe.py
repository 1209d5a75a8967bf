"""The probe: forward/backward passes on held-out batches that measure a model's gradients and activations
and leave it exactly as it was. Torch only; :func:`lightning_gradguard.doctor.decide` orders its candidates
with what the probe measured.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 4))
    >>> batches = [(torch.randn(32, 16), torch.randint(0, 4, (32,))) for _ in range(2)]
    >>> p = probe(model, batches, lambda m, batch, i: F.cross_entropy(m(batch[0]), batch[1]))
    >>> p.flow_ratio < 1e-2 and p.max_saturated >= 0.0   # vanishing: the first layer gets far less gradient
    True
"""

from __future__ import annotations

import collections
import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard.activations import RELU_FAMILY, SATURATING_BOUNDS
from lightning_gradguard.graph import model_input
from lightning_gradguard.stats import (
    activation_hook_target, activation_statistics, shared_activations, grad_statistics, layer_groups, to_host, unit_dim_for,
)

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

LossFn = Callable[[nn.Module, Any, int], torch.Tensor]

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
    normalized: bool = False  # the model already has a normalization layer (BatchNorm, LayerNorm, GroupNorm, ...)

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


def _snapshot(state: dict) -> dict:
    """A copy of a state dict: tensors cloned, other (extra) state deep-copied, the version ``_metadata`` that
    ``load_state_dict`` reads kept. What ``copy.deepcopy`` gives, without its per-object bookkeeping (several
    times faster on a deep net's many small tensors)."""
    out = collections.OrderedDict((k, v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return out


class _State:
    """Model weights and buffers, RNG states, training mode and gradients: saved, then put back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.weights = _snapshot(model.state_dict())
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
    first = batches[0] if len(batches) else None
    groups = [g for g in layer_groups(model, sample_input=model_input(first)) if g.info is not None and not g.frozen]
    modules = dict(model.named_modules())
    shared = shared_activations(groups)
    sums = {g.name: 0.0 for g in groups}
    sat: dict[str, list[float]] = {}
    dead: dict[str, list[float]] = {}
    totals, losses, nonfinite = [], [], False
    hooks = []
    for g in groups:
        act = g.activation
        if act not in RELU_FAMILY and act not in SATURATING_BOUNDS:
            continue
        target, fn = activation_hook_target(g, modules, shared)

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
        any(isinstance(m, _NORMS) for m in model.modules()),
    )


__all__ = ["Probe", "probe", "LossFn"]
