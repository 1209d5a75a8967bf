"""BatchNorm insertion, torch only: wrap hidden layers (or their activations) in :class:`Normalized`.

BatchNorm insertion wraps a layer in :class:`Normalized` (``layer`` → ``post`` BN; or a ``pre`` BN on the
model input), or, for ``position="after_activation"``, wraps the activation module the same way. The output
layer (the last weighted layer in forward order) and frozen layers (no trainable parameter) are left alone;
layers already followed by a normalization layer are skipped; Linear layers applied to ``(B, T, F)`` inputs
are normalized over the feature dim. With ``remove_bias`` the bias of a layer feeding a BN directly is dropped
(BN's β does its job).

Example:
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2))
    >>> [c.path for c in insert_batchnorm(net)]
    ['0', '2']
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard.graph import NORM_TYPES, LayerInfo, find_layers
from lightning_gradguard.surgery._common import Change, n_params, record, set_submodule

POSITIONS = ("before_activation", "after_activation")
BN_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Normalized(nn.Module):
    """``pre`` (optional) → ``layer`` → ``post`` (optional), the normalizations applied over the feature dim.

    ``feature_last`` (Linear layers): inputs of shape ``(..., F)`` are normalized over F, whatever the
    leading dims (``(B, T, F)`` included); otherwise BN's own convention (channels in dim 1).
    """

    def __init__(self, layer: nn.Module, pre: Optional[nn.Module] = None, post: Optional[nn.Module] = None,
                 feature_last: bool = False) -> None:
        super().__init__()
        self.pre, self.layer, self.post = pre, layer, post
        self.feature_last = feature_last

    def _norm(self, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.feature_last:  # (B, F) stays (B, F); (B, T, F) is normalized as (B*T, F). fx-traceable.
            return bn(x.flatten(0, -2)).reshape(x.shape)
        return bn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self._norm(self.pre, x)
        x = self.layer(x)
        if self.post is not None:
            x = self._norm(self.post, x)
        return x


_BN_BY_LAYER = ((nn.Conv3d, nn.BatchNorm3d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv1d, nn.BatchNorm1d),
                (nn.Linear, nn.BatchNorm1d))


def _bn_for(layer: nn.Module, num: int, momentum: float, eps: float) -> nn.Module:
    """The BatchNorm matching ``layer``'s base class (a ``Conv2d`` subclass gets ``BatchNorm2d``)."""
    cls = next(bn for base, bn in _BN_BY_LAYER if isinstance(layer, base))
    p = next(layer.parameters(), None)
    bn = cls(num, eps=eps, momentum=momentum)
    return bn.to(p.device) if p is not None else bn


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _followed_by_norm(model: nn.Module) -> set[str]:
    """Names of the modules whose next module (in registration order) is a normalization layer."""
    order = [(n, m) for n, m in model.named_modules() if len(list(m.children())) == 0 or isinstance(m, Normalized)]
    return {n for (n, _), (_, nxt) in zip(order, order[1:]) if isinstance(nxt, NORM_TYPES)}


@dataclass
class _Plan:
    """What one :func:`insert_batchnorm` call knows about the model before changing it."""

    model: nn.Module
    layers: list[LayerInfo]
    momentum: float
    eps: float
    include: Sequence[str]
    exclude: Sequence[str]
    modules: dict[str, nn.Module] = field(init=False)
    normed: set[str] = field(init=False)
    act_users: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())
        self.normed = _followed_by_norm(self.model)  # wrapping a layer never changes what follows a later one
        users = [i.activation_at for i in self.layers if i.activation_at in self.modules]
        self.act_users = {a: users.count(a) for a in users}

    def bn(self, layer: nn.Module, num: int) -> nn.Module:
        return _bn_for(layer, num, self.momentum, self.eps)

    def wrapped(self, path: Optional[str]) -> bool:
        """``path`` sits inside a :class:`Normalized` (a layer or activation wrapped by an earlier call)."""
        return path is not None and isinstance(self.modules.get(path.rpartition(".")[0]), Normalized)

    def eligible(self, info: LayerInfo) -> bool:
        if not isinstance(info.module, BN_LAYER_TYPES) or self.wrapped(info.name):
            return False  # idempotent: the layer was wrapped by an earlier call
        if self.include and not any(fnmatch.fnmatchcase(info.name, p) for p in self.include):
            return False
        if any(fnmatch.fnmatchcase(info.name, p) for p in self.exclude):
            return False
        return any(p.requires_grad for p in info.module.parameters())  # frozen layers keep their function

    def wants_post(self, info: LayerInfo) -> bool:
        """Not the output layer, not already followed by a norm (or by an activation wrapped with one)."""
        return info is not self.layers[-1] and info.name not in self.normed and not self.wrapped(info.activation_at)

    def sole_activation(self, info: LayerInfo) -> Optional[str]:
        """The path of the activation module used by this layer alone, else None (functional or shared)."""
        at = info.activation_at
        return at if at in self.modules and self.act_users.get(at) == 1 else None


def _wrap_activation(plan: _Plan, info: LayerInfo, act_path: str) -> Change:
    act = plan.modules[act_path]
    bn = plan.bn(info.module, _out_features(info.module))
    set_submodule(plan.model, act_path, Normalized(act, post=bn, feature_last=isinstance(info.module, nn.Linear)))
    name = type(act).__name__
    return Change(act_path, name, f"{name} → {type(bn).__name__}", n_params(bn), f"after {info.name}'s activation")


def _wrap_layer(plan: _Plan, info: LayerInfo, pre: Optional[nn.Module], post: Optional[nn.Module],
                remove_bias: bool, note: str) -> Change:
    layer, before_desc, before_n = info.module, info.describe(), n_params(info.module)
    if post is not None and remove_bias and getattr(layer, "bias", None) is not None:
        layer.bias = None  # BN's shift replaces it
        note = (note + "; " if note else "") + "bias removed"
    set_submodule(plan.model, info.name, Normalized(layer, pre=pre, post=post, feature_last=isinstance(layer, nn.Linear)))
    parts = [type(m).__name__ if m is not layer else before_desc for m in (pre, layer, post) if m is not None]
    delta = n_params(plan.model.get_submodule(info.name)) - before_n
    return Change(info.name, before_desc, " → ".join(parts), delta,
                  note or ("input BN" if pre is not None and post is None else ""))


def insert_batchnorm(
    model: nn.Module,
    position: str = "before_activation",
    remove_bias: bool = True,
    input_batchnorm: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    sample_input: Any = None,
) -> list[Change]:
    """Insert BatchNorm before (default, Ioffe & Szegedy 2015) or after each hidden layer's activation.

    Args:
        position: ``before_activation`` (layer → BN → activation) or ``after_activation`` (activation → BN;
            layers whose activation is functional, or a module shared by several layers, get the BN right
            after the layer instead, noted in the table).
        remove_bias: drop the bias of a layer that feeds a BN directly.
        input_batchnorm: also a BN on the model input (before the first weighted layer).
        include / exclude: module-name patterns (fnmatch) of layers to consider / skip.
        sample_input: a batch (or zero-argument callable) for finding activations when fx cannot trace.

    The BN type follows the layer's base class (``Conv2d`` and its subclasses get ``BatchNorm2d``). A second
    call changes nothing: wrapped layers, and layers whose activation was wrapped, are skipped.
    """
    if position not in POSITIONS:
        raise ValueError(f"insert_batchnorm: position={position!r} is not one of: {', '.join(POSITIONS)}")
    layers = find_layers(model, sample_input)
    plan = _Plan(model, layers, momentum, eps, include, exclude)
    changes: list[Change] = []
    for info in layers:
        if not plan.eligible(info):
            continue
        pre = plan.bn(info.module, _in_features(info.module)) if input_batchnorm and info is layers[0] else None
        want_post, note = plan.wants_post(info), ""
        if want_post and position == "after_activation":
            act_path = plan.sole_activation(info)
            if act_path is not None:
                changes.append(_wrap_activation(plan, info, act_path))
                want_post = False
            else:
                note = "activation is functional or shared: BN placed right after the layer"
        if want_post or pre is not None:
            post = plan.bn(info.module, _out_features(info.module)) if want_post else None
            changes.append(_wrap_layer(plan, info, pre, post, remove_bias, note))
    if changes:
        record(model, {"op": "batchnorm", "position": position, "remove_bias": remove_bias,
                       "input_batchnorm": input_batchnorm, "momentum": momentum, "eps": eps,
                       "include": list(include), "exclude": list(exclude)})
    return changes
