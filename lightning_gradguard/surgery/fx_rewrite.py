"""Functional activations (``F.relu(x)``, ``x.sigmoid()``) inside a submodule's ``forward``, replaced by
rewriting that submodule with ``torch.fx`` into a ``GraphModule`` that calls an activation module instead.

Idempotent without bookkeeping: a rewritten module no longer calls the replaced functions, so a second pass
finds nothing; a later pass with another mapping rewrites what is left.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Optional

import torch.fx
from torch import nn

from lightning_gradguard.activations import activation_function_name, activation_method_name, activation_module_name
from lightning_gradguard.surgery._common import Change, build_activation, layer_width, n_params, set_submodule


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


#: torch.nn modules whose own ``forward`` calls no activation function: not traced (exact types only, so a
#: subclass with its own ``forward`` is still traced). Tracing each Linear of a deep net costs more than the
#: rest of the surgery.
NO_ACTIVATION_TYPES: frozenset = frozenset({
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Sequential, nn.ModuleList, nn.ModuleDict,
})


#: the attributes every ``nn.Module`` has (hooks, parameter and module dicts): not part of :func:`_trace_key`
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_SCALARS = (str, int, float, bool, type(None))
_NOT_PLAIN = object()


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a plain value, with its type (so ``1``, ``1.0`` and ``True`` differ): scalars
    (str, int, float, bool, None) and tuples, lists and ``torch.Size`` of plain values; ``_NOT_PLAIN`` for
    anything else."""
    if type(value) in _SCALARS:
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list, torch.Size):
        items = tuple(_frozen(v) for v in value)
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else (type(value).__name__, items)
    return _NOT_PLAIN


def _trace_key(mod: nn.Module) -> Optional[tuple]:
    """What the trace of ``mod``'s own ``forward`` can depend on, or ``None`` when that is not known: for it and
    every submodule, the class, every attribute that is not an ``nn.Module`` internal (it must be plain: str,
    int, float, bool, None, or tuples/lists of them, e.g. ``self.activation = "gelu"`` that ``forward`` looks up,
    or a child's ``out_features`` it reads), and the shapes and dtypes of parameters and buffers (``forward``
    may read ``self.weight.shape``). Any other attribute, on the module or a submodule (a tensor, a callable, a
    container of those), gives no key, and the module is traced on its own. Equal keys mean the traces can only
    differ through something outside the modules (globals), which is the same for every block traced in one
    call; so blocks with equal keys (those of a deep net) are traced once."""
    parts: list[Any] = []
    for path, sub in mod.named_modules():
        attrs = []
        for name, value in vars(sub).items():
            if name in _MODULE_INTERNALS:
                continue
            frozen = _frozen(value)
            if frozen is _NOT_PLAIN:
                return None
            attrs.append((name, frozen))
        parts.append((path, type(sub), tuple(attrs),
                      tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in sub._parameters.items()),
                      tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in sub._buffers.items())))
    return tuple(parts)


def replace_functional(model: nn.Module, specs: dict) -> list[Change]:
    """Rewrite each submodule whose own ``forward`` calls a functional activation named in ``specs``
    (modules of :data:`NO_ACTIVATION_TYPES` are not traced). Blocks that trace alike (:func:`_trace_key`: the
    blocks of a deep net) are traced once and the graph copied, since tracing costs most of the rewrite."""
    class _Leafy(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return True  # trace only the module's own forward

    changes: list[Change] = []
    traced: dict[tuple, Any] = {}  # trace key -> the graph as traced (before any rewrite)
    for path, mod in list(model.named_modules()):
        if len(list(mod.children())) == 0 and not path or activation_module_name(mod) is not None:
            continue
        if path and type(mod) in NO_ACTIVATION_TYPES:
            continue  # an activation module's own forward (F.prelu in nn.PReLU) is swapped, not rewritten
        key = _trace_key(mod) if path else None
        if key is not None and key in traced and _resolves(mod, traced[key]):
            graph = copy.deepcopy(traced[key])
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = _Leafy().trace(mod)
            except Exception:  # noqa: BLE001
                if _source_mentions(mod, specs):
                    changes.append(Change(path or "(root)", "functional activation", "-", 0,
                                          "not replaceable: torch.fx cannot trace this module's forward"))
                continue
            if key is not None:
                traced[key] = copy.deepcopy(graph)
        found = _functional_nodes(graph, specs)
        if not found:
            continue
        if not path:
            for node, name in found:
                changes.append(Change(f"(root).{node.name}", f"{name} (functional)", "-", 0,
                                      "not replaceable: in the root module's forward; use an activation module"))
            continue
        base = type(mod).__name__
        added = []  # the graph is edited before the GraphModule is built from it (one code generation, not two):
        try:        # the new activations sit on ``mod`` meanwhile, where the GraphModule copies them from
            for node, name in found:
                new = build_activation(specs[name], None if specs[name].get("num_parameters") != "per-channel" else _prev_width(node, mod))
                attr = _free_name(mod)
                mod.add_module(attr, new)
                added.append(attr)
                with graph.inserting_after(node):
                    repl = graph.call_module(attr, args=(node.args[0],))
                node.replace_all_uses_with(repl)
                graph.erase_node(node)
                changes.append(Change(f"{path}.{attr}", f"{name} (functional)", repr(new), n_params(new), "fx rewrite"))
            graph.lint()
            gm = torch.fx.GraphModule(mod, graph, class_name=base if base.endswith("Rewritten") else f"{base}Rewritten")
        finally:
            for attr in added:
                delattr(mod, attr)
        set_submodule(model, path, gm)
    return changes


def _resolves(mod: nn.Module, graph: Any) -> bool:
    """Every attribute and submodule ``graph`` reads exists on ``mod`` (a trace can store constants on the module
    it traced, e.g. ``_tensor_constant0``: such a graph is not reused for another module)."""
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            obj: Any = mod
            for atom in str(node.target).split("."):
                if not hasattr(obj, atom):
                    return False
                obj = getattr(obj, atom)
    return True


def _free_name(mod: nn.Module) -> str:
    """``gradguard_act_<k>`` with the first k not taken (a rewritten module can be rewritten again)."""
    k = 0
    while hasattr(mod, f"gradguard_act_{k}"):
        k += 1
    return f"gradguard_act_{k}"


def _prev_width(node: Any, mod: nn.Module) -> Optional[int]:
    arg = node.args[0] if node.args else None
    if getattr(arg, "op", None) == "call_module":
        return layer_width(mod.get_submodule(arg.target))
    return None


def _source_mentions(mod: nn.Module, specs: dict) -> bool:
    try:
        src = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):
        return False
    return any(f"{name}(" in src for name in specs)
