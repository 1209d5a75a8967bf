"""Weight initialization matched to each layer's activation, with Keras semantics.

``variance_scaling_`` is Keras's ``VarianceScaling``: variance = scale / n, n the layer's fan_in, fan_out
or their average; ``truncated_normal`` is cut at 2 std and its std divided by 0.87962566103423978 so the
*truncated* distribution has exactly that variance (``torch.nn.init.trunc_normal_`` instead takes the
pre-truncation std and absolute bounds, so its ``std`` is not the result's). The named schemes are Keras's:

==================  ======  ========  ===================
scheme              scale   mode      distribution
==================  ======  ========  ===================
glorot_uniform      1       fan_avg   uniform
glorot_normal       1       fan_avg   truncated_normal
he_uniform          2       fan_in    uniform
he_normal           2       fan_in    truncated_normal
lecun_uniform       1       fan_in    uniform
lecun_normal        1       fan_in    truncated_normal
==================  ======  ========  ===================

(Glorot & Bengio 2010; He et al. 2015; LeCun et al. 1998 / Klambauer et al. 2017 for SELU.)
PyTorch's own default for Linear/Conv is U(±1/√fan_in), variance 1/(3·fan_in): ⅓ of LeCun, ⅙ of He.

``auto`` picks per layer from the activation that follows it (:func:`lightning_gradguard.graph.find_layers`):
Glorot for tanh, sigmoid, softmax and none; He for ReLU, LeakyReLU/PReLU/RReLU (scale 2/(1+a²) with the
negative slope a), ELU, GELU, SiLU; LeCun for SELU; RNN/LSTM/GRU input weights Glorot and recurrent
weights orthogonal, per gate block. A layer whose activation cannot be found gets Glorot (Keras's Dense
default) and is listed with activation ``unknown``. Embeddings are left as they are unless an override
names them. Parameters with ``requires_grad=False`` are never touched. Hugging Face's ``Conv1D`` (GPT-2)
is a Linear with its weight stored ``(in, out)``.

Weights that are not fresh from construction are kept unless ``force=True``: adapters (``lora_*``), layers
of a Hugging Face model loaded with ``from_pretrained``, and weights that look trained (see
:mod:`lightning_gradguard.pretrained`); the table says which and why. A tied parameter (GPT-2's ``wte`` and
``lm_head``) is initialized once, by the layer that owns it: the embedding if one holds it (so it is kept,
as embeddings are), else the first holder in forward order; the other holders list it as tied.

Sharded parameters (FSDP2 ``DTensor``): fans come from the global shape, and every rank fills the full tensor
with the same generator and keeps its own shard, so the result equals initializing the unsharded model with
the same seed, before or after ``fully_shard`` (all ranks must call :func:`initialize`). LSUV runs before
sharding only; ``WeightInitialization`` gives every rank global rank 0's batch for it, so all ranks rescale alike.

Example:
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> records = initialize(net, "auto", seed=0)
    >>> [r.scheme for r in records]
    ['glorot_normal', 'he_normal', 'glorot_normal']
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard._text import text_table
from lightning_gradguard._validation import check_choice, check_number
from lightning_gradguard.distributed import any_dtensor, full_tensor, materialized
from lightning_gradguard.graph import LayerInfo, find_layers, is_transposed_linear, shared_parameters
from lightning_gradguard.pretrained import keep_reason, loaded_prefixes

#: Keras's constant: std of a standard normal truncated to [-2, 2]
TRUNCATED_NORMAL_STD = 0.87962566103423978
MODES = ("fan_in", "fan_out", "fan_avg")
DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")
NAMED_SCHEMES: dict[str, tuple[float, str, str]] = {
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    "glorot_normal": (1.0, "fan_avg", "truncated_normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
}
SCHEMES = ("auto", *NAMED_SCHEMES, "variance_scaling", "orthogonal", "lsuv", "zeros", "ones")
#: per-layer override values (lsuv and auto are whole-model choices)
LAYER_SCHEMES = tuple(s for s in SCHEMES if s not in ("auto", "lsuv"))
AUTO_DISTRIBUTIONS = ("normal", "uniform")
#: how fans are counted where conventions differ: ``data_flow`` (default) or ``keras`` (see :func:`compute_fans`)
FAN_CONVENTIONS = ("data_flow", "keras")
BIAS_POLICIES = ("zeros", "ones", "keep")

GLOROT_ACTIVATIONS = ("tanh", "sigmoid", "softmax", "log_softmax", "linear", "unknown")
HE_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "gelu", "silu", "hardswish", "mish")
LECUN_ACTIVATIONS = ("selu",)


# ------------------------------------------------------------------------------------------ fans
def compute_fans(
    module: nn.Module, weight: Optional[torch.Tensor] = None, blocks: int = 1, convention: str = "data_flow"
) -> tuple[int, int]:
    """(fan_in, fan_out) of ``weight`` as the layer's data flow sees it (``convention="data_flow"``).

    - Linear ``(out, in)``: (in, out). Conv ``(out, in/groups, *k)``: (in/groups·∏k, out·∏k), as Keras.
    - ConvTranspose ``(in, out/groups, *k)``: (in·∏k / groups, out/groups·∏k)... the input and output
      roles are swapped relative to the weight's dims, unlike ``torch.nn.init``'s fan helper, which
      reads dim 1 as the input for every weight.
    - Embedding ``(num, dim)``: (num, dim), the one-hot linear map, as Keras's ``(input_dim, output_dim)``.
    - RNN/LSTM/GRU ``weight_ih`` ``(gates·hidden, in)``: per gate block (in, hidden); ``weight_hh``:
      (hidden, hidden). Pass ``blocks`` = the number of gate blocks.

    ``convention="keras"`` counts fans as Keras 3 does from its kernel shapes, where the two differ:
    a ``Conv*Transpose`` kernel is ``(*k, filters, in)`` there, so fan_in = filters·∏k and fan_out =
    in·∏k (the data flow's roles swapped); a recurrent kernel is one ``(in, gates·units)`` matrix, so
    fan_out counts every gate (pass ``blocks=1``). Everything else is identical in both conventions.

    Example:
        >>> compute_fans(nn.Conv2d(3, 16, 5))
        (75, 400)
        >>> compute_fans(nn.ConvTranspose2d(3, 16, 5)), compute_fans(nn.ConvTranspose2d(3, 16, 5), convention="keras")
        ((75, 400), (400, 75))
    """
    check_choice("compute_fans", "convention", convention, FAN_CONVENTIONS)
    w = weight if weight is not None else module.weight
    if is_transposed_linear(module):
        return w.shape[0], w.shape[1]  # Hugging Face Conv1D: (in, out)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        rf = math.prod(w.shape[2:])
        data_flow = (w.shape[0] * rf // module.groups, w.shape[1] * rf)
        return data_flow[::-1] if convention == "keras" else data_flow
    if isinstance(module, nn.modules.conv._ConvNd):
        rf = math.prod(w.shape[2:])
        return w.shape[1] * rf, w.shape[0] * rf
    if isinstance(module, nn.Embedding):
        return w.shape[0], w.shape[1]
    if w.dim() < 2:
        return w.shape[0], w.shape[0]
    rows = w.shape[0] // blocks
    rf = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * rf, rows * rf


# ------------------------------------------------------------------------------------- samplers
def variance_scaling_(
    tensor: torch.Tensor,
    scale: float = 1.0,
    mode: str = "fan_in",
    distribution: str = "truncated_normal",
    fans: Optional[tuple[int, int]] = None,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Fill ``tensor`` in place like Keras's ``VarianceScaling``; return the target std.

    Variance = ``scale / n`` with n the chosen fan (at least 1). ``fans`` defaults to ``(dim1·rf, dim0·rf)``.

    Example:
        >>> w = torch.empty(256, 128)
        >>> variance_scaling_(w, scale=2.0, mode="fan_in", distribution="truncated_normal")  # He normal
        0.125
    """
    check_number("variance_scaling_", "scale", scale, min_value=0.0, min_inclusive=False)
    check_choice("variance_scaling_", "mode", mode, MODES)
    check_choice("variance_scaling_", "distribution", distribution, DISTRIBUTIONS)
    if fans is None:
        fans = compute_fans(nn.Linear(1, 1), tensor)
    fan_in, fan_out = fans
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[mode]
    std = math.sqrt(scale / max(1.0, n))
    with torch.no_grad():
        if distribution == "truncated_normal":
            raw = std / TRUNCATED_NORMAL_STD  # std before cutting at ±2 raw std
            nn.init.trunc_normal_(tensor, 0.0, raw, -2.0 * raw, 2.0 * raw, generator=generator)
        elif distribution == "untruncated_normal":
            nn.init.normal_(tensor, 0.0, std, generator=generator)
        else:
            limit = math.sqrt(3.0) * std  # U(-a, a) has variance a²/3
            nn.init.uniform_(tensor, -limit, limit, generator=generator)
    return std


def _fill(
    tensor: torch.Tensor, scheme: str, fans: tuple[int, int], generator: Optional[torch.Generator],
    scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal", gain: float = 1.0,
) -> tuple[float, int]:
    """Fill one weight block by scheme name; return (target std, the fan used)."""
    if scheme in NAMED_SCHEMES or scheme == "variance_scaling":
        s, m, d = NAMED_SCHEMES.get(scheme, (scale, mode, distribution))
        if scheme in ("he_uniform", "he_normal"):
            s = scale  # He's scale carries the activation's gain 2/(1+a²)
        n = {"fan_in": fans[0], "fan_out": fans[1], "fan_avg": (fans[0] + fans[1]) / 2.0}[m]
        return variance_scaling_(tensor, s, m, d, fans, generator), int(n)
    with torch.no_grad():
        if scheme == "orthogonal":
            nn.init.orthogonal_(tensor, gain=gain, generator=generator)
            big = max(tensor.shape[0], tensor[0].numel())
            return gain / math.sqrt(big), big
        if scheme == "zeros":
            tensor.zero_()
            return 0.0, 0
        if scheme == "ones":
            tensor.fill_(1.0)
            return 0.0, 0
    raise ValueError(f"unknown scheme {scheme!r}")


# ------------------------------------------------------------------------------------- records
@dataclass
class InitRecord:
    """One row of the init table."""

    layer: str
    kind: str
    shape: tuple[int, ...]
    activation: str
    scheme: str
    fan: int
    target_std: float
    achieved_std: float
    note: str = ""


def format_table(records: Sequence[InitRecord]) -> str:
    """The init table as aligned text (what the callback prints and logs)."""
    head = ("layer", "type", "shape", "activation", "scheme", "fan", "target std", "achieved std", "note")
    rows = [
        (r.layer, r.kind, "x".join(map(str, r.shape)), r.activation, r.scheme, str(r.fan) if r.fan else "-",
         f"{r.target_std:.4g}", f"{r.achieved_std:.4g}", r.note)
        for r in records
    ]
    return text_table(head, rows)


# ------------------------------------------------------------------------------------ the plan
def auto_scheme(activation: str, slope: float, distribution: str = "normal") -> tuple[str, float]:
    """(scheme, scale) for a layer followed by ``activation`` (see the module docstring)."""
    suffix = "normal" if distribution == "normal" else "uniform"
    if activation in HE_ACTIVATIONS:
        return f"he_{suffix}", 2.0 / (1.0 + slope**2)
    if activation in LECUN_ACTIVATIONS:
        return f"lecun_{suffix}", 1.0
    return f"glorot_{suffix}", 1.0


def _seed_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    if seed is None and os.environ.get("PL_GLOBAL_SEED"):
        seed = int(os.environ["PL_GLOBAL_SEED"])  # set by lightning's seed_everything
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def _matches(name: str, patterns: Sequence[str]) -> Optional[str]:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def initialize(
    model: nn.Module,
    scheme: str = "auto",
    *,
    distribution: str = "normal",
    fan_convention: str = "data_flow",
    scale: float = 1.0,
    mode: str = "fan_in",
    vs_distribution: str = "truncated_normal",
    gain: float = 1.0,
    bias: str = "zeros",
    overrides: Optional[Mapping[str, str]] = None,
    exclude: Sequence[str] = (),
    strict: bool = False,
    seed: Optional[int] = None,
    sample_input: Any = None,
    lsuv_tol: float = 0.1,
    lsuv_max_iters: int = 10,
    layers: Optional[list[LayerInfo]] = None,
    force: bool = False,
) -> list[InitRecord]:
    """Initialize every weighted layer of ``model`` in place; return one :class:`InitRecord` per layer.

    Args:
        scheme: ``auto``, a named scheme, ``variance_scaling`` (with ``scale``, ``mode``,
            ``vs_distribution``), ``orthogonal`` (with ``gain``), ``lsuv`` (needs ``sample_input``),
            ``zeros`` or ``ones``.
        distribution: for ``auto``: ``normal`` (Keras's truncated ``*_normal``) or ``uniform``.
        fan_convention: ``data_flow`` (default: ConvTranspose fans from its input/output channels, RNN
            input weights per gate block, recurrent weights orthogonal per gate block) or ``keras``
            (Keras 3's kernel-shape fans: ConvTranspose roles swapped, whole-kernel RNN fans, one
            orthogonal matrix for the whole recurrent kernel). See :func:`compute_fans`.
        bias: ``zeros``, ``ones`` or ``keep``.
        overrides: module-name pattern → scheme, e.g. ``{"encoder.*": "lecun_normal"}``; first match wins.
        exclude: module-name patterns left untouched.
        strict: raise if an override or exclude pattern matches no layer.
        seed: seeds a private generator (else Lightning's ``PL_GLOBAL_SEED`` if set, else torch's RNG).
        sample_input: a batch, for the activation-finding fallback and for ``lsuv``.
        force: also re-initialize weights that look loaded, trained or adapter-owned (see the module
            docstring); tied parameters are still initialized once, by their owner.

    Raises:
        ValueError: bad argument, or (``strict``) a pattern matching no layer.
    """
    owner = "initialize"
    check_choice(owner, "scheme", scheme, SCHEMES)
    check_choice(owner, "distribution", distribution, AUTO_DISTRIBUTIONS)
    check_choice(owner, "fan_convention", fan_convention, FAN_CONVENTIONS)
    check_choice(owner, "bias", bias, BIAS_POLICIES)
    overrides = dict(overrides or {})
    for pattern, value in overrides.items():
        check_choice(owner, f"overrides[{pattern!r}]", value, LAYER_SCHEMES)
    exclude = list(exclude)
    if scheme == "lsuv" and any_dtensor(list(model.parameters())):
        raise ValueError(
            "initialize: scheme='lsuv' needs the unsharded model (its forward passes stop inside layers): run it "
            "before fully_shard, e.g. build the layers in __init__ and shard them in configure_model"
        )
    if layers is None:
        layers = find_layers(model, sample_input)
    if strict:
        names = [info.name for info in layers]
        for pattern in [*overrides, *exclude]:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"{owner}: pattern {pattern!r} (overrides/exclude) matches no weighted layer; layers are: "
                    f"{', '.join(names)}"
                )
    first = next(iter(model.parameters()), None)
    generator = _seed_generator(seed, first.device if first is not None else torch.device("cpu"))
    records: list[InitRecord] = []
    tied = _tied_owners(model, layers)
    kept = {} if force else kept_layers(model, layers)
    for info in layers:
        if _matches(info.name, exclude):
            records.append(_record(info, "-", 0, 0.0, "excluded"))
            continue
        if info.name in kept:
            records.append(_record(info, "-", 0, 0.0, f"kept: {kept[info.name]} (force=True re-initializes)"))
            continue
        layer_scheme, layer_scale = scheme, scale
        hit = _matches(info.name, list(overrides))
        if hit:
            layer_scheme = overrides[hit]
        elif isinstance(info.module, nn.Embedding):
            records.append(_record(info, "-", 0, 0.0, "embedding kept (name it in overrides to init)"))
            continue
        if layer_scheme in ("auto", "lsuv"):
            layer_scheme, layer_scale = auto_scheme(info.activation, info.slope, distribution)
            if scheme == "lsuv":
                layer_scheme = "orthogonal"
        if layer_scheme in ("he_uniform", "he_normal"):
            layer_scale = 2.0 / (1.0 + info.slope**2)
        skip = {pid: owner for pid, owner in tied.items() if owner != info.name}
        records.append(
            _init_layer(
                info, layer_scheme, layer_scale, mode, vs_distribution, gain, bias, generator,
                auto=scheme == "auto", skip=skip, fan_convention=fan_convention,
            )
        )
    if scheme == "lsuv":
        if sample_input is None:
            raise ValueError("initialize: scheme='lsuv' needs sample_input (a training batch)")
        from lightning_gradguard.lsuv import lsuv_rescale_

        lsuv_rescale_(model, layers, records, sample_input, tol=lsuv_tol, max_iters=lsuv_max_iters)
    return records


def kept_layers(model: nn.Module, layers: Optional[Sequence[LayerInfo]] = None) -> dict[str, str]:
    """Layers whose weights ``initialize`` keeps unless ``force=True``: name → why (loaded by
    ``from_pretrained``, an adapter, or trained; see :mod:`lightning_gradguard.pretrained`).

    Example:
        >>> kept_layers(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
        {}
    """
    layers = find_layers(model) if layers is None else layers
    loaded = loaded_prefixes(model)
    out = {}
    for info in layers:
        if any(info.name == p or info.name.startswith(f"{p}.") or not p for p in loaded):
            out[info.name] = "loaded by from_pretrained"
            continue
        reason = _keep_reason(info)
        if reason is not None:
            out[info.name] = reason
    return out


def _tied_owners(model: nn.Module, layers: Sequence[LayerInfo]) -> dict[int, str]:
    """``id(parameter)`` → the layer that initializes a tied parameter: an embedding holding it, else the
    first holder in forward order."""
    order = {info.name: i for i, info in enumerate(layers)}
    kinds = {info.name: info.module for info in layers}
    owners = {}
    for pid, paths in shared_parameters(model).items():
        known = sorted((p for p in paths if p in order), key=order.__getitem__)
        if not known:
            continue
        embeddings = [p for p in known if isinstance(kinds[p], nn.Embedding)]
        owners[pid] = (embeddings or known)[0]
    return owners


def _keep_reason(info: LayerInfo) -> Optional[str]:
    for pname, p in info.module.named_parameters(recurse=False):
        if p.requires_grad and (p.dim() >= 2 or any(m in info.name.lower() for m in ("lora_", "ia3_", "adapter_"))):
            reason = keep_reason(p, f"{info.name}.{pname}")
            if reason is not None:
                return reason
    return None


def _record(info: LayerInfo, scheme: str, fan: int, target: float, note: str, shape: Any = None) -> InitRecord:
    w = getattr(info.module, "weight", None)
    if w is None:
        w = next(iter(info.module.parameters()), torch.empty(0))
    w = full_tensor(w.detach())  # FSDP2: the std of the whole weight (a collective, every rank runs the init)
    achieved = float(w.float().std()) if w.numel() > 1 else 0.0
    return InitRecord(info.name, info.kind, tuple(shape or w.shape), info.activation, scheme, fan, target, achieved, note)


def _init_layer(
    info: LayerInfo, scheme: str, scale: float, mode: str, vs_distribution: str, gain: float, bias: str,
    generator: Optional[torch.Generator], auto: bool, skip: Optional[Mapping[int, str]] = None,
    fan_convention: str = "data_flow",
) -> InitRecord:
    m = info.module
    opts = dict(scale=scale, mode=mode, distribution=vs_distribution, gain=gain)
    target, fan, note = 0.0, 0, ""
    frozen = [n for n, p in m.named_parameters(recurse=False) if not p.requires_grad]
    skip = skip or {}
    tied = [f"{n} tied to {skip[id(p)]}" for n, p in m.named_parameters(recurse=False) if id(p) in skip]
    for pname, p in m.named_parameters(recurse=False):
        if not p.requires_grad or id(p) in skip:
            continue
        if pname.startswith("bias") or pname in ("in_proj_bias",):
            if bias != "keep":
                with materialized(p.data) as full:
                    _fill(full, bias, (1, 1), generator)
            continue
        blocks, block_scheme = 1, scheme
        if isinstance(m, nn.RNNBase):
            blocks = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
            if pname.startswith("weight_hh") and auto:
                block_scheme = "orthogonal"  # Keras's recurrent_initializer
            if pname.startswith("weight_hr") or fan_convention == "keras":
                blocks = 1  # Keras: one (in, gates·units) kernel, one orthogonal recurrent matrix
        elif isinstance(m, nn.MultiheadAttention) and pname == "in_proj_weight":
            blocks = 3
        fans = compute_fans(m, p, blocks, fan_convention)  # a DTensor's shape is the global one
        rows = p.shape[0] // blocks
        with materialized(p.data) as full:  # FSDP2 shard: fill the full tensor, keep this rank's part
            for b in range(blocks):
                t, n = _fill(full[b * rows : (b + 1) * rows], block_scheme, fans, generator, **opts)
                if pname in ("weight", "weight_ih_l0", "in_proj_weight"):
                    target, fan = t, n
    if frozen:
        note = f"frozen kept: {', '.join(frozen)}"
    if tied:
        note = "; ".join([*([note] if note else []), f"{', '.join(tied)} (initialized there)"])
        if not target:
            scheme = "-"
    if isinstance(m, nn.RNNBase) and auto:
        scheme = f"{scheme} (+orthogonal recurrent)"
    return _record(info, scheme, fan, target, note)  # an RNN's first parameter, its row, is weight_ih_l0


__all__ = [
    "initialize", "kept_layers", "variance_scaling_", "compute_fans", "auto_scheme", "format_table", "InitRecord",
    "SCHEMES", "NAMED_SCHEMES", "TRUNCATED_NORMAL_STD", "FAN_CONVENTIONS",
]
