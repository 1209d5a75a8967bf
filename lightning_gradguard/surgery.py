"""Model surgery, torch only: insert BatchNorm around hidden layers, replace saturating activations.

Both functions change a model in place, deterministically (the same model and arguments give the same
structure), are idempotent (a second call changes nothing), and return the list of :class:`Change` rows.
What was applied is recorded on the model (``model._gradguard_surgery``) as plain dicts, so a fresh copy
of the model can be given the same structure before loading a checkpoint: :func:`restore`.

BatchNorm insertion wraps a layer in :class:`Normalized` (``layer`` → ``post`` BN; or a ``pre`` BN on the
model input), or, for ``position="after_activation"``, wraps the activation module the same way. The output
layer (the last weighted layer in forward order) and frozen layers (no trainable parameter) are left alone;
layers already followed by a normalization layer are skipped; Linear layers applied to ``(B, T, F)`` inputs are normalized over the feature dim.
With ``remove_bias`` the bias of a layer feeding a BN directly is dropped (BN's β does its job).

Example:
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2))
    >>> changes = insert_batchnorm(net)
    >>> [c.path for c in changes]
    ['0', '2']
    >>> changes = replace_activations(net, {"sigmoid": "elu"})
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_gradguard._text import text_table
from lightning_gradguard.activations import (
    ACTIVATION_NAMES, activation_function_name, activation_method_name, activation_module_name, make_activation,
)
from lightning_gradguard.graph import NORM_TYPES, find_layers

POSITIONS = ("before_activation", "after_activation")
SURGERY_ATTR = "_gradguard_surgery"
BN_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: targets' accepted parameters
TARGET_PARAMS: dict[str, tuple[str, ...]] = {
    "leaky_relu": ("negative_slope",), "rrelu": ("lower", "upper"), "prelu": ("num_parameters", "init"),
    "elu": ("alpha",), "selu": (), "gelu": ("approximate",), "silu": (), "relu": (), "tanh": (), "sigmoid": (),
}
#: activations that can be replaced (sources)
SOURCE_NAMES = ("relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "gelu", "silu", "sigmoid", "tanh")


@dataclass
class Change:
    """One row of the surgery table."""

    path: str
    before: str
    after: str
    params_delta: int
    note: str = ""


def format_changes(changes: Sequence[Change]) -> str:
    head = ("path", "before", "after", "params Δ", "note")
    rows = [(c.path, c.before, c.after, f"{c.params_delta:+d}", c.note) for c in changes]
    if not rows:
        return "no changes"
    return text_table(head, rows)


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


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _bn_for(layer: nn.Module, num: int, momentum: float, eps: float) -> nn.Module:
    cls = {nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}.get(type(layer), nn.BatchNorm1d)
    p = next(layer.parameters(), None)
    bn = cls(num, eps=eps, momentum=momentum)
    return bn.to(p.device) if p is not None else bn


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _followed_by_norm(model: nn.Module) -> set[str]:
    """Names of the modules whose next module (in registration order) is a normalization layer."""
    order = [(n, m) for n, m in model.named_modules() if len(list(m.children())) == 0 or isinstance(m, Normalized)]
    return {n for (n, _), (_, nxt) in zip(order, order[1:]) if isinstance(nxt, NORM_TYPES)}


def _record(model: nn.Module, op: dict[str, Any]) -> None:
    ops = list(getattr(model, SURGERY_ATTR, []))
    if op not in ops:
        ops.append(op)
    model.__dict__[SURGERY_ATTR] = ops  # a plain attribute, not a submodule or buffer


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
        if not isinstance(info.module, BN_LAYER_TYPES):
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
        before_n = _n_params(info.module)
        act_path = info.activation_at if info.activation_at in modules else None
        feature_last = isinstance(info.module, nn.Linear)
        note = ""
        if want_post and position == "after_activation" and act_path and act_users.get(act_path, 0) == 1:
            act_mod = modules[act_path]
            bn = _bn_for(info.module, _out_features(info.module), momentum, eps)
            _set(model, act_path, Normalized(act_mod, post=bn, feature_last=feature_last))
            changes.append(Change(act_path, type(act_mod).__name__, f"{type(act_mod).__name__} → {type(bn).__name__}",
                                  _n_params(bn), f"after {info.name}'s activation"))
            want_post = False
        elif want_post and position == "after_activation":
            note = "activation is functional or shared: BN placed right after the layer"
        post = _bn_for(info.module, _out_features(info.module), momentum, eps) if want_post else None
        if pre is None and post is None:
            continue
        layer = info.module
        if post is not None and remove_bias and getattr(layer, "bias", None) is not None:
            layer.bias = None  # BN's shift replaces it
            note = (note + "; " if note else "") + "bias removed"
        _set(model, info.name, Normalized(layer, pre=pre, post=post, feature_last=feature_last))
        parts = ([type(pre).__name__] if pre is not None else []) + [before_desc] + ([type(post).__name__] if post is not None else [])
        delta = _n_params(model.get_submodule(info.name)) - before_n
        changes.append(Change(info.name, before_desc, " → ".join(parts), delta,
                              note or ("input BN" if pre is not None and post is None else "")))
    if changes:
            _record(model, {"op": "batchnorm", "position": position, "remove_bias": remove_bias,
                        "input_batchnorm": input_batchnorm, "momentum": momentum, "eps": eps,
                        "include": list(include), "exclude": list(exclude)})
    return changes


# ------------------------------------------------------------------------------------ activations
def normalize_target(owner: str, source: str, target: Union[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``"elu"`` or ``{"name": "leaky_relu", "negative_slope": 0.2}`` → a checked dict with ``name``."""
    spec = {"name": target} if isinstance(target, str) else {str(k): v for k, v in dict(target).items()}
    name = spec.get("name")
    if name not in TARGET_PARAMS:
        raise ValueError(
            f"{owner}: mapping[{source!r}]={target!r}: target {name!r} is not one of: {', '.join(TARGET_PARAMS)}"
        )
    unknown = set(spec) - {"name", *TARGET_PARAMS[name]}
    if unknown:
        raise ValueError(
            f"{owner}: mapping[{source!r}] has unknown option(s) {sorted(unknown)} for {name}; allowed: "
            f"{', '.join(TARGET_PARAMS[name]) or 'none'}"
        )
    if name == "prelu" and spec.get("num_parameters", 1) not in (1, "per-channel"):
        raise ValueError(f"{owner}: mapping[{source!r}].num_parameters={spec['num_parameters']!r} must be 1 or 'per-channel'")
    return spec


def _build(spec: dict[str, Any], num_features: Optional[int]) -> nn.Module:
    params = {k: v for k, v in spec.items() if k != "name"}
    return make_activation(spec["name"], num_features=num_features, **params)


def replace_activations(
    model: nn.Module, mapping: Mapping[str, Union[str, Mapping[str, Any]]], sample_input: Any = None
) -> list[Change]:
    """Replace activations by name, e.g. ``{"sigmoid": "elu", "tanh": {"name": "leaky_relu", "negative_slope": 0.2}}``.

    Activation modules are swapped. Functional activations (``F.relu(x)``, ``x.sigmoid()``) inside a
    submodule's ``forward`` are replaced by rewriting that submodule with ``torch.fx`` (it becomes a
    ``GraphModule``); in the root module's own ``forward``, or where fx cannot trace, they are reported as
    "not replaceable". PReLU with ``num_parameters="per-channel"`` gets one slope per output unit of the
    layer before it. Targets: relu, leaky_relu(negative_slope), rrelu(lower, upper),
    prelu(num_parameters, init), elu(alpha), selu, gelu, silu, sigmoid, tanh.
    """
    owner = "replace_activations"
    specs = {}
    for src, tgt in dict(mapping).items():
        if src not in SOURCE_NAMES:
            raise ValueError(f"{owner}: source activation {src!r} is not one of: {', '.join(SOURCE_NAMES)}")
        specs[src] = normalize_target(owner, src, tgt)
    layers = find_layers(model, sample_input)
    width_after = {i.activation_at: _width(i.module) for i in layers if i.activation_at}
    changes: list[Change] = []
    for path, mod in list(model.named_modules()):
        name = activation_module_name(mod)
        if not path or name not in specs or name == specs[name]["name"] and len(specs[name]) == 1:
            continue
        new = _build(specs[name], width_after.get(path))
        new = new.to(next(iter(model.parameters())).device) if any(True for _ in model.parameters()) else new
        _set(model, path, new)
        changes.append(Change(path, repr(mod), repr(new), _n_params(new) - _n_params(mod)))
    changes += _replace_functional(model, specs, width_after)
    if any(c.after != "-" for c in changes):
        _record(model, {"op": "activations", "mapping": {k: dict(v) for k, v in specs.items()}})
    return changes


def _width(layer: nn.Module) -> Optional[int]:
    for attr in ("out_features", "out_channels", "hidden_size"):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    return None


def _functional_nodes(graph: Any, specs: dict) -> list[tuple[Any, str]]:
    out = []
    for node in graph.nodes:
        name = None
        if node.op == "call_function":
            name = activation_function_name(node.target)
        elif node.op == "call_method":
            name = activation_method_name(node.target)
        if name in specs:
            out.append((node, name))
    return out


def _replace_functional(model: nn.Module, specs: dict, width_after: dict) -> list[Change]:
    import torch.fx

    class _Leafy(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return True  # trace only the module's own forward

    changes: list[Change] = []
    for path, mod in list(model.named_modules()):
        if isinstance(mod, torch.fx.GraphModule) and getattr(mod, "_gradguard_rewritten", False):
            continue
        if len(list(mod.children())) == 0 and not path:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _Leafy().trace(mod)
        except Exception:  # noqa: BLE001
            if _source_mentions(mod, specs):
                changes.append(Change(path or "(root)", "functional activation", "-", 0,
                                      "not replaceable: torch.fx cannot trace this module's forward"))
            continue
        found = _functional_nodes(graph, specs)
        if not found:
            continue
        if not path:
            for node, name in found:
                changes.append(Change(f"(root).{node.name}", f"{name} (functional)", "-", 0,
                                      "not replaceable: in the root module's forward; use an activation module"))
            continue
        gm = torch.fx.GraphModule(mod, graph, class_name=f"{type(mod).__name__}Rewritten")
        for k, (node, name) in enumerate(found):
            new = _build(specs[name], None if specs[name].get("num_parameters") != "per-channel" else _prev_width(node, mod))
            attr = f"gradguard_act_{k}"
            gm.add_module(attr, new)
            with gm.graph.inserting_after(node):
                repl = gm.graph.call_module(attr, args=(node.args[0],))
            node.replace_all_uses_with(repl)
            gm.graph.erase_node(node)
            changes.append(Change(f"{path}.{attr}", f"{name} (functional)", repr(new), _n_params(new), "fx rewrite"))
        gm.graph.lint()
        gm.recompile()
        gm._gradguard_rewritten = True
        _set(model, path, gm)
    return changes


def _prev_width(node: Any, mod: nn.Module) -> Optional[int]:
    arg = node.args[0] if node.args else None
    if getattr(arg, "op", None) == "call_module":
        return _width(mod.get_submodule(arg.target))
    return None


def _source_mentions(mod: nn.Module, specs: dict) -> bool:
    import inspect

    try:
        src = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):
        return False
    return any(f"{name}(" in src for name in specs)


# ---------------------------------------------------------------------------------------- restore
def surgery_spec(model: nn.Module) -> list[dict[str, Any]]:
    """The operations applied to ``model`` so far (plain dicts, checkpoint-safe)."""
    return [dict(op) for op in getattr(model, SURGERY_ATTR, [])]


def apply_spec(model: nn.Module, spec: Sequence[Mapping[str, Any]]) -> list[Change]:
    """Apply recorded operations in order (idempotent: operations already applied change nothing)."""
    changes: list[Change] = []
    for op in spec:
        op = dict(op)
        kind = op.pop("op")
        if kind == "batchnorm":
            changes += insert_batchnorm(model, **op)
        elif kind == "activations":
            changes += replace_activations(model, op["mapping"])
        else:
            raise ValueError(f"apply_spec: unknown surgery op {kind!r} (known: batchnorm, activations)")
    return changes


CHECKPOINT_KEY = "gradguard_surgery"


def restore(model: nn.Module, checkpoint: Union[str, Mapping[str, Any]]) -> list[Change]:
    """Give ``model`` (a fresh instance) the structure recorded in a checkpoint, before its weights load.

    Use it in your LightningModule so ``Model.load_from_checkpoint(path)`` works after surgery::

        def on_load_checkpoint(self, checkpoint):
            lightning_gradguard.restore(self, checkpoint)

    or by hand: ``restore(model, "last.ckpt"); model.load_state_dict(torch.load(...)["state_dict"])``.
    A checkpoint without gradguard surgery changes nothing.
    """
    if isinstance(checkpoint, (str,)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    spec = checkpoint.get(CHECKPOINT_KEY, [])
    return apply_spec(model, spec)


__all__ = [
    "insert_batchnorm", "replace_activations", "restore", "surgery_spec", "apply_spec", "Normalized", "Change",
    "format_changes", "POSITIONS", "SOURCE_NAMES", "TARGET_PARAMS", "ACTIVATION_NAMES",
]
