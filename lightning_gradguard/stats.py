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
from lightning_gradguard.host_transfer import to_device

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


#: a gradient whose size has no power-of-two factor this large (a size like 10 or 200) is cut into rows of BLOCK
#: elements, its last row zero-padded
BLOCK = 128
#: the packed buffer and the update-ratio copies hold at least this many elements (16 KiB in float32)
MIN_CHUNK = 1 << 12
#: rows of large gradients are a 16th of a chunk wide (so that a chunk packs rows with little waste), at least
#: ROW_MIN and at most ROW_MAX elements: few rows, so few per-row results, for large models
ROW_MIN = 1 << 10
ROW_MAX = 1 << 16


class GradStatsPlan:
    """Per-layer gradient moments in a number of kernels that does not grow with the number of layers.

    Built once (``GradientMonitor`` builds it at fit start; the buffers are made on the first call, when the
    gradients' devices and dtypes are known, and again only if they change). Per (device, dtype), every
    gradient is cut into rows (of the largest power of two dividing its size, at most a 16th of a chunk, or
    ``ROW_MIN`` if more, and ``ROW_MAX``; of ``BLOCK`` with a zero-padded last row when that power is smaller), rows of one width are copied, a chunk at a time, by
    **one** ``torch._foreach_copy_`` into a persistent buffer of at most ``max(memory_fraction × all gradient
    elements, MIN_CHUNK)`` elements (a gradient larger than that spans several chunks), and each chunk is
    reduced row-wise in 6 kernels, written into per-row results with ``out=``: sum of squares
    (``vector_norm``), sum, then, the copy being scratch, ``abs_`` → ``amax`` (max |g|) and ``sign_`` → ``sum``
    (count of non-zeros: a pass each, in place of ``amax``, ``amin`` and ``count_nonzero``, the last one slow
    on a CPU). Chunks: about ``1/memory_fraction`` plus one per row width (a few), whatever the number of layers.
    Then one ``index_add_`` and one ``scatter_reduce_`` from rows to tensors and from tensors to layers, with
    indices built once.

    Non-finite values: a gradient whose sum of squares is finite holds none (an Inf or NaN makes it Inf/NaN).
    On the CPU, where reading a flag waits for nothing, one flag says whether any is not; only then are those
    gradients' non-finite values (and NaNs, which ``sign`` maps to 0 where ``count_nonzero`` counts them)
    counted exactly. On an accelerator both counts are always taken on the device (two more kernels per
    chunk, no host read). Nothing here reads a value on the host on an accelerator.

    Extra memory: the packed buffer (``≤ memory_fraction`` of the gradients' bytes, at least
    ``MIN_CHUNK`` elements) plus 7 values per row (rows of large gradients are ``ROW_MIN`` to ``ROW_MAX`` wide)
    and a few per tensor and per layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> net(torch.randn(4, 8)).sum().backward()
        >>> plan = GradStatsPlan(layer_groups(net))
        >>> sums, maxes = plan.moments()          # (layers, 5) and (layers,): finish with grad_statistics_from
        >>> grad_statistics_from(sums, maxes).shape
        torch.Size([2, 6])
    """

    def __init__(self, groups: Sequence[LayerGroup], memory_fraction: float = 0.1, sharded: Optional[bool] = None) -> None:
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"GradStatsPlan: memory_fraction={memory_fraction!r} must be in (0, 1]")
        self.groups = list(groups)
        self.params, self._group_index = _flat(self.groups)
        self.memory_fraction = float(memory_fraction)
        self.sharded = distributed.any_dtensor(self.params) if sharded is None else bool(sharded)
        self._signature: Optional[tuple] = None
        self._buckets: list[_Bucket] = []
        self._device: Optional[torch.device] = None
        self._to_group: Optional[torch.Tensor] = None
        self._numel: Optional[torch.Tensor] = None
        self._weights: Optional[torch.Tensor] = None
        #: this rank's per-tensor sums of squares of the last :meth:`moments` call (unweighted, ``(tensors,)``)
        self.tensor_sq: Optional[torch.Tensor] = None

    def _build(self, grads: list[Optional[torch.Tensor]], signature: tuple) -> None:
        present = [g for g in grads if g is not None]
        self._device = present[0].device
        total = sum(g.numel() for g in present)
        budget = max(MIN_CHUNK, int(self.memory_fraction * total))
        chunk = max(MIN_CHUNK, int(self.memory_fraction * total) // BLOCK * BLOCK)  # whole rows, within the budget
        by_kind: dict[tuple, list[int]] = {}
        for t, g in enumerate(grads):
            if g is not None:
                by_kind.setdefault((g.device, g.dtype), []).append(t)
        self._buckets = [_Bucket(dev, dtype, members, grads, chunk, self._device, budget)
                         for (dev, dtype), members in by_kind.items()]
        dev = self._device
        self._to_group = to_device(self._group_index, dev, torch.long)
        self._numel = to_device([0.0 if g is None else float(g.numel()) for g in grads], dev)
        self._weights = distributed.count_weights(self.params, dev) if self.sharded else None
        self._signature = signature

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's additive moments per layer (see :func:`grad_moments`): ``sums`` ``(layers, 5)`` (sum of
        squares, sum, zeros, non-finite, count) and ``maxes`` ``(layers,)`` (max |g|); replicas weighted so
        they count once when the plan is ``sharded``. Also sets :attr:`tensor_sq`."""
        with torch.no_grad():  # no per-gradient ``detach``: nothing here is recorded
            return self._moments()

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sharded:
            grads = [None if p.grad is None else distributed.local(p.grad.detach()) for p in self.params]
        else:
            grads = [p.grad for p in self.params]
        n_groups = len(self.groups)
        # a gradient has its parameter's shape, dtype and device (autograd and the ``.grad`` setter enforce it):
        # which gradients exist and their dtypes (a model cast to another precision) and device are what usually
        # change; a parameter given another size in place makes a copy below fail, and the plan is built again
        signature = tuple(None if g is None else g.dtype for g in grads)
        first = next((g for g in grads if g is not None), None)
        if first is None:
            self.tensor_sq = None
            return torch.zeros(n_groups, 5), torch.zeros(n_groups)
        if signature != self._signature or first.device != self._device:
            self._build(grads, signature)
        dev = self._device
        assert dev is not None and self._to_group is not None and self._numel is not None
        per = torch.zeros(len(grads), 4, device=dev)  # sum sq, sum, non-zeros, non-finite
        amax = torch.zeros(len(grads), device=dev)
        try:
            for bucket in self._buckets:
                bucket.reduce_into(grads, per, amax)
        except RuntimeError:
            # a gradient of another size under the same parameter (the model changed in place): the copies into
            # the buffer no longer fit. Build again for these gradients and start over (an error of any other
            # cause comes back from the second try)
            self._build(grads, signature)
            per.zero_()
            amax.zero_()
            for bucket in self._buckets:
                bucket.reduce_into(grads, per, amax)
        sq = per[:, 0]
        if not all(b.count_on_device for b in self._buckets) and not bool(torch.isfinite(sq).all()):
            # a sum of squares is Inf/NaN only where a value is (or a square overflows): count those exactly;
            # reading the flag waits for no device on the CPU (elsewhere the buckets counted on the device)
            for t in torch.nonzero(~torch.isfinite(sq)).flatten().tolist():
                g = grads[t]
                assert g is not None
                per[t, 3] = (~torch.isfinite(g)).sum()
                per[t, 2] += torch.isnan(g).sum()  # sign(NaN) is 0; count_nonzero counts a NaN
        self.tensor_sq = sq
        table = torch.stack([sq, per[:, 1], self._numel - per[:, 2], per[:, 3], self._numel], dim=1)
        if self._weights is not None:
            table = table * self._weights[:, None]
        sums = torch.zeros(n_groups, 5, device=dev).index_add_(0, self._to_group, table)
        maxes = torch.zeros(n_groups, device=dev).scatter_reduce_(0, self._to_group, amax, reduce="amax", include_self=True)
        return sums, maxes


    def memory(self) -> tuple[int, int]:
        """Bytes this plan keeps between calls: (the packed buffers, everything else: per-row results and indices)."""
        packed = sum(b.buffer.numel() * b.buffer.element_size() for b in self._buckets)
        kept = [t for b in self._buckets for t in (b.res, b.top, b.row_tensor)]
        kept += [t for t in (self._to_group, self._numel, self._weights) if t is not None]
        return packed, sum(t.numel() * t.element_size() for t in kept)

    def scratch_buffers(self) -> list[torch.Tensor]:
        """The packed buffers (one per device and dtype; empty before the first :meth:`moments`). Between two
        :meth:`moments` calls their contents are free: :class:`UpdateTracker` keeps its copies there."""
        return [b.buffer for b in self._buckets if b.buffer.numel()]

    def per_group(self, per_tensor: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Per-tensor values (in :attr:`params` order) combined per layer (``sum`` or ``amax``), with the index
        built once; ``(layers,)``."""
        if reduce not in ("sum", "amax"):
            raise ValueError(f"GradStatsPlan.per_group: reduce={reduce!r} is not one of: sum, amax")
        dev = per_tensor.device
        index = self._group_index_on(dev)
        out = torch.zeros(len(self.groups), device=dev, dtype=per_tensor.dtype)
        if reduce == "sum":
            return out.index_add_(0, index, per_tensor)
        return out.scatter_reduce_(0, index, per_tensor, reduce="amax", include_self=True)

    def _group_index_on(self, dev: torch.device) -> torch.Tensor:
        if self._to_group is None or self._to_group.device != dev:
            self._to_group = to_device(self._group_index, dev, torch.long)
        return self._to_group

    def weight_sq(self) -> torch.Tensor:
        """This rank's part of each layer's squared weight norm, ``(layers,)`` (one ``_foreach_norm``; replicas
        weighted when ``sharded``; sum over ranks, then sqrt)."""
        if not self.params:
            return torch.zeros(len(self.groups))
        with torch.no_grad():  # no per-parameter ``detach``
            local = [distributed.local(p) for p in self.params] if self.sharded else self.params
            sq = torch.stack(torch._foreach_norm(local, 2)).float() ** 2
        if self.sharded:
            sq = sq * distributed.count_weights(self.params, sq.device)
        return self.per_group(sq)


class _Chunk:
    """Rows of one width reduced together: gradients (or pieces of them) copied into the start of the bucket's
    buffer, seen there as ``(rows, width)``; each row holds values of one gradient only (a gradient whose size is
    not a multiple of the width ends in a zero-padded row). ``outs``: this chunk's slices of the per-row results."""

    __slots__ = ("x", "dst", "full", "pieces", "zero", "outs")

    def __init__(self, buffer: torch.Tensor, width: int, rows: int, parts: list[tuple[int, int, int, int]],
                 grads: list[Optional[torch.Tensor]], res: torch.Tensor, top: torch.Tensor, row0: int) -> None:
        self.x = buffer[: rows * width].view(rows, width)
        whole = [(t, off) for t, a, b, off in parts if a == 0 and b == grads[t].numel()]  # type: ignore[union-attr]
        cut = [(t, a, b, off) for t, a, b, off in parts if not (a == 0 and b == grads[t].numel())]  # type: ignore[union-attr]
        self.full = [t for t, _ in whole]
        self.pieces = [(t, a, b, grads[t].numel()) for t, a, b, _ in cut]  # type: ignore[union-attr]
        # destinations shaped like the gradients (one ``_foreach_copy_`` whatever their strides), then the pieces
        self.dst = [buffer[off : off + grads[t].numel()].view(grads[t].shape) for t, off in whole]  # type: ignore[union-attr]
        self.dst += [buffer[off : off + b - a] for _, a, b, off in cut]
        self.zero = any((b - a) % width for _, a, b, _ in parts)  # a partly filled row: its padding must read 0
        r = slice(row0, row0 + rows)
        self.outs = (res[0, r], res[1, r], res[2, r], res[3, r], res[4, r], top[r])


def _pow2_width(n: int, cap: int) -> int:
    """The largest power of two that divides ``n``, at most ``cap``."""
    return min(n & -n, cap)


class _Bucket:
    """The gradients of one (device, dtype), as rows in chunks that fit the buffer (see :class:`GradStatsPlan`)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, members: list[int], grads: list[Optional[torch.Tensor]],
                 chunk: int, out_device: torch.device, budget: int = 0) -> None:
        self.device, self.dtype, self.out_device = device, dtype, out_device
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32  # sums never in half precision
        #: count non-finite values (and NaNs) on the device, every call, with no host read: off the CPU
        self.count_on_device = device.type != "cpu"
        sizes = {t: grads[t].numel() for t in members}  # type: ignore[union-attr]
        # a power of two: chunk/16 (at least ROW_MIN), at most ROW_MAX, and never wider than the chunk
        cap = min(ROW_MAX, 1 << (max(ROW_MIN, chunk // 16).bit_length() - 1), 1 << (chunk.bit_length() - 1))
        # each gradient is cut into rows of the largest power of two dividing its size (no padding), or padded to
        # rows of BLOCK when that power is small (a size like 10)
        classes: dict[int, list[int]] = {}
        padded: list[int] = []
        for t in members:
            n = sizes[t]
            if n:
                w = _pow2_width(n, cap)
                if w < min(n, BLOCK, cap):
                    padded.append(t)
                else:
                    classes.setdefault(w, []).append(t)
        # a width holding few values joins the next narrower one (a smaller power of two divides too): fewer chunks
        widths = sorted(classes, reverse=True)
        for w, narrower in zip(widths, widths[1:]):
            if sum(sizes[t] for t in classes[w]) < chunk // 4:
                classes[narrower] = classes.pop(w) + classes[narrower]
        if padded:
            w = min([v for v in classes if v <= BLOCK] or [min(BLOCK, cap)])
            classes[w] = classes.get(w, []) + padded
        plan: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []  # (width, rows, [(t, a, b, offset)])
        for w in sorted(classes, reverse=True):
            per_chunk = max(1, chunk // w)
            rows, parts = 0, []
            for t in classes[w]:
                n, a = sizes[t], 0
                while a < n:
                    if rows == per_chunk:
                        plan.append((w, rows, parts))
                        rows, parts = 0, []
                    b = min(n, a + (per_chunk - rows) * w)
                    parts.append((t, a, b, rows * w))
                    rows += -(-(b - a) // w)
                    a = b
            if parts:
                plan.append((w, rows, parts))
        n_rows = sum(rows for _, rows, _ in plan)
        # the chunks' rows, and up to the whole budget (not beyond these gradients' size): the update ratio's
        # copies of as many parameters (UpdateTracker's default budget) fit in it too
        size = max(max((w * rows for w, rows, _ in plan), default=0), min(budget, sum(sizes.values())))
        self.buffer = torch.zeros(size, dtype=dtype, device=device)
        # per row: norm, sum, non-zeros, non-finite, NaN (the last two only where counted on the device)
        self.res = torch.zeros(5, n_rows, dtype=self.acc, device=device)
        self.top = torch.zeros(n_rows, dtype=dtype, device=device)  # max |g| per row
        self.chunks: list[_Chunk] = []
        row_tensor: list[int] = []
        for w, rows, parts in plan:
            self.chunks.append(_Chunk(self.buffer, w, rows, parts, grads, self.res, self.top, len(row_tensor)))
            for t, a, b, _ in parts:
                row_tensor += [t] * -(-(b - a) // w)
        self.row_tensor = to_device(row_tensor, out_device, torch.long)

    def reduce_into(self, grads: list[Optional[torch.Tensor]], per: torch.Tensor, amax: torch.Tensor) -> None:
        """Add this bucket's per-tensor sums of squares, sums, non-zero counts (and, off the CPU, non-finite counts)
        into ``per`` ``(tensors, 4)`` and max |g| into ``amax``."""
        if not self.chunks:
            return
        on_device = self.count_on_device
        acc = self.acc
        for ch in self.chunks:
            if ch.zero:
                ch.x.zero_()  # padding reads as zeros (the buffer holds other chunks' values)
            srcs = [grads[t] for t in ch.full]
            if ch.pieces:
                for t, a, b, n in ch.pieces:
                    g = grads[t]
                    if g is None or g.numel() != n:  # a slice would silently miss or overrun it
                        raise RuntimeError(f"gradient {t} has {0 if g is None else g.numel()} elements, not {n}")
                    srcs.append(g.reshape(-1)[a:b])
            torch._foreach_copy_(ch.dst, srcs)  # type: ignore[arg-type]
            x = ch.x
            norm, total, nonzero, nonfinite, nans, top = ch.outs
            torch.linalg.vector_norm(x, 2, dim=1, dtype=acc, out=norm)
            torch.sum(x, 1, dtype=acc, out=total)
            if on_device:
                torch.sum(~torch.isfinite(x), 1, dtype=acc, out=nonfinite)
                torch.sum(torch.isnan(x), 1, dtype=acc, out=nans)
            # the copy is scratch from here: |g| for the maximum, then sign(|g|) (1 where g != 0) for the count,
            # both in place: a pass each, instead of amax + amin + count_nonzero (slow on a CPU)
            x.abs_()
            torch.amax(x, 1, out=top)
            x.sign_()
            torch.sum(x, 1, dtype=acc, out=nonzero)
        res = self.res
        # sign(NaN) is 0 where count_nonzero counts a NaN: NaNs are added back (on the CPU by the caller, only
        # when a sum of squares is not finite)
        vals = torch.stack([res[0].square(), res[1], res[2] + res[4] if on_device else res[2], res[3]], dim=1)
        per.index_add_(0, self.row_tensor, vals.to(device=self.out_device, dtype=per.dtype))
        amax.scatter_reduce_(0, self.row_tensor, self.top.to(device=self.out_device, dtype=amax.dtype), reduce="amax",
                             include_self=True)


def grad_statistics(groups: Sequence[LayerGroup]) -> torch.Tensor:
    """``(len(groups), len(GRAD_STATS))`` float32 tensor on the gradients' device.

    Columns: L2 norm, mean, std (population), max |g|, fraction of exact zeros, count of non-finite values.
    A layer without gradients this step reads 0 everywhere. A NaN or Inf shows up in the norm (NaN/Inf) and in
    the non-finite count. FSDP2 ``DTensor`` gradients: statistics of the full gradients (one collective; see
    :func:`grad_moments`). Computed by a :class:`GradStatsPlan` (built here; keep one to reuse its buffers).
    """
    params, _ = _flat(groups)
    sums, maxes = grad_moments(groups)
    sums, maxes = distributed.reduce_sum_max(sums, maxes, enabled=distributed.any_dtensor(params))
    return grad_statistics_from(sums, maxes)


def grad_moments(groups: Sequence[LayerGroup], sharded: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive parts of :func:`grad_statistics` from this rank's gradients (local ``DTensor`` shards):
    ``sums`` ``(len(groups), 5)`` (sum of squares, sum, zeros, non-finite, count) and ``maxes``
    ``(len(groups),)`` (max |g|). Ranks combine them with
    :func:`~lightning_gradguard.distributed.reduce_sum_max`; replicas count once
    (:func:`~lightning_gradguard.distributed.count_weights`) when ``sharded`` (default: any gradient is a
    ``DTensor``; pass the caller's decision to reduce). Finish with :func:`grad_statistics_from`.
    One-off form of :meth:`GradStatsPlan.moments`."""
    return GradStatsPlan(groups, sharded=sharded).moments()


def grad_statistics_from(sums: torch.Tensor, maxes: torch.Tensor) -> torch.Tensor:
    """:func:`grad_statistics` from (possibly rank-reduced) :func:`grad_moments`."""
    n = sums[:, 4].clamp(min=1.0)
    mean = sums[:, 1] / n
    var = (sums[:, 0] / n - mean**2).clamp(min=0.0)
    return torch.stack([sums[:, 0].sqrt(), mean, var.sqrt(), maxes, sums[:, 2] / n, sums[:, 3]], dim=1)


def _group_sq(
    groups: Sequence[LayerGroup], tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor], sharded: Optional[bool] = None,
    index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-group sum of squares of ``tensors`` (local parts), weighted so replicas of ``like`` count once."""
    dev = tensors[0].device
    sq = torch.stack(torch._foreach_norm(list(tensors), 2)).float() ** 2
    if distributed.any_dtensor(like) if sharded is None else sharded:
        sq = sq * distributed.count_weights(like, dev)
    if index is None:
        index = to_device(_flat(groups)[1], dev, torch.long)
    return torch.zeros(len(groups), device=dev).index_add_(0, index, sq)


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
    """A copy of every parameter (its local shard under FSDP2) before an optimizer step, for :func:`update_ratios`.

    A full copy of the parameters: :class:`UpdateTracker` measures the same ratios with a bounded copy."""
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


class UpdateTracker:
    """‖Δw‖/‖w‖ of one optimizer step per layer without copying all parameters: a rotating subset of layers.

    :meth:`begin` (before the step) copies the parameters of the next layers in forward order whose sizes add
    up to at most ``max(memory_fraction × all parameter elements, MIN_CHUNK)`` (a layer larger than that
    alone, by itself); :meth:`finish` (after the step) subtracts in place and returns this rank's ‖Δw‖² and
    ‖w_before‖² per layer, ``(2, layers)``, and which layers were measured. The next :meth:`begin` goes on
    with the following layers, so every layer is measured once every ``≈ 1/memory_fraction`` logging steps
    (every logging step with ``memory_fraction=1``, or for a model of at most ``MIN_CHUNK`` elements); ``budget``
    (elements) replaces that bound. The copies go into a caller's scratch buffer when one fits (``begin(scratch)``:
    ``GradientMonitor`` passes the packed buffer of its :class:`GradStatsPlan`, free once the gradient statistics
    are taken, so the two share one allocation). Exact for the layers measured: nothing is estimated.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> tracker = UpdateTracker(layer_groups(net))
        >>> tracker.begin()
        >>> with torch.no_grad():
        ...     _ = net[0].weight.add_(0.1)
        >>> sq, measured = tracker.finish()
        >>> measured.tolist()
        [True, True]
    """

    def __init__(self, groups: Sequence[LayerGroup], memory_fraction: float = 0.1, sharded: Optional[bool] = None,
                 budget: Optional[int] = None) -> None:
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"UpdateTracker: memory_fraction={memory_fraction!r} must be in (0, 1]")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"UpdateTracker: budget={budget!r} must be a positive number of elements or None")
        self.groups = list(groups)
        self.sharded = distributed.any_dtensor(_flat(self.groups)[0]) if sharded is None else bool(sharded)
        sizes = [sum(distributed.local(p).numel() for p in g.params) for g in self.groups]
        self.budget = max(MIN_CHUNK, int(memory_fraction * sum(sizes))) if budget is None else budget
        self._sizes = sizes
        self._next = 0
        self._taken: list[int] = []
        self._params: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._index: Optional[torch.Tensor] = None
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def begin(self, scratch: Sequence[torch.Tensor] = ()) -> None:
        """Copy the next layers' parameters (call right before the optimizer step): into the first of ``scratch``
        (1-D tensors whose contents are free until :meth:`finish`, e.g. :meth:`GradStatsPlan.scratch_buffers`) of
        their dtype and device that holds them, else into new tensors."""
        self._taken, used = [], 0
        n = len(self.groups)
        for k in range(n):
            gi = (self._next + k) % n
            if not self._sizes[gi]:
                continue
            if self._taken and used + self._sizes[gi] > self.budget:
                break
            self._taken.append(gi)
            used += self._sizes[gi]
        if self._taken:
            self._next = (self._taken[-1] + 1) % n
        self._params = [p for gi in self._taken for p in self.groups[gi].params]
        local = [distributed.local(p.detach()) for p in self._params]
        self._copies = self._into(scratch, local) if local else []
        self._index = None
        if local:
            key = (tuple(self._taken), str(local[0].device))
            self._index = self._index_cache.get(key)
            if self._index is None:  # made once per subset, copied without waiting for the device
                index = [gi for gi in self._taken for _ in self.groups[gi].params]
                self._index = self._index_cache[key] = to_device(index, local[0].device, torch.long)

    @staticmethod
    def _into(scratch: Sequence[torch.Tensor], local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of ``local``: views of one scratch buffer when one fits (no new memory), else clones."""
        need = sum(t.numel() for t in local)
        kinds = {(t.dtype, t.device) for t in local}
        for buf in scratch:
            if need <= buf.numel() and kinds == {(buf.dtype, buf.device)}:
                views, at = [], 0
                for t in local:
                    views.append(buf[at : at + t.numel()].view(t.shape))
                    at += t.numel()
                torch._foreach_copy_(views, local)
                return views
        return [t.clone() for t in local]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(2, layers)`` ‖Δw‖², ‖w_before‖² (0 for layers not measured) and a bool ``(layers,)``
        of the layers measured; frees the copies."""
        n = len(self.groups)
        measured = torch.zeros(n, dtype=torch.bool)
        if not self._copies or self._index is None:
            return torch.zeros(2, n), measured
        dev = self._copies[0].device
        before = torch.stack(torch._foreach_norm(self._copies, 2)).float() ** 2
        torch._foreach_sub_(self._copies, [distributed.local(p.detach()) for p in self._params])
        delta = torch.stack(torch._foreach_norm(self._copies, 2)).float() ** 2
        per = torch.stack([delta, before])
        if self.sharded:
            per = per * distributed.count_weights(self._params, dev)
        out = torch.zeros(2, n, device=dev).index_add_(1, self._index, per)
        measured[self._taken] = True
        self._copies, self._params = [], []
        return out, measured


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
    head = torch.stack([lo, hi, torch.full((), float(v.numel()), device=v.device), v.sum(), (v * v).sum()])
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
