"""Sharded (FSDP2 ``DTensor``) and multi-process helpers, torch only: the one place that knows about them.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every parameter
and gradient is a ``DTensor``: each rank holds a shard (``Shard(0)``: a block of rows). Statistics of the
full tensors are sums (of squares, of values, of counts) and maxima over the shards, so each rank reduces its
*local* shards and the ranks combine their partial results in **one collective** (:func:`reduce_sum_max`).

Exactness: an element is counted once in a world-wide sum. A rank counts its local shard when it is the
first replica of that shard (mesh coordinate 0 on every mesh dim the tensor is not sharded over); a plain
tensor (replicated, as under DDP) is counted by global rank 0 only (:func:`count_weights`). A tensor whose
mesh spans only part of the world is scaled by ``mesh size / world size`` (exact for powers of two).

Example:
    >>> model = torch.nn.Linear(3, 2)
    >>> model(torch.ones(4, 3)).sum().backward()
    >>> grads = [p.grad for p in model.parameters()]          # DTensor shards or plain tensors
    >>> total = global_norm(grads)                            # the norm of the full gradients, all ranks
    >>> broadcast_object({"clip": True})                      # rank 0's object on every rank
    {'clip': True}
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

#: strategies whose gradients are not reachable as full or ``DTensor``-sharded ``p.grad`` in
#: ``on_before_optimizer_step``: class name -> why and what to use instead
UNSUPPORTED_STRATEGIES: dict[str, str] = {
    "DeepSpeedStrategy": "DeepSpeed keeps gradients in its own partitioned buffers (p.grad is None under ZeRO)",
    "FSDPStrategy": "FSDP1 flattens parameters into per-rank FlatParameter shards that are not DTensors, so "
                    "per-layer and global statistics would cover only this rank's shard",
    "XLAFSDPStrategy": "XLA's FSDP flattens and shards parameters outside DTensor",
}


def check_strategy(strategy: Any, owner: str) -> None:
    """Raise ``RuntimeError`` naming the strategy when gradguard cannot act exactly under it.

    Decided from the class names of ``strategy``'s type and its bases (no DeepSpeed import needed).

    Example:
        >>> class DeepSpeedStrategy: ...
        >>> check_strategy(DeepSpeedStrategy(), "GradientClipping")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: GradientClipping...DeepSpeedStrategy...
    """
    for cls in type(strategy).__mro__:
        reason = UNSUPPORTED_STRATEGIES.get(cls.__name__)
        if reason is not None:
            raise RuntimeError(
                f"{owner} does not support strategy {type(strategy).__name__}: {reason}. Supported: single "
                "device, DDP (ddp, ddp_spawn, ...) and FSDP2 through ModelParallelStrategy "
                "(fully_shard in configure_model)."
            )


# ------------------------------------------------------------------------------------ shards
try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None


def is_dtensor(t: Any) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor``."""
    return _DTensor is not None and isinstance(t, _DTensor)


def any_dtensor(tensors: Sequence[Any]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (then global statistics need a collective)."""
    return any(is_dtensor(t) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view: in-place changes reach the parameter), else ``t``.

    A ``Partial`` placement (values still to be summed across ranks) is reduced first (a collective).
    """
    if not is_dtensor(t):
        return t
    if any(p.is_partial() for p in t.placements):
        from torch.distributed.tensor import Replicate

        t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
    return t.to_local()


def local_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`local` of each tensor."""
    return [local(t) for t in tensors]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def count_weight(t: torch.Tensor) -> float:
    """1.0 if this rank's copy of ``t`` counts in a world-wide sum, else 0.0 (see the module docstring)."""
    rank, world = _world()
    if not is_dtensor(t):
        return 1.0 if rank == 0 else 0.0
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        return 0.0
    first = all(c == 0 for c, p in zip(coord, t.placements) if not p.is_shard())
    return (mesh.size() / world) if first else 0.0


_WEIGHTS_CACHE: dict[tuple, torch.Tensor] = {}


def count_weights(tensors: Sequence[torch.Tensor], device: Optional[torch.device] = None) -> torch.Tensor:
    """:func:`count_weight` of each tensor as a float32 tensor (on ``device``).

    The weights are decided on the host (mesh coordinates and placements, no tensor values); the device
    tensor is made once per distinct weight vector and device and reused, so a step does not copy a Python
    list to the device (a host-to-device transfer on a GPU)."""
    weights = tuple(count_weight(t) for t in tensors)
    key = (weights, str(device))
    cached = _WEIGHTS_CACHE.get(key)
    if cached is None:
        if len(_WEIGHTS_CACHE) > 64:
            _WEIGHTS_CACHE.clear()
        cached = _WEIGHTS_CACHE[key] = torch.tensor(weights, dtype=torch.float32, device=device)
    return cached


def reduce_sum_max(
    sums: torch.Tensor, maxes: Optional[torch.Tensor] = None, enabled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``sums`` and take the maximum of ``maxes`` across all ranks in **one** collective.

    Both are packed into one float32 vector, gathered from every rank (``all_gather_into_tensor``) and
    reduced here (NaN propagates). Without an initialized process group, or with ``enabled=False``,
    the inputs come back unchanged. Every rank must call it (it is a collective).

    Example:
        >>> g = torch.tensor([3.0, -4.0])
        >>> sums, maxes = reduce_sum_max(torch.stack([g.square().sum(), torch.tensor(2.0)]), g.abs().max().view(1))
        >>> sums.tolist(), maxes.tolist()                       # one process: unchanged
        ([25.0, 2.0], [4.0])
    """
    if maxes is None:
        maxes = torch.zeros(0, device=sums.device)
    _, world = _world()
    if not enabled or world == 1:
        return sums, maxes
    flat = torch.cat([sums.detach().float().flatten(), maxes.detach().float().flatten().to(sums.device)])
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(out, flat.contiguous())
    table = out.view(world, -1)
    n = sums.numel()
    summed = table[:, :n].sum(dim=0).view(sums.shape)
    maxed = table[:, n:].max(dim=0).values.view(maxes.shape) if maxes.numel() else maxes
    return summed, maxed


def global_norm(
    tensors: Sequence[torch.Tensor], norm_type: Union[float, str] = 2.0, reduce: Optional[bool] = None
) -> torch.Tensor:
    """The ``norm_type``-norm (2 or inf) of all ``tensors`` together, as if each were unsharded.

    Local per-tensor norms in one batched ``torch._foreach_norm``; when any tensor is a ``DTensor``
    (or ``reduce=True``) one collective combines the ranks' partial squared sums (and maxima).
    Returns a 0-dim float32 tensor on the tensors' device (0 for no tensors).
    """
    p = float("inf") if norm_type in ("inf", float("inf")) else float(norm_type)
    if p not in (2.0, float("inf")):
        raise ValueError(f"global_norm: norm_type={norm_type!r} is not one of: 2, inf")
    sharded = any_dtensor(tensors) if reduce is None else reduce
    if not tensors:
        return torch.tensor(0.0)
    parts = local_tensors(tensors)
    dev = parts[0].device
    norms = torch.stack([n.to(dev, torch.float32) for n in torch._foreach_norm(parts, p)])
    if not sharded:
        return norms.max() if p == float("inf") else torch.linalg.vector_norm(norms, p)
    if p == float("inf"):
        _, m = reduce_sum_max(torch.zeros(0, device=dev), norms.max().reshape(1))
        return m[0]
    sq = (norms * norms * count_weights(tensors, dev)).sum().reshape(1)
    s, _ = reduce_sum_max(sq)
    return s[0].sqrt()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (``DTensor.full_tensor()``, a collective), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def write_local_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full-size ``full`` into ``target`` (a ``DTensor`` or a plain tensor).

    No communication: every rank holds the same ``full`` and slices out its own shard.
    """
    if not is_dtensor(target):
        target.copy_(full)
        return
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(full.detach(), target.device_mesh, target.placements, src_data_rank=None)
    target.to_local().copy_(mine.to_local())


@contextlib.contextmanager
def materialized(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield a full-size plain tensor standing for ``param``; on exit this rank's shard is written back.

    For a plain tensor it yields ``param`` itself. Used by the weight init: filling the full tensor with
    the same generator on every rank gives exactly the unsharded model's values, whatever the sharding.

    Example:
        >>> layer, g = torch.nn.Linear(4, 2), torch.Generator().manual_seed(0)
        >>> with materialized(layer.weight) as w:                # a plain tensor: the weight itself
        ...     _ = torch.nn.init.normal_(w, generator=g)
    """
    if not is_dtensor(param):
        yield param
        return
    with torch.no_grad():
        full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        yield full
        write_local_(param, full)


# --------------------------------------------------------------------------------- decisions
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; a collective), ``obj`` itself in one process.

    For decisions taken once (on rank 0) that every rank must apply identically, e.g. GradGuard's remedies.

    Example:
        >>> rank = 0                                  # torch.distributed.get_rank() under several processes
        >>> broadcast_object(["init", "clipping"] if rank == 0 else None)
        ['init', 'clipping']
    """
    _, world = _world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_multi_process() -> bool:
    """A process group with more than one rank is initialized."""
    return _world()[1] > 1


__all__ = [
    "UNSUPPORTED_STRATEGIES", "check_strategy", "is_dtensor", "any_dtensor", "local", "local_tensors", "count_weight",
    "count_weights", "reduce_sum_max", "global_norm", "full_tensor", "write_local_", "materialized",
    "broadcast_object", "is_multi_process",
]
