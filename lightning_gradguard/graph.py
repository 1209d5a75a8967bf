"""Which activation follows each weighted layer, found from the model itself.

Three ways, tried in order:

1. ``fx``: ``torch.fx.symbolic_trace`` of the model; from each weighted layer's node the data flow is
   followed (through dropout, reshapes, pooling, normalization, residual adds, ...) to the first
   activation module, functional activation (``F.relu``, ``torch.tanh``) or tensor method
   (``x.sigmoid()``). Reaching another weighted layer or the output first means "linear" (no activation).
2. ``trace``: when fx cannot trace (data-dependent control flow), one forward pass on a sample input
   records, in execution order, weighted layers finishing and activations being called (modules through
   forward hooks, functions and tensor methods through a ``TorchFunctionMode``).
3. ``modules``: without a sample input, the order in which modules are registered; functional
   activations are then invisible and such layers are reported as ``unknown``.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [(l.name, l.activation) for l in find_layers(net)]
    [('0', 'relu'), ('2', 'linear')]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_gradguard.activations import (
    activation_function_name,
    activation_method_name,
    activation_module_name,
    negative_slope,
)
from lightning_gradguard.distributed import any_dtensor

#: module types whose parameters gradguard initializes, clips per unit and reports as layers
WEIGHTED_TYPES: tuple[type, ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.RNNBase,
    nn.MultiheadAttention,
)

NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def is_weighted(module: nn.Module) -> bool:
    return isinstance(module, WEIGHTED_TYPES)


@dataclass
class LayerInfo:
    """A weighted layer and the activation that follows it.

    ``activation`` is a vocabulary name (see :mod:`lightning_gradguard.activations`), ``"linear"`` for
    none, ``"recurrent"`` for RNN/LSTM/GRU (activations inside), or ``"unknown"``. ``slope`` is the
    negative slope used in He's gain; ``source`` says how it was found (fx, trace, modules).
    """

    name: str
    module: nn.Module
    activation: str
    slope: float = 0.0
    source: str = "fx"
    activation_at: Optional[str] = None
    order: int = 0

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def describe(self) -> str:
        """``Linear 64→64`` / ``Conv2d 16→32 3x3`` style short description."""
        m = self.module
        if isinstance(m, nn.Linear):
            return f"Linear {m.in_features}→{m.out_features}"
        if isinstance(m, nn.modules.conv._ConvNd):
            k = "x".join(str(s) for s in m.kernel_size)
            return f"{self.kind} {m.in_channels}→{m.out_channels} {k}"
        if isinstance(m, nn.Embedding):
            return f"Embedding {m.num_embeddings}×{m.embedding_dim}"
        if isinstance(m, nn.RNNBase):
            return f"{self.kind} {m.input_size}→{m.hidden_size}"
        return self.kind


def find_layers(model: nn.Module, sample_input: Any = None, method: str = "auto") -> list[LayerInfo]:
    """Every weighted layer of ``model`` in forward order, with the activation that follows it.

    Args:
        model: any ``nn.Module``.
        sample_input: a batch (tensor, or tuple of positional arguments) for the ``trace`` fallback, or a
            zero-argument callable returning one (called only if needed); optional.
        method: ``"auto"`` (fx, then trace, then modules), or force one of ``"fx"``, ``"trace"``, ``"modules"``.
            A model with ``DTensor`` (FSDP2-sharded) parameters skips fx under ``"auto"``: ``"trace"`` then
            runs a real forward, which every rank must run together.
    """
    if method not in ("auto", "fx", "trace", "modules"):
        raise ValueError(f"find_layers: method={method!r} is not one of: auto, fx, trace, modules")
    if callable(sample_input) and not isinstance(sample_input, (torch.Tensor, nn.Module)):
        sample_input = sample_input()  # a lazy batch provider: only called when a batch is needed
    layers: Optional[list[LayerInfo]] = None
    if getattr(type(model).forward, "__name__", "") == "_forward_unimplemented" and method == "auto":
        return _with_recurrent(_from_module_order(model))  # e.g. a LightningModule using self.net directly
    if method == "auto" and any_dtensor(list(model.parameters())):
        method = "trace"  # sharded (FSDP2): fx would run FSDP's forward hooks on proxies and break its state
    if method in ("auto", "fx"):
        layers = _from_fx(model)
        if layers is None and method == "fx":
            raise RuntimeError("find_layers: torch.fx could not trace the model")
    if layers is None and sample_input is not None and method in ("auto", "trace"):
        layers = _from_trace(model, sample_input)
    if layers is None:
        layers = _from_module_order(model)
    return _with_recurrent(layers)


def _with_recurrent(layers: list[LayerInfo]) -> list[LayerInfo]:
    for info in layers:
        if isinstance(info.module, nn.RNNBase):
            info.activation, info.activation_at = "recurrent", None
    return layers


# --------------------------------------------------------------------------------------------- fx
def _from_fx(model: nn.Module) -> Optional[list[LayerInfo]]:
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_weighted(m) or activation_module_name(m) is not None or super().is_leaf_module(m, qualname)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the fallback"
        return None
    modules = dict(model.named_modules())
    layers: list[LayerInfo] = []
    seen: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module" or not is_weighted(modules.get(node.target, nn.Identity())):
            continue
        if node.target in seen:  # a layer called twice (weight sharing): the first call decides
            continue
        seen.add(node.target)
        name, slope, where = _follow(node, modules)
        layers.append(LayerInfo(node.target, modules[node.target], name, slope, "fx", where, len(layers)))
    return layers


def _classify_node(node: Any, modules: dict[str, nn.Module]) -> tuple[Optional[str], float, Optional[str]]:
    """(activation name, slope, where) if ``node`` is an activation, ("stop", ...) at a weighted layer."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if mod is None:
            return None, 0.0, None
        if is_weighted(mod):
            return "stop", 0.0, None
        name = activation_module_name(mod)
        if name:
            return name, negative_slope(mod, name), node.target
    elif node.op == "call_function":
        name = activation_function_name(node.target)
        if name:
            return name, negative_slope(None, name, tuple(node.args), dict(node.kwargs)), getattr(
                node.target, "__name__", str(node.target)
            )
    elif node.op == "call_method":
        name = activation_method_name(node.target)
        if name:
            return name, 0.0, f"Tensor.{node.target}"
    elif node.op == "output":
        return "stop", 0.0, None
    return None, 0.0, None


def _follow(start: Any, modules: dict[str, nn.Module]) -> tuple[str, float, Optional[str]]:
    """Depth-first along the data flow from ``start`` to the first activation (or a stop)."""
    stack = list(reversed(list(start.users)))
    visited: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        name, slope, where = _classify_node(node, modules)
        if name == "stop":
            return "linear", 0.0, None
        if name is not None:
            return name, slope, where
        # anything else (reshape, dropout, pooling, norm, add, getitem, ...) passes the signal on
        stack.extend(reversed(list(node.users)))
    return "linear", 0.0, None


# ------------------------------------------------------------------------------------------ trace
class _Recorder(TorchFunctionMode):
    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events
        self.inside_layer = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside_layer == 0:
            name = activation_function_name(func)
            if name is None:
                method = getattr(func, "__name__", "")
                owner = getattr(func, "__objclass__", None)
                if isinstance(owner, type) and issubclass(owner, torch._C.TensorBase):
                    name = activation_method_name(method)
            if name is not None:
                self.events.append(("act", name, negative_slope(None, name, tuple(args), kwargs), getattr(func, "__name__", str(func))))
        return func(*args, **kwargs)


def _from_trace(model: nn.Module, sample_input: Any) -> Optional[list[LayerInfo]]:
    events: list[tuple] = []
    recorder = _Recorder(events)
    handles = []
    names = {m: n for n, m in model.named_modules()}
    for mod, name in names.items():
        if is_weighted(mod):
            handles.append(mod.register_forward_pre_hook(lambda m, a: setattr(recorder, "inside_layer", recorder.inside_layer + 1)))

            def _done(m, a, o, name=name):
                recorder.inside_layer -= 1
                events.append(("layer", name, m))

            handles.append(mod.register_forward_hook(_done))
        elif activation_module_name(mod) is not None:

            def _act(m, a, o, name=name):
                if recorder.inside_layer == 0:
                    act = activation_module_name(m)
                    events.append(("act", act, negative_slope(m, act), name))

            handles.append(mod.register_forward_hook(_act))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), recorder:
            args = sample_input if isinstance(sample_input, tuple) else (sample_input,)
            model(*args)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"gradguard: a forward pass on the sample input failed ({err!r}); using module order", stacklevel=2)
        return None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    layers: list[LayerInfo] = []
    seen: set[str] = set()
    for i, event in enumerate(events):
        if event[0] != "layer" or event[1] in seen:
            continue
        seen.add(event[1])
        act, slope, where = "linear", 0.0, None
        for later in events[i + 1 :]:
            if later[0] == "layer":
                break
            # a module activation records its inner function call first and its module hook second
            act, slope, where = later[1], later[2], later[3]
            break
        layers.append(LayerInfo(event[1], event[2], act, slope, "trace", where, len(layers)))
    return layers


# ---------------------------------------------------------------------------------------- modules
def _from_module_order(model: nn.Module) -> list[LayerInfo]:
    leaves = [(n, m) for n, m in model.named_modules() if is_weighted(m) or activation_module_name(m) is not None]
    weighted = [i for i, (_, m) in enumerate(leaves) if is_weighted(m)]
    layers: list[LayerInfo] = []
    for k, i in enumerate(weighted):
        name, mod = leaves[i]
        nxt = leaves[i + 1] if i + 1 < len(leaves) else None
        if nxt is not None and not is_weighted(nxt[1]):
            act = activation_module_name(nxt[1]) or "unknown"
            layers.append(LayerInfo(name, mod, act, negative_slope(nxt[1], act), "modules", nxt[0], k))
        elif k == len(weighted) - 1:
            layers.append(LayerInfo(name, mod, "linear", 0.0, "modules", None, k))
        else:
            layers.append(LayerInfo(name, mod, "unknown", 0.0, "modules", None, k))
    return layers


__all__ = ["LayerInfo", "find_layers", "is_weighted", "WEIGHTED_TYPES", "NORM_TYPES"]
