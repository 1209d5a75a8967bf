"""One vocabulary of activation names, shared by the models, init, surgery and statistics.

``identify_activation`` maps an activation *module* or *function* to ``(name, slope)``; ``make_activation``
builds a module from a name. Names: relu, leaky_relu, prelu, rrelu, elu, selu, gelu, silu, sigmoid, tanh,
softmax, log_softmax, linear.
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

_MODULE_NAMES: dict[type, str] = {
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
    nn.Mish: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardtanh: "tanh",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax",
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
    F.mish: "silu",
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


def activation_module_name(module: nn.Module) -> Optional[str]:
    """The vocabulary name of an activation module, or ``None`` if ``module`` is no activation."""
    return _MODULE_NAMES.get(type(module))


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
    "gelu": F.gelu, "silu": F.silu,
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
