"""One vocabulary of activation names, shared by the models, init, surgery and statistics.

``activation_module_name`` maps an activation *module* to its family name, ``activation_function_name`` a
*function*; ``make_activation`` builds a module from a name. Names: relu, relu6, leaky_relu, prelu, rrelu,
elu, selu, gelu, silu, hardswish, mish, sigmoid, tanh, softmax, log_softmax, linear.

Modules are recognised by class, subclasses included (``isinstance``), from a registry that covers torch's
whole ``nn.modules.activation`` and, by qualified class name (so neither library is imported), Hugging
Face's ``transformers.activations`` (what ``ACT2FN``/``get_activation`` return) and timm's
``timm.layers.activations*`` (what ``get_act_layer`` returns). A composite activation is named by what it
computes, not by the functions it calls: ``NewGELUActivation`` (``gelu_new``, built on ``torch.tanh``) is
``gelu``, ``QuickGELU`` is ``gelu``, Swish is ``silu``. Users extend the registry with
:func:`register_activation` (a class, a qualified class name, or a plain function).

Example:
    >>> activation_module_name(nn.Hardswish())
    'hardswish'
    >>> class MyGELU(nn.Module):
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(1.702 * x)
    >>> register_activation(MyGELU, "gelu")
    >>> activation_module_name(MyGELU())
    'gelu'
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: activations a user may build by name (models' ``activation`` and surgery targets)
ACTIVATION_NAMES = ("relu", "leaky_relu", "prelu", "rrelu", "elu", "selu", "gelu", "silu", "sigmoid", "tanh")

#: ReLU-family activations whose outputs can be exactly zero ("dead units")
RELU_FAMILY = ("relu", "relu6")
#: saturating activations and their output bounds
SATURATING_BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}

#: every family name the registry may map to
FAMILY_NAMES = (
    "relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "gelu", "silu", "hardswish", "mish", "sigmoid",
    "tanh", "softmax", "log_softmax", "linear",
)

_MODULE_NAMES: dict[Any, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.CELU: "elu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Hardswish: "hardswish",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "sigmoid",
    nn.LogSigmoid: "log_softmax",  # (-inf, 0): no saturation bounds
    nn.Tanh: "tanh",
    nn.Hardtanh: "tanh",  # ReLU6 subclasses Hardtanh, but its own entry comes first in its MRO
    nn.Tanhshrink: "linear",
    nn.Softsign: "tanh",
    nn.Softplus: "relu",
    nn.Threshold: "relu",
    nn.Softshrink: "linear",
    nn.Hardshrink: "linear",
    nn.GLU: "linear",  # a gated product, unbounded
    nn.Softmax: "softmax",
    nn.Softmax2d: "softmax",
    nn.Softmin: "softmax",
    nn.LogSoftmax: "log_softmax",
    # Hugging Face transformers.activations (ACT2FN), by qualified name: transformers is not imported
    "transformers.activations.GELUActivation": "gelu",
    "transformers.activations.NewGELUActivation": "gelu",
    "transformers.activations.GELUTanh": "gelu",
    "transformers.activations.PytorchGELUTanh": "gelu",
    "transformers.activations.FastGELUActivation": "gelu",
    "transformers.activations.QuickGELUActivation": "gelu",
    "transformers.activations.ClippedGELUActivation": "gelu",
    "transformers.activations.AccurateGELUActivation": "gelu",
    "transformers.activations.GELUActivation1": "gelu",
    "transformers.activations.LaplaceActivation": "gelu",
    "transformers.activations.SiLUActivation": "silu",
    "transformers.activations.MishActivation": "mish",
    "transformers.activations.ReLUSquaredActivation": "relu",
    "transformers.activations.LinearActivation": "linear",
    "transformers.activations.XIELUActivation": "elu",
    # timm.layers.activations / activations_me (get_act_layer), by qualified name
    **{f"timm.layers.activations.{k}": v for k, v in {
        "Swish": "silu", "Mish": "mish", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish",
        "HardSigmoid": "sigmoid", "HardMish": "mish", "GELU": "gelu", "GELUTanh": "gelu", "QuickGELU": "gelu",
        "PReLU": "prelu",
    }.items()},
    **{f"timm.layers.activations_me.{k}": v for k, v in {
        "SwishMe": "silu", "MishMe": "mish", "HardSigmoidMe": "sigmoid", "HardSwishMe": "hardswish",
        "HardMishMe": "mish",
    }.items()},
}

_FUNCTION_NAMES: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu_: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.prelu: "prelu",
    F.rrelu: "rrelu",
    F.elu: "elu",
    F.celu: "elu",
    F.selu: "selu",
    torch.selu: "selu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.hardsigmoid: "sigmoid",
    F.hardtanh: "tanh",
    F.softplus: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.log_softmax: "log_softmax",
    torch.log_softmax: "log_softmax",
}

_METHOD_NAMES = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
}


_TYPE_CACHE: dict[type, Optional[str]] = {}


def register_activation(activation: Any, name: str) -> None:
    """Teach gradguard an activation: a module class (subclasses included), a qualified class name
    (``"my_lib.layers.FancyGELU"``, so the library need not be imported), or a function (recognised where
    it is called in a traced ``forward``; fx then treats it as one call instead of tracing into it).

    ``name`` is the family whose init, dead-unit and saturation rules apply.

    Raises:
        ValueError: ``name`` is not a family name.

    Example:
        >>> register_activation("my_lib.layers.FancyGELU", "gelu")
    """
    if name not in FAMILY_NAMES:
        raise ValueError(f"register_activation: name={name!r} is not one of: {', '.join(FAMILY_NAMES)}")
    if isinstance(activation, (type, str)):
        _MODULE_NAMES[activation] = name
        _TYPE_CACHE.clear()
    elif callable(activation):
        _FUNCTION_NAMES[activation] = name
        _CUSTOM_FUNCTIONS.append(activation)
    else:
        raise ValueError(f"register_activation: activation={activation!r} is not a class, a class name or a function")


#: functions registered by users (fx does not trace into them)
_CUSTOM_FUNCTIONS: list[Callable[..., Any]] = []


def custom_activation_functions() -> tuple[Callable[..., Any], ...]:
    return tuple(_CUSTOM_FUNCTIONS)


def activation_module_name(module: nn.Module) -> Optional[str]:
    """The family name of an activation module, or ``None`` if ``module`` is no activation.

    The most specific registered class in the module's MRO decides (``ReLU6`` before ``Hardtanh``).
    """
    cls = type(module)
    if cls in _TYPE_CACHE:
        return _TYPE_CACHE[cls]
    found = None
    for base in cls.__mro__:
        found = _MODULE_NAMES.get(base) or _MODULE_NAMES.get(f"{base.__module__}.{base.__qualname__}")
        if found is not None:
            break
    _TYPE_CACHE[cls] = found
    return found


def activation_function_name(fn: Any) -> Optional[str]:
    """The vocabulary name of a functional activation (``F.relu``, ``torch.tanh``), or ``None``."""
    try:
        return _FUNCTION_NAMES.get(fn)
    except TypeError:  # unhashable target
        return None


def activation_method_name(method: str) -> Optional[str]:
    """The vocabulary name of a tensor method activation (``x.sigmoid()``), or ``None``."""
    return _METHOD_NAMES.get(method)


def negative_slope(module: Optional[nn.Module], name: str, args: tuple = (), kwargs: Optional[dict] = None) -> float:
    """Slope of the negative part, used in the He gain: LeakyReLU's slope, PReLU's initial value,
    RReLU's mean slope; 0 for every other activation."""
    kwargs = kwargs or {}
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        return float(module.weight.detach().mean())
    if isinstance(module, nn.RReLU):
        return (float(module.lower) + float(module.upper)) / 2.0
    if name == "leaky_relu":
        return float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    if name == "rrelu":
        lower = float(kwargs.get("lower", args[1] if len(args) > 1 else 1.0 / 8))
        upper = float(kwargs.get("upper", args[2] if len(args) > 2 else 1.0 / 3))
        return (lower + upper) / 2.0
    if name == "prelu":
        return 0.25
    return 0.0


#: functional forms, to apply a layer's activation to its output when the activation is no module
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "elu": F.elu, "selu": F.selu,
    "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish, "mish": F.mish, "leaky_relu": F.leaky_relu,
}


def make_activation(name: str, num_features: Optional[int] = None, **params: Any) -> nn.Module:
    """Build an activation module from its vocabulary name.

    Example:
        >>> make_activation("leaky_relu", negative_slope=0.2)
        LeakyReLU(negative_slope=0.2)
    """
    factories: dict[str, Callable[..., nn.Module]] = {
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "rrelu": nn.RReLU,
        "elu": nn.ELU,
        "selu": nn.SELU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
    }
    if name == "prelu":
        per_channel = params.pop("num_parameters", 1)
        n = num_features if per_channel == "per-channel" and num_features else int(per_channel) if per_channel != "per-channel" else 1
        return nn.PReLU(num_parameters=n, **params)
    if name not in factories:
        raise ValueError(f"activation={name!r} is not one of: {', '.join(ACTIVATION_NAMES)}")
    return factories[name](**params)
