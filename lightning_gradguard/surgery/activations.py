"""Activation replacement, torch only: swap activation modules; functional ones go through :mod:`.fx_rewrite`.

Example:
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
    >>> [c.path for c in replace_activations(net, {"sigmoid": "elu"})]
    ['1']
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from torch import nn

from lightning_gradguard.activations import activation_module_name
from lightning_gradguard.graph import find_layers
from lightning_gradguard.surgery._common import Change, build_activation, layer_width, n_params, record, set_submodule
from lightning_gradguard.surgery.fx_rewrite import replace_functional

#: targets' accepted parameters
TARGET_PARAMS: dict[str, tuple[str, ...]] = {
    "leaky_relu": ("negative_slope",), "rrelu": ("lower", "upper"), "prelu": ("num_parameters", "init"),
    "elu": ("alpha",), "selu": (), "gelu": ("approximate",), "silu": (), "relu": (), "tanh": (), "sigmoid": (),
}
#: activations that can be replaced (sources)
SOURCE_NAMES = (
    "relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "gelu", "silu", "hardswish", "mish", "sigmoid", "tanh",
)


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


def normalize_mapping(owner: str, mapping: Mapping[str, Union[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Check a source → target mapping; each target becomes a dict with ``name`` (see :func:`normalize_target`).

    A chain (``{"sigmoid": "tanh", "tanh": "elu"}``) is refused: applied twice it would turn the new tanh
    into elu, so the surgery would not be idempotent; map each source to its final target instead.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{owner}: mapping={mapping!r} must be a mapping of source activation -> target")
    specs: dict[str, dict[str, Any]] = {}
    for source, target in mapping.items():
        if source not in SOURCE_NAMES:
            raise ValueError(f"{owner}: mapping key {source!r} is not one of: {', '.join(SOURCE_NAMES)}")
        if not isinstance(target, (str, Mapping)):
            raise TypeError(f"{owner}: mapping[{source!r}]={target!r} must be a name or a mapping with 'name'")
        specs[str(source)] = normalize_target(owner, source, target)
    for source, spec in specs.items():
        then = specs.get(spec["name"])
        if spec["name"] != source and then is not None and then != spec:
            raise ValueError(
                f"{owner}: mapping[{source!r}] -> {spec['name']!r} is itself a source (-> {then['name']!r}); "
                f"a chain is not idempotent: map {source!r} to its final target"
            )
    return specs


def replace_activations(
    model: nn.Module, mapping: Mapping[str, Union[str, Mapping[str, Any]]], sample_input: Any = None
) -> list[Change]:
    """Replace activations by name, e.g. ``{"sigmoid": "elu", "tanh": {"name": "leaky_relu", "negative_slope": 0.2}}``.

    Activation modules are swapped. Functional activations (``F.relu(x)``, ``x.sigmoid()``) inside a
    submodule's ``forward`` are replaced by rewriting that submodule with ``torch.fx`` (it becomes a
    ``GraphModule``); in the root module's own ``forward``, or where fx cannot trace, they are reported as
    "not replaceable". A second call changes nothing. PReLU with ``num_parameters="per-channel"`` gets one slope per output unit of the
    layer before it. Targets: relu, leaky_relu(negative_slope), rrelu(lower, upper),
    prelu(num_parameters, init), elu(alpha), selu, gelu, silu, sigmoid, tanh.
    """
    specs = normalize_mapping("replace_activations", mapping)
    width_after: dict[str, Optional[int]] = {}
    if any(spec.get("num_parameters") == "per-channel" for spec in specs.values()):  # only PReLU needs the widths
        width_after = {i.activation_at: layer_width(i.module) for i in find_layers(model, sample_input) if i.activation_at}
    changes: list[Change] = []
    for path, mod in list(model.named_modules()):
        name = activation_module_name(mod)
        if not path or name not in specs or name == specs[name]["name"] and len(specs[name]) == 1:
            continue
        new = build_activation(specs[name], width_after.get(path))
        if repr(new) == repr(mod):
            continue  # already the target (idempotent; a trained PReLU keeps its slopes)
        new = new.to(next(iter(model.parameters())).device) if any(True for _ in model.parameters()) else new
        set_submodule(model, path, new)
        changes.append(Change(path, repr(mod), repr(new), n_params(new) - n_params(mod)))
    changes += replace_functional(model, specs)
    if any(c.after != "-" for c in changes):
        record(model, {"op": "activations", "mapping": {k: dict(v) for k, v in specs.items()}})
    return changes
