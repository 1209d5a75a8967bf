"""Per-layer gradient, weight and activation statistics, batched, torch only.

Everything here returns device tensors: one ``(layers, statistics)`` matrix per call, built from
``torch._foreach_norm`` and stacked per-parameter reductions, aggregated per layer with ``index_add_``.
The caller moves everything to the host in one transfer (:func:`to_host`).

Example:
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> net(torch.randn(4, 8)).sum().backward()
    >>> groups = layer_groups(net)
    >>> grad_statistics(groups).shape             # (layers, len(GRAD_STATS))
    torch.Size([2, 6])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard import distributed
from lightning_gradguard.activations import ACTIVATION_FUNCTIONS, RELU_FAMILY, SATURATING_BOUNDS
from lightning_gradguard.graph import LayerInfo, find_layers, is_weighted, shared_parameters

GRAD_STATS = ("grad_norm", "grad_mean", "grad_std", "grad_max", "grad_zero_frac", "grad_nonfinite")
ACT_STATS = ("act_mean", "act_std", "act_dead_frac", "act_saturated_frac")


@dataclass
class LayerGroup:
    """The parameters of one layer (the module that owns them), in forward order.

    ``description`` reads like ``Linear 64→64``; ``activation`` is the one that follows (weighted layers).
    """

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    description: str
    activation: Optional[str] = None
    activation_at: Optional[str] = None
    frozen: bool = False
    info: Optional[LayerInfo] = field(default=None, repr=False)
    #: other modules holding this group's tied parameter(s) (GPT-2's ``lm_head`` for ``wte``)
    shared_with: list[str] = field(default_factory=list)

    def label(self) -> str:
        after = f", after {self.activation}" if self.activation and self.activation not in ("linear", "unknown") else ""
        tied = f", tied with {', '.join(self.shared_with)}" if self.shared_with else ""
        return f"layer `{self.name}` ({self.description}{after}{tied})"


def layer_groups(model: nn.Module, per_parameter: bool = False, sample_input: Any = None) -> list[LayerGroup]:
    """One group per module that owns parameters directly (or per parameter), in forward order.

    Weighted layers come in the order :func:`~lightning_gradguard.graph.find_layers` finds (forward order);
    other parameter owners (normalization layers, ...) are placed right after the weighted layer registered
    before them. Frozen parameters (``requires_grad=False``) are left out; a fully frozen layer is kept with
    ``frozen=True`` so reports can show it. A tied parameter (GPT-2's ``wte``/``lm_head``) is in one group
    only, so totals count it once: its embedding's if an embedding holds it, else its first holder's in
    forward order; ``shared_with`` lists the other holders, and a holder left without parameters has no row.
    """
    layers = {info.name: info for info in find_layers(model, sample_input)}
    order = {name: i for i, name in enumerate(layers)}
    tied_owner: dict[int, str] = {}
    tied_holders: dict[int, list[str]] = {}
    for pid, paths in shared_parameters(model).items():
        ranked = sorted(paths, key=lambda p: order.get(p, len(order)))
        embeddings = [p for p in ranked if isinstance(model.get_submodule(p) if p else model, nn.Embedding)]
        tied_owner[pid] = (embeddings or ranked)[0]
        tied_holders[pid] = paths
    owners: list[tuple[float, str, nn.Module]] = []
    last_rank = -1.0
    for name, module in model.named_modules():
        direct = list(module.parameters(recurse=False))
        if not direct:
            continue
        if name in order:
            last_rank = float(order[name])
            owners.append((last_rank, name, module))
        else:
            last_rank += 1e-3
            owners.append((last_rank, name, module))
    owners.sort(key=lambda t: t[0])
    groups: list[LayerGroup] = []
    for _, name, module in owners:
        info = layers.get(name)
        desc = info.describe() if info else type(module).__name__
        named = [(n, p) for n, p in module.named_parameters(recurse=False)]
        named_here = [(n, p) for n, p in named if tied_owner.get(id(p), name) == name]
        if named and not named_here:
            continue  # every parameter is tied to, and reported with, another module
        trainable = [(n, p) for n, p in named_here if p.requires_grad]
        act = info.activation if info else None
        where = info.activation_at if info else None
        shared = sorted({h for _, p in named_here for h in tied_holders.get(id(p), []) if h != name})
        if not trainable:
            groups.append(LayerGroup(name or "(root)", module, [], desc, act, where, True, info, shared))
        elif per_parameter:
            for pname, p in trainable:
                full = f"{name}.{pname}" if name else pname
                others = [h for h in tied_holders.get(id(p), []) if h != name]
                groups.append(LayerGroup(full, module, [p], desc, act, where, False, info, others))
        else:
            groups.append(LayerGroup(name or "(root)", module, [p for _, p in trainable], desc, act, where, False, info, shared))
    return groups


def _flat(groups: Sequence[LayerGroup]) -> tuple[list[torch.Tensor], list[int]]:
    params, index = [], []
    for gi, g in enumerate(groups):
        for p in g.params:
            params.append(p)
            index.append(gi)
    return params, index


def grad_statistics(groups: Sequence[LayerGroup]) -> torch.Tensor:
    """``(len(groups), len(GRAD_STATS))`` float32 tensor on the gradients' device.

    Columns: L2 norm, mean, std (population), max |g|, fraction of exact zeros, count of non-finite values.
    A layer without gradients this step reads 0 everywhere. Norms, means and spreads are computed over the
    finite values' sums, so a NaN shows up as NaN in the norm and in the non-finite count.
    FSDP2 ``DTensor`` gradients: statistics of the full gradients (one collective; see :func:`grad_moments`).
    """
    sums, maxes = grad_moments(groups)
    params, _ = _flat(groups)
    sums, maxes = distributed.reduce_sum_max(sums, maxes, enabled=distributed.any_dtensor(params))
    return grad_statistics_from(sums, maxes)


def grad_moments(groups: Sequence[LayerGroup], sharded: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive parts of :func:`grad_statistics` from this rank's gradients (local ``DTensor`` shards):
    ``sums`` ``(len(groups), 5)`` (sum of squares, sum, zeros, non-finite, count) and ``maxes``
    ``(len(groups),)`` (max |g|). Ranks combine them with
    :func:`~lightning_gradguard.distributed.reduce_sum_max`; replicas count once
    (:func:`~lightning_gradguard.distributed.count_weights`) when ``sharded`` (default: any gradient is a
    ``DTensor``; pass the caller's decision to reduce). Finish with :func:`grad_statistics_from`."""
    params, index = _flat(groups)
    have = [(p.grad, i) for p, i in zip(params, index) if p.grad is not None]
    if not have:
        return torch.zeros(len(groups), 5), torch.zeros(len(groups))
    full = [g for g, _ in have]
    grads = distributed.local_tensors(full)
    dev = grads[0].device
    idx = torch.tensor([i for _, i in have], device=dev)
    sq = torch.stack(torch._foreach_norm(grads, 2)).float() ** 2
    mx = torch.stack(torch._foreach_norm(grads, float("inf"))).float()
    sums = torch.stack([g.sum(dtype=torch.float32) for g in grads])
    numel = torch.tensor([float(g.numel()) for g in grads], device=dev)
    zeros = numel - torch.stack([torch.count_nonzero(g) for g in grads]).float()
    nonfinite = numel - torch.stack([torch.isfinite(g).sum() for g in grads]).float()
    per = torch.stack([sq, sums, zeros, nonfinite, numel], dim=1)
    if distributed.any_dtensor(full) if sharded is None else sharded:
        per = per * distributed.count_weights(full, dev)[:, None]
    agg = torch.zeros(len(groups), per.shape[1], device=dev).index_add_(0, idx, per)
    gmax = torch.zeros(len(groups), device=dev).scatter_reduce_(0, idx, mx, reduce="amax", include_self=True)
    return agg, gmax


def grad_statistics_from(sums: torch.Tensor, maxes: torch.Tensor) -> torch.Tensor:
    """:func:`grad_statistics` from (possibly rank-reduced) :func:`grad_moments`."""
    n = sums[:, 4].clamp(min=1.0)
    mean = sums[:, 1] / n
    var = (sums[:, 0] / n - mean**2).clamp(min=0.0)
    return torch.stack([sums[:, 0].sqrt(), mean, var.sqrt(), maxes, sums[:, 2] / n, sums[:, 3]], dim=1)


def _group_sq(
    groups: Sequence[LayerGroup], tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor], sharded: Optional[bool] = None
) -> torch.Tensor:
    """Per-group sum of squares of ``tensors`` (local parts), weighted so replicas of ``like`` count once."""
    _, index = _flat(groups)
    dev = tensors[0].device
    sq = torch.stack(torch._foreach_norm(list(tensors), 2)).float() ** 2
    if distributed.any_dtensor(like) if sharded is None else sharded:
        sq = sq * distributed.count_weights(like, dev)
    return torch.zeros(len(groups), device=dev).index_add_(0, torch.tensor(index, device=dev), sq)


def weight_sq(groups: Sequence[LayerGroup], sharded: Optional[bool] = None) -> torch.Tensor:
    """This rank's part of each group's squared weight norm, ``(len(groups),)`` (sum over ranks, then sqrt)."""
    params, _ = _flat(groups)
    if not params:
        return torch.zeros(len(groups))
    return _group_sq(groups, [distributed.local(p.detach()) for p in params], params, sharded)


def weight_norms(groups: Sequence[LayerGroup]) -> torch.Tensor:
    """L2 norm of each group's parameters together, ``(len(groups),)`` (full tensors under FSDP2)."""
    params, _ = _flat(groups)
    sq, _ = distributed.reduce_sum_max(weight_sq(groups), enabled=distributed.any_dtensor(params))
    return sq.sqrt()


def snapshot(groups: Sequence[LayerGroup]) -> list[torch.Tensor]:
    """A copy of every parameter (its local shard under FSDP2) before an optimizer step, for :func:`update_ratios`."""
    params, _ = _flat(groups)
    return [distributed.local(p.detach()).clone() for p in params]


def update_sq(groups: Sequence[LayerGroup], before: list[torch.Tensor], sharded: Optional[bool] = None) -> torch.Tensor:
    """This rank's parts of ‖Δw‖² and ‖w_before‖² per group, ``(2, len(groups))`` (sum over ranks)."""
    params, _ = _flat(groups)
    if not params:
        return torch.zeros(2, len(groups))
    diff = torch._foreach_sub([distributed.local(p.detach()) for p in params], before)
    return torch.stack([_group_sq(groups, diff, params, sharded), _group_sq(groups, before, params, sharded)])


def update_ratios_from(sq: torch.Tensor) -> torch.Tensor:
    """‖Δw‖/‖w‖ from (rank-reduced) :func:`update_sq` (0 where the weights are 0)."""
    d, w = sq[0].sqrt(), sq[1].sqrt()
    return torch.where(w > 0, d / w.clamp(min=1e-30), torch.zeros_like(d))


def update_ratios(groups: Sequence[LayerGroup], before: list[torch.Tensor]) -> torch.Tensor:
    """‖w_after − w_before‖ / ‖w_before‖ per group (0 where the weights are 0), ``(len(groups),)``."""
    params, _ = _flat(groups)
    sq, _ = distributed.reduce_sum_max(update_sq(groups, before), enabled=distributed.any_dtensor(params))
    return update_ratios_from(sq)


def activation_statistics(out: torch.Tensor, activation: Optional[str], unit_dim: int, eps: float = 0.01) -> torch.Tensor:
    """``(len(ACT_STATS),)`` for one activation output: mean, std, fraction of dead units (ReLU family:
    a unit whose output is 0 for every sample and position of the batch), fraction of saturated values
    (sigmoid/tanh: within ``eps`` of a bound)."""
    x = out.detach().float()
    std, mean = torch.std_mean(x) if x.numel() > 1 else (torch.zeros((), device=x.device), x.mean())
    dead = torch.zeros((), device=x.device)
    if activation in RELU_FAMILY and x.dim() >= 2:
        per_unit = x.transpose(unit_dim, -1).reshape(-1, x.shape[unit_dim])  # (everything else, units)
        dead = (per_unit == 0).all(dim=0).float().mean()
    sat = torch.zeros((), device=x.device)
    if activation in SATURATING_BOUNDS:
        lo, hi = SATURATING_BOUNDS[activation]
        sat = ((x <= lo + eps) | (x >= hi - eps)).float().mean()
    return torch.stack([mean, std, dead, sat])


def activation_statistics_batch(
    outs: Sequence[torch.Tensor], activation: Optional[str], unit_dim: int, eps: float = 0.01
) -> torch.Tensor:
    """:func:`activation_statistics` for several same-shaped outputs at once: ``(len(outs), len(ACT_STATS))``.

    One stack and a handful of reductions instead of a few kernels per layer (a deep stack of equal-width
    layers logs all its layers in one go).
    """
    x = torch.stack([o.detach().float() for o in outs])  # (L, *shape)
    flat = x.reshape(len(outs), -1)
    if flat.shape[1] > 1:
        std, mean = torch.std_mean(flat, dim=1)
    else:
        std, mean = torch.zeros(len(outs), device=x.device), flat.mean(dim=1)
    dead = torch.zeros(len(outs), device=x.device)
    if activation in RELU_FAMILY and x.dim() >= 3:
        units = x.movedim(unit_dim if unit_dim < 0 else unit_dim + 1, -1)
        dead = (units.reshape(len(outs), -1, units.shape[-1]) == 0).all(dim=1).float().mean(dim=1)
    sat = torch.zeros(len(outs), device=x.device)
    if activation in SATURATING_BOUNDS:
        lo, hi = SATURATING_BOUNDS[activation]
        sat = ((flat <= lo + eps) | (flat >= hi - eps)).float().mean(dim=1)
    return torch.stack([mean, std, dead, sat], dim=1)


def histogram(x: torch.Tensor, bins: int = 30) -> torch.Tensor:
    """Fixed-bin histogram on the device: ``[min, max, n, sum, sum_sq, counts...]`` (bins + 5 values)."""
    v = x.detach().float().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return torch.zeros(bins + 5, device=x.device)
    lo, hi = v.min(), v.max()
    counts = _histc(v, lo, hi, bins)  # histc needs host-side bounds; this does not
    head = torch.stack([lo, hi, torch.tensor(float(v.numel()), device=v.device), v.sum(), (v * v).sum()])
    return torch.cat([head, counts])


def _histc(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    width = (hi - lo).clamp(min=1e-12)
    idx = ((v - lo) / width * bins).long().clamp(0, bins - 1)
    return torch.zeros(bins, device=v.device).index_add_(0, idx, torch.ones_like(v))


def to_host(*tensors: torch.Tensor) -> list[list[float]]:
    """Move several tensors to the host in one transfer; return each flattened as a Python list."""
    flat = [t.detach().float().flatten() for t in tensors]
    if not flat:
        return []
    dev = flat[0].device
    joined = torch.cat([t.to(dev) for t in flat]).cpu().tolist()
    out, k = [], 0
    for t in flat:
        out.append(joined[k : k + t.numel()])
        k += t.numel()
    return out


def activation_hook_target(
    group: LayerGroup, modules: dict[str, nn.Module], shared: Sequence[str] = ()
) -> tuple[nn.Module, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
    """Where to observe a layer's activation: (module to hook, function to apply to its output).

    The activation module itself when there is one and no other layer uses it; else the layer, with the
    activation applied to its output (functional activations such as ``F.relu`` in ``forward``, and one
    activation module called after several layers, listed in ``shared``: see :func:`shared_activations`).
    """
    at = modules.get(group.activation_at) if group.activation_at else None
    if at is not None and group.activation_at not in shared:
        return at, None
    return group.module, ACTIVATION_FUNCTIONS.get(group.activation or "")


def shared_activations(groups: Sequence[LayerGroup]) -> set[str]:
    """Activation module paths that follow more than one layer (one ``nn.ReLU`` reused in a loop)."""
    seen: dict[str, set[str]] = {}
    for g in groups:
        if g.info is not None and g.activation_at:
            seen.setdefault(g.activation_at, set()).add(g.info.name)
    return {path for path, layers in seen.items() if len(layers) > 1}


def unit_dim_for(module: nn.Module) -> int:
    """Which output dim holds the units: channels (dim 1) for convolutions, else the last dim."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


__all__ = [
    "LayerGroup", "layer_groups", "grad_statistics", "grad_moments", "grad_statistics_from", "weight_sq", "weight_norms",
    "snapshot", "update_sq", "update_ratios", "update_ratios_from",
    "activation_statistics", "activation_statistics_batch", "shared_activations", "histogram", "to_host", "GRAD_STATS", "ACT_STATS", "is_weighted",
]
