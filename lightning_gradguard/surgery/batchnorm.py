"""BatchNorm insertion, torch only: wrap hidden layers (or their activations) in :class:`Normalized`.

BatchNorm insertion wraps a layer in :class:`Normalized` (``layer`` → ``post`` BN; or a ``pre`` BN on the
model input), or, for ``position="after_activation"``, wraps the activation module the same way. The output
layer (the last weighted layer in forward order) and frozen layers (no trainable parameter) are left alone;
layers already followed by a normalization layer are skipped (any ``_NormBase``/``LayerNorm``/``GroupNorm``/
``RMSNorm`` subclass, with children or not, such as timm's ``BatchNormAct2d``, or a ``...RMSNorm``/``...LayerNorm``
class such as Hugging Face's); Linear layers (and Hugging Face's ``Conv1D``) applied to ``(B, T, F)`` inputs
are normalized over the feature dim. A wrapped layer keeps answering for its attributes (``wrapper.weight``,
``.bias``, ``.in_features``, ...), so model code that reads ``self.wo.weight`` (T5) still works. With ``remove_bias`` the bias of a layer feeding a BN directly is dropped
(BN's β does its job).

Example:
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2))
    >>> [c.path for c in insert_batchnorm(net)]
    ['0', '2']
"""

from __future__ import annotations

import fnmatch
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard.graph import find_layers, is_norm, is_transposed_linear
from lightning_gradguard.surgery._common import Change, n_params, record, set_submodule

POSITIONS = ("before_activation", "after_activation")
BN_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Normalized(nn.Module):
    """``pre`` (optional) → ``layer`` → ``post`` (optional), the normalizations applied over the feature dim.

    ``feature_last`` (Linear layers): inputs of shape ``(..., F)`` are normalized over F, whatever the
    leading dims (``(B, T, F)`` included); otherwise BN's own convention (channels in dim 1).

    Attributes the wrapper does not have itself are read from the wrapped layer, so code written against
    the layer (``self.wo.weight.dtype`` in T5, ``self.fc.in_features``) keeps working.
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

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None or name.startswith("__"):
                raise
            return getattr(layer, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self._norm(self.pre, x)
        x = self.layer(x)
        if self.post is not None:
            x = self._norm(self.post, x)
        return x


def _bn_for(layer: nn.Module, num: int, momentum: float, eps: float) -> nn.Module:
    cls = {nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}.get(type(layer), nn.BatchNorm1d)
    p = next(layer.parameters(), None)
    bn = cls(num, eps=eps, momentum=momentum)
    return bn.to(p.device) if p is not None else bn


def _out_features(layer: nn.Module) -> int:
    if is_transposed_linear(layer):
        return int(layer.weight.shape[1])  # Hugging Face Conv1D: weight (in, out)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_features(layer: nn.Module) -> int:
    if is_transposed_linear(layer):
        return int(layer.weight.shape[0])
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _bn_layer(module: nn.Module) -> bool:
    return isinstance(module, BN_LAYER_TYPES) or is_transposed_linear(module)


def _followed_by_norm(model: nn.Module) -> set[str]:
    """Names of the modules whose next module (in registration order) is a normalization layer.

    A norm counts with children or not (timm's ``BatchNormAct2d`` holds its activation); what is inside a
    norm or a wrapper is not visited.
    """
    order = []
    inside: Optional[str] = None
    for n, m in model.named_modules():
        if inside is not None and n.startswith(inside):
            continue
        inside = None
        if is_norm(m) or isinstance(m, Normalized):
            order.append((n, m))
            inside = f"{n}."
        elif len(m._modules) == 0:
            order.append((n, m))
    return {n for (n, _), (_, nxt) in zip(order, order[1:]) if is_norm(nxt)}


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
    """
    if position not in POSITIONS:
        raise ValueError(f"insert_batchnorm: position={position!r} is not one of: {', '.join(POSITIONS)}")
    layers = find_layers(model, sample_input)
    all_layers = layers
    changes: list[Change] = []
    if not layers:
        return changes
    output = layers[-1]
    modules = dict(model.named_modules())
    normed = _followed_by_norm(model)  # wrapping a layer never changes what follows a later one
    act_users: dict[str, int] = {}
    for info in layers:
        if info.activation_at in modules:
            act_users[info.activation_at] = act_users.get(info.activation_at, 0) + 1
    for info in layers:
        if not _bn_layer(info.module):
            continue
        parent_path = info.name.rpartition(".")[0]
        if isinstance(modules.get(parent_path), Normalized):
            continue  # idempotent: wrapped by an earlier call
        if include and not any(fnmatch.fnmatchcase(info.name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(info.name, p) for p in exclude):
            continue
        if not any(p.requires_grad for p in info.module.parameters()):
            continue  # frozen (pretrained) layers keep their function
        first = info is all_layers[0]
        pre = None
        if first and input_batchnorm:
            pre = _bn_for(info.module, _in_features(info.module), momentum, eps)
        want_post = info is not output and info.name not in normed
        if info is output and pre is None:
            continue
        if not want_post and pre is None:
            continue
        before_desc = info.describe()
        before_n = n_params(info.module)
        act_path = info.activation_at if info.activation_at in modules else None
        if info.activation in ("softmax", "log_softmax"):
            act_path = None  # attention scores, not this layer's units: the BN goes right after the layer
        feature_last = isinstance(info.module, nn.Linear) or is_transposed_linear(info.module)
        note = ""
        if want_post and position == "after_activation" and act_path and act_users.get(act_path, 0) == 1:
            act_mod = modules[act_path]
            bn = _bn_for(info.module, _out_features(info.module), momentum, eps)
            set_submodule(model, act_path, Normalized(act_mod, post=bn, feature_last=feature_last))
            changes.append(Change(act_path, type(act_mod).__name__, f"{type(act_mod).__name__} → {type(bn).__name__}",
                                  n_params(bn), f"after {info.name}'s activation"))
            want_post = False
        elif want_post and position == "after_activation":
            note = "activation is functional or shared: BN placed right after the layer"
        post = _bn_for(info.module, _out_features(info.module), momentum, eps) if want_post else None
        if pre is None and post is None:
            continue
        layer = info.module
        if post is not None and remove_bias and getattr(layer, "bias", None) is not None:
            if is_transposed_linear(layer):  # Conv1D's forward is addmm(bias, ...): the bias must stay
                note = (note + "; " if note else "") + "bias kept (Conv1D needs it)"
            else:
                layer.bias = None  # BN's shift replaces it
                note = (note + "; " if note else "") + "bias removed"
        set_submodule(model, info.name, Normalized(layer, pre=pre, post=post, feature_last=feature_last))
        parts = ([type(pre).__name__] if pre is not None else []) + [before_desc] + ([type(post).__name__] if post is not None else [])
        delta = n_params(model.get_submodule(info.name)) - before_n
        changes.append(Change(info.name, before_desc, " → ".join(parts), delta,
                              note or ("input BN" if pre is not None and post is None else "")))
    if changes:
            record(model, {"op": "batchnorm", "position": position, "remove_bias": remove_bias,
                        "input_batchnorm": input_batchnorm, "momentum": momentum, "eps": eps,
                        "include": list(include), "exclude": list(exclude)})
    return changes
