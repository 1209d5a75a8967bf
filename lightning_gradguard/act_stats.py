"""Activation statistics of one step, reduced in a few kernels for many layers at once.

A forward hook hands each layer's activation output to :meth:`ActivationAccumulator.add`. Two ways, both
with bounded memory (no output is held past the start of backward, no float32 stack of all of them):

- **waiting** (``held=True``: the output is a module's own output, which autograd keeps alive until backward
  anyway in the usual case: the next layer saves it as its input): a reference is kept, nothing is computed.
  :meth:`ActivationAccumulator.reduce_pending` (``GradientMonitor`` calls it in ``on_before_backward``) reduces
  the waiting outputs of one shape, dtype and activation family together: stacked ``PENDING_CHUNK`` elements
  at a time (the only new memory: one such stack, transient) and reduced in 3–4 kernels per stack, instead of
  3–4 per layer. Only outputs of at most ``SMALL`` elements wait (a large output's kernels cost more than
  their launch: it is reduced at once). An output changed in place between the hook and the reduction (its
  version counter moved) is not reduced: that layer has no activation row this step, and its outputs are
  reduced at once from then on;
- **at once** (``held=False``, a large output, or an output the hook computed itself, e.g. ``F.relu`` of a
  layer's output: nothing else keeps it): reduced in the hook and let go.

Per output: the sum and the L2 norm (accumulated in float32, float64 for float64 outputs; the mean and the
sample std follow as ``s/n`` and ``sqrt((q - n·mean²)/(n-1))``, computed in float64 from them); ReLU family
(``relu``, ``relu6``: outputs are never negative): the maximum per unit over every other dim, then how many
units have a maximum other than 0 (a unit is dead when its maximum is 0); sigmoid/tanh: the count of values
within ``eps`` of a bound.

:meth:`ActivationAccumulator.finish` turns them into the ``ACT_STATS`` rows of all layers at once (a few
concatenations and element-wise kernels, with the constant vectors kept between steps).

Columns (:data:`lightning_gradguard.stats.ACT_STATS`): mean, std (sample), fraction of dead units (a
ReLU-family unit whose output is 0 for every sample and position of the batch), fraction of saturated values.

Example:
    >>> acc = ActivationAccumulator()
    >>> acc.add(0, torch.tensor([[0.0, 1.0], [0.0, 3.0]]), "relu", unit_dim=-1)
    >>> layers, rows = acc.finish(torch.device("cpu"))
    >>> layers, rows[0, 2].item()          # unit 0 is 0 for the whole batch: half the units are dead
    ([0], 0.5)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from lightning_gradguard.activations import RELU_FAMILY, SATURATING_BOUNDS

#: outputs of at most this many elements may wait to be reduced with others (larger ones: at once)
SMALL = 1 << 15
#: at most this many elements of waiting outputs are stacked (copied) at a time
PENDING_CHUNK = 1 << 16


class _Block:
    """Reduced values of some layers: ``raw`` ``(k, 4)`` (sum, L2 norm, units alive, values saturated) and, per
    layer, (layer, elements, units or 0, 1 if saturating else 0) known on the host."""

    __slots__ = ("raw", "meta")

    def __init__(self, raw: torch.Tensor, meta: list[tuple[int, int, int, int]]) -> None:
        self.raw, self.meta = raw, meta


class ActivationAccumulator:
    """Per-layer activation statistics of one step (see the module docstring)."""

    def __init__(self, eps: float = 0.01) -> None:
        self.eps = float(eps)
        self._blocks: list[_Block] = []
        self._layers: set[int] = set()
        #: (shape, dtype, device, kind, unit dim) -> [(layer, output, its version when it came)]
        self._pending: dict[tuple, list[tuple[int, torch.Tensor, int]]] = {}
        self._pending_elems = 0
        self._dims: dict[tuple[int, int], tuple[int, ...]] = {}
        self._consts: dict[tuple, torch.Tensor] = {}
        #: layers whose output changed in place before it was reduced: reduced at once from then on
        self.eager: set[int] = set()

    def __contains__(self, layer: int) -> bool:
        return layer in self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def clear(self) -> None:
        """Forget this step's values and waiting outputs (the index buffers are kept)."""
        self._blocks.clear()
        self._layers.clear()
        self._pending.clear()
        self._pending_elems = 0

    @staticmethod
    def _kind(activation: Optional[str], x: torch.Tensor) -> str:
        if activation in RELU_FAMILY and x.dim() >= 2:
            return "relu"
        if activation in SATURATING_BOUNDS:
            return activation  # type: ignore[return-value]
        return ""

    def add(self, layer: int, out: torch.Tensor, activation: Optional[str], unit_dim: int, held: bool = False) -> None:
        """Record layer ``layer``'s activation output ``out`` (units along ``unit_dim``): kept to be reduced with
        others when ``held`` (a module's own output, alive until backward anyway) and small, else reduced now."""
        x = out.detach()
        if not x.is_floating_point():
            x = x.float()
        kind = self._kind(activation, x)
        units = unit_dim % x.dim() if x.dim() else 0
        self._layers.add(layer)
        if held and x.numel() <= SMALL and layer not in self.eager:
            key = (tuple(x.shape), x.dtype, x.device, kind, units)
            self._pending.setdefault(key, []).append((layer, x, x._version))
            self._pending_elems += x.numel()
            return
        self._reduce(key=(tuple(x.shape), x.dtype, x.device, kind, units), layers=[layer], xs=[x])

    def reduce_pending(self, on_error: Optional[Callable[[int, Exception], None]] = None) -> None:
        """Reduce every waiting output (see the module docstring); a failure is handed to ``on_error(layer,
        error)`` for each layer of the failed stack (raised when ``on_error`` is None)."""
        pending, self._pending, self._pending_elems = self._pending, {}, 0
        for key, items in pending.items():
            fresh = []
            for layer, x, version in items:
                if x._version != version:  # changed in place after the hook: not this layer's activation
                    self.eager.add(layer)
                    self._layers.discard(layer)
                else:
                    fresh.append((layer, x))
            per = max(1, PENDING_CHUNK // max(1, fresh[0][1].numel())) if fresh else 1
            for a in range(0, len(fresh), per):
                part = fresh[a : a + per]
                try:
                    self._reduce(key, [k for k, _ in part], [x for _, x in part])
                except Exception as err:  # noqa: BLE001 - the caller decides (the monitor warns and goes on)
                    for k, _ in part:
                        self._layers.discard(k)
                    if on_error is None:
                        raise
                    for k, _ in part:
                        on_error(k, err)

    def _reduce(self, key: tuple, layers: list[int], xs: list[torch.Tensor]) -> None:
        shape, dtype, _, kind, units = key
        k = len(xs)
        x = xs[0].unsqueeze(0) if k == 1 else torch.stack(xs)  # (k, *shape)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        flat = x.reshape(k, -1)
        total = flat.sum(1, dtype=acc)
        norm = torch.linalg.vector_norm(flat, 2, dim=1, dtype=acc)
        n = flat.shape[1]
        alive = sat = None
        n_units = 0
        if kind == "relu":
            dims = self._dims.get((x.dim(), units))
            if dims is None:
                dims = self._dims[(x.dim(), units)] = tuple(d for d in range(1, x.dim()) if d != units + 1)
            # units that are > 0 somewhere in the batch (ReLU outputs are never negative)
            alive = (x.amax(dim=dims) > 0).sum(1, dtype=acc)
            n_units = shape[units]
        elif kind:
            lo, hi = SATURATING_BOUNDS[kind]
            sat = ((flat <= lo + self.eps) | (flat >= hi - self.eps)).sum(1, dtype=acc)
        zero = torch.zeros(k, dtype=acc, device=x.device)
        raw = torch.stack([total, norm, zero if alive is None else alive, zero if sat is None else sat], dim=1)
        self._blocks.append(_Block(raw, [(layer, n, n_units, int(sat is not None)) for layer in layers]))

    def _const(self, key: tuple, make: Any) -> torch.Tensor:
        """A small constant tensor made once per key: a Python list copied to the device every step would make
        a GPU step wait."""
        value = self._consts.get(key)
        if value is None:
            if len(self._consts) > 64:
                self._consts.clear()
            value = self._consts[key] = make()
        return value

    def finish(self, device: torch.device, only: Optional[set[int]] = None,
               on_error: Optional[Callable[[int, Exception], None]] = None) -> tuple[list[int], torch.Tensor]:
        """(layers in ascending order, ``(layers, 4)`` float32 rows on ``device``) of the layers recorded
        (those in ``only`` when given); reduces what still waits first."""
        if self._pending:
            self.reduce_pending(on_error)
        meta = [m for b in self._blocks for m in b.meta]
        keep = [j for j, m in enumerate(meta) if m[0] in self._layers and (only is None or m[0] in only)]
        if not keep:
            return [], torch.zeros(0, 4, device=device)
        order = sorted(keep, key=lambda j: meta[j][0])
        layers = [meta[j][0] for j in order]
        key = (tuple(meta), tuple(order), str(device))
        raw = torch.cat([b.raw.to(device) for b in self._blocks]) if len(self._blocks) > 1 else self._blocks[0].raw.to(device)
        if order != list(range(len(meta))):
            raw = raw.index_select(0, self._const(("order", key), lambda: torch.tensor(order, dtype=torch.long,
                                                                                          device=device)))
        info = self._const(("info", key), lambda: torch.tensor(
            [[float(max(meta[j][1], 1)), float(max(meta[j][2], 1)), float(meta[j][2] > 0), float(meta[j][3])]
             for j in order], dtype=torch.float64, device=device))
        raw = raw.double()
        count, units, is_relu, is_sat = info.unbind(1)
        mean = raw[:, 0] / count
        # sample std (Bessel's correction, as torch.std_mean's default); 0 for a single value
        std = ((raw[:, 1].square() - count * mean.square()).clamp(min=0.0) / (count - 1).clamp(min=1.0)).sqrt()
        dead = is_relu * (units - raw[:, 2]) / units
        sat = is_sat * raw[:, 3] / count
        return layers, torch.stack([mean, std, dead, sat], dim=1).float()


__all__ = ["ActivationAccumulator", "SMALL", "PENDING_CHUNK"]
