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
    custom_activation_functions,
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

#: linear layers of other libraries, by qualified class name (the library is not imported): Hugging Face's
#: ``Conv1D`` (GPT-2, ...) is a Linear whose weight is stored transposed, ``(in, out)``
TRANSPOSED_LINEAR_NAMES: tuple[str, ...] = ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")

NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, and subclasses with children
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: class-name endings of normalization layers that subclass none of the above (``LlamaRMSNorm``,
#: ``T5LayerNorm``, timm's ``LayerNorm2d`` subclasses ``nn.LayerNorm`` already)
NORM_NAME_SUFFIXES = ("RMSNorm", "LayerNorm", "BatchNorm", "GroupNorm", "LayerNorm2d")

_WEIGHTED_CACHE: dict[type, bool] = {}


def _qualnames(cls: type) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}


def is_transposed_linear(module: nn.Module) -> bool:
    """A Linear whose weight is ``(in, out)``: Hugging Face's ``Conv1D``."""
    return not isinstance(module, nn.Linear) and bool(_qualnames(type(module)) & set(TRANSPOSED_LINEAR_NAMES))


def is_weighted(module: nn.Module) -> bool:
    """A layer gradguard initializes, clips per unit and reports: torch's weighted layers (subclasses
    included) and Hugging Face's ``Conv1D``."""
    cls = type(module)
    if cls not in _WEIGHTED_CACHE:
        _WEIGHTED_CACHE[cls] = issubclass(cls, WEIGHTED_TYPES) or is_transposed_linear(module)
    return _WEIGHTED_CACHE[cls]


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: any ``_NormBase``/``LayerNorm``/``GroupNorm``/``RMSNorm`` subclass, with
    children or not (timm's ``BatchNormAct2d``), or a class named ``...RMSNorm``/``...LayerNorm``
    (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(NORM_NAME_SUFFIXES)


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
        if is_transposed_linear(m):
            return f"{self.kind} {m.weight.shape[0]}→{m.weight.shape[1]}"
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
        sample_input: a batch for the ``trace`` fallback: a tensor, a tuple of positional arguments, a
            dict of keyword arguments (Hugging Face style ``{"input_ids": ..., "attention_mask": ...}``;
            passed as ``model(**batch)``, or as ``model(batch)`` if the model takes one argument), or a
            zero-argument callable returning one (called only if needed); optional.

    Layers that tracing cannot see are added after it: the ``out_proj`` of ``nn.MultiheadAttention`` and
    the Linear layers of ``nn.TransformerEncoderLayer``/``DecoderLayer`` (fx leaves, and run by a fused
    kernel in inference), with the activation the container applies (``linear1``) or none.
        method: ``"auto"`` (fx, then trace, then modules), or force one of ``"fx"``, ``"trace"``, ``"modules"``.
            A model with ``DTensor`` (FSDP2-sharded) parameters skips fx under ``"auto"``: ``"trace"`` then
            runs a real forward, which every rank must run together.
    """
    if method not in ("auto", "fx", "trace", "modules"):
        raise ValueError(f"find_layers: method={method!r} is not one of: auto, fx, trace, modules")
    layers: Optional[list[LayerInfo]] = None
    if getattr(type(model).forward, "__name__", "") == "_forward_unimplemented" and method == "auto":
        return _with_recurrent(_from_module_order(model))  # e.g. a LightningModule using self.net directly
    if method == "auto" and any_dtensor(list(model.parameters())):
        method = "trace"  # sharded (FSDP2): fx would run FSDP's forward hooks on proxies and break its state
    if method in ("auto", "fx"):
        layers = _from_fx(model)
        if layers is None and method == "fx":
            raise RuntimeError("find_layers: torch.fx could not trace the model")
    if layers is None and method in ("auto", "trace"):
        if callable(sample_input) and not isinstance(sample_input, (torch.Tensor, nn.Module)):
            sample_input = sample_input()  # a lazy batch provider: only called when a batch is needed
        if sample_input is not None:
            layers = _from_trace(model, sample_input)
    if layers is None:
        layers = _from_module_order(model)
    return _with_recurrent(_add_missed(model, layers))


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Tied parameters: ``id(parameter)`` → the paths of every module that holds it directly, in
    registration order, for each parameter held by two modules or more (GPT-2's ``wte`` and ``lm_head``,
    T5's ``shared`` and ``embed_tokens``).

    Example:
        >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> list(shared_parameters(nn.ModuleDict({"emb": emb, "head": head})).values())
        [['emb', 'head']]
    """
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        path = name.rpartition(".")[0]
        paths = holders.setdefault(id(p), [])
        if path not in paths:
            paths.append(path)
    return {k: v for k, v in holders.items() if len(v) > 1}


def model_input(batch: Any) -> Any:
    """The model's input in a training batch: the first element of an ``(x, y)`` tuple or list, the
    whole batch otherwise (a tensor, or a dict of keyword arguments)."""
    return batch[0] if isinstance(batch, (list, tuple)) and batch else batch


def call_with_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch as its ``forward`` expects: a tuple as positional arguments, a dict as
    keyword arguments (or as one argument when ``forward`` does not take its keys), else one argument."""
    if isinstance(batch, tuple):
        return model(*batch)
    if isinstance(batch, dict):
        import inspect

        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if takes_kwargs or (batch and all(str(k) in params for k in batch)):
            return model(**batch)
    return model(batch)


def _add_missed(model: nn.Module, layers: list[LayerInfo]) -> list[LayerInfo]:
    """Weighted modules inside other weighted layers or torch containers that tracing treated as one call.

    Each is placed right after the found layer registered before it. ``linear1`` of a Transformer
    encoder/decoder layer gets the container's activation; everything else (``out_proj``, ``linear2``)
    is linear.
    """
    found = {info.name for info in layers}
    missed = [(n, m) for n, m in model.named_modules() if n and n not in found and is_weighted(m)]
    if not missed:
        return layers
    modules = dict(model.named_modules())
    registration = {n: i for i, n in enumerate(modules)}
    out = list(layers)
    for name, mod in missed:
        parent_path, _, leaf = name.rpartition(".")
        parent = modules.get(parent_path)
        act, slope, where = "linear", 0.0, None
        if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and leaf == "linear1":
            fn = parent.activation
            act = (activation_module_name(fn) if isinstance(fn, nn.Module) else activation_function_name(fn)) or "unknown"
            slope = negative_slope(fn if isinstance(fn, nn.Module) else None, act)
            where = f"{parent_path}.activation" if isinstance(fn, nn.Module) else getattr(fn, "__name__", None)
        elif not isinstance(parent, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            act = "unknown"  # somewhere tracing did not go: nothing says what follows
        rank = registration[name]
        at = 0
        for i, info in enumerate(out):
            if registration.get(info.name, -1) < rank:
                at = i + 1
        out.insert(at, LayerInfo(name, mod, act, slope, "modules", where))
    for i, info in enumerate(out):
        info.order = i
    return out


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
            graph = _Tracer(autowrap_functions=custom_activation_functions()).trace(model)
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
            # a composite activation (gelu_new = x·(1+tanh(...))) is named by its module, not by its calls
            handles.append(mod.register_forward_pre_hook(lambda m, a: setattr(recorder, "inside_layer", recorder.inside_layer + 1)))

            def _act(m, a, o, name=name):
                recorder.inside_layer -= 1
                if recorder.inside_layer == 0:
                    act = activation_module_name(m)
                    events.append(("act", act, negative_slope(m, act), name))

            handles.append(mod.register_forward_hook(_act))
    was_training = model.training
    mha = getattr(torch.backends, "mha", None)
    fast_path = mha.get_fastpath_enabled() if mha is not None else None
    try:
        model.eval()
        if mha is not None:
            mha.set_fastpath_enabled(False)  # the fused encoder kernel would skip the Linear layers' hooks
        with torch.no_grad(), recorder:
            call_with_batch(model, sample_input)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"gradguard: a forward pass on the sample input failed ({err!r}); using module order", stacklevel=2)
        return None
    finally:
        model.train(was_training)
        if mha is not None:
            mha.set_fastpath_enabled(fast_path)
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


__all__ = [
    "LayerInfo", "find_layers", "is_weighted", "is_norm", "shared_parameters", "is_transposed_linear", "call_with_batch", "model_input", "WEIGHTED_TYPES",
    "NORM_TYPES",
]
