"""Activation statistics of one step, reduced in a few kernels for many layers at once.

A forward hook hands each layer's activation output to :meth:`ActivationAccumulator.add`. Two ways, both
with bounded memory (no output is held past the start of backward, no float32 stack of all of them):

- **waiting** (``held=True``, which :func:`kept_by_autograd` decides: an output that autograd keeps until
  backward anyway, because its own backward is computed from it: ReLU, sigmoid, tanh): a reference is kept,
  nothing is computed.
  :meth:`ActivationAccumulator.reduce_pending` (``GradientMonitor`` calls it in ``on_before_backward``) reduces
  the waiting outputs of one shape and activation family together: copied by one ``_foreach_copy_`` into a
  caller's scratch buffer (``GradientMonitor`` passes its packed gradient buffer, free until the optimizer
  step: no new memory), as many as fit, and reduced there in 4–5 kernels per stack instead of 4–5 per layer.
  Without a scratch buffer that holds two of them, each is reduced alone, where it is (no copy). Only outputs of
  at most ``SMALL`` elements wait (a large output's kernels cost more than their launch: it is reduced at
  once). An output changed in place between the hook and the reduction (its version counter moved) is not
  reduced: that layer has no activation row this step, and its outputs are reduced at once from then on;
- **at once** (``held=False``: an output nothing may keep, e.g. a layer's output that goes into a residual sum,
  or one the hook computed itself, e.g. ``F.relu`` of a layer's output; or a large output): reduced in the
  hook and let go.

Per output: the sum and the L2 norm (accumulated in float32, float64 for float64 outputs; the mean and the
sample std follow as ``s/n`` and ``sqrt((q - n·mean²)/(n-1))``, computed in float64 from them, float32 on MPS,
which has no float64); ReLU family
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

from typing import Any, Callable, Optional, Sequence

import torch

from lightning_gradguard.activations import RELU_FAMILY, SATURATING_BOUNDS
from lightning_gradguard.host_transfer import to_device

#: outputs of at most this many elements may wait to be reduced with others (larger ones: at once)
SMALL = 1 << 15
#: autograd nodes whose backward is computed from their output, which they keep until backward
_RESULT_KEEPERS = frozenset({"ReluBackward0", "ReluBackward1", "SigmoidBackward0", "SigmoidBackward1", "TanhBackward0",
                             "TanhBackward1"})


def kept_by_autograd(out: torch.Tensor) -> bool:
    """Whether autograd keeps ``out`` until backward whatever comes after it: its own node (ReLU, sigmoid, tanh)
    computes its gradient from it. Holding a reference to such an output until backward costs no memory.

    Example:
        >>> x = torch.randn(3, requires_grad=True)
        >>> kept_by_autograd(torch.relu(x)), kept_by_autograd(x * 2)
        (True, False)
    """
    fn = out.grad_fn
    return fn is not None and type(fn).__name__ in _RESULT_KEEPERS


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
        self._dims: dict[tuple[int, int], tuple[int, ...]] = {}
        self._views: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # stacks in a scratch buffer
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

    @staticmethod
    def _kind(activation: Optional[str], x: torch.Tensor) -> str:
        if activation in RELU_FAMILY and x.dim() >= 2:
            return "relu"
        if activation in SATURATING_BOUNDS:
            return activation  # type: ignore[return-value]
        return ""

    def add(self, layer: int, out: torch.Tensor, activation: Optional[str], unit_dim: int, held: bool = False) -> None:
        """Record layer ``layer``'s activation output ``out`` (units along ``unit_dim``): kept to be reduced with
        others when ``held`` (autograd keeps it until backward anyway: :func:`kept_by_autograd`) and small, else
        reduced now."""
        x = out.detach()
        if not x.is_floating_point():
            x = x.float()
        kind = self._kind(activation, x)
        units = unit_dim % x.dim() if x.dim() else 0
        self._layers.add(layer)
        key = (tuple(x.shape), x.dtype, x.device, kind, units)
        if held and x.numel() <= SMALL and layer not in self.eager:
            self._pending.setdefault(key, []).append((layer, x, x._version))
            return
        self._reduce(key, [layer], [x])

    def reduce_pending(self, on_error: Optional[Callable[[int, Exception], None]] = None,
                       scratch: Sequence[torch.Tensor] = ()) -> None:
        """Reduce every waiting output (see the module docstring), stacked in the first of ``scratch`` (1-D
        floating-point tensors whose contents are free now) on their device that holds two or more; a failure
        is handed to ``on_error(layer, error)`` for each layer of the failed stack (raised when ``on_error`` is
        None)."""
        pending, self._pending = self._pending, {}
        for key, items in pending.items():
            fresh = []
            for layer, x, version in items:
                if x._version != version:  # changed in place after the hook: not this layer's activation
                    self.eager.add(layer)
                    self._layers.discard(layer)
                else:
                    fresh.append((layer, x))
            if not fresh:
                continue
            numel = max(1, fresh[0][1].numel())
            buf = next((b for b in scratch if b.device == key[2] and b.is_floating_point() and b.numel() >= 2 * numel),
                       None)
            per = 1 if buf is None else buf.numel() // numel
            for a in range(0, len(fresh), per):
                part = fresh[a : a + per]
                try:
                    self._reduce(key, [k for k, _ in part], [x for _, x in part], buf)
                except Exception as err:  # noqa: BLE001 - the caller decides (the monitor warns and goes on)
                    for k, _ in part:
                        self._layers.discard(k)
                    if on_error is None:
                        raise
                    for k, _ in part:
                        on_error(k, err)

    def _reduce(self, key: tuple, layers: list[int], xs: list[torch.Tensor], buf: Optional[torch.Tensor] = None) -> None:
        shape, dtype, _, kind, units = key
        k = len(xs)
        n = xs[0].numel()
        scratch = buf is not None and k > 1
        if scratch:  # one copy of all k into the free buffer (casting if need be); reduced there, in place
            assert buf is not None
            vkey = (buf.data_ptr(), buf.dtype, k, shape)
            views = self._views.get(vkey)
            if views is None:
                if len(self._views) > 64:
                    self._views.clear()
                x = buf[: k * n].view(k, *shape)
                views = self._views[vkey] = (x, list(x.unbind(0)))
            x = views[0]
            torch._foreach_copy_(views[1], xs)
            dtype = buf.dtype
        else:
            x = xs[0].unsqueeze(0) if k == 1 else torch.stack(xs)  # (k, *shape); a view when alone
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        flat = x.reshape(k, -1)
        raw = torch.zeros(4, k, dtype=acc, device=x.device)  # sum, L2 norm, units alive, values saturated
        torch.sum(flat, 1, dtype=acc, out=raw[0])
        torch.linalg.vector_norm(flat, 2, dim=1, dtype=acc, out=raw[1])
        saturating = False
        n_units = 0
        if kind == "relu":
            dims = self._dims.get((x.dim(), units))
            if dims is None:
                dims = self._dims[(x.dim(), units)] = tuple(d for d in range(1, x.dim()) if d != units + 1)
            # units that are > 0 somewhere in the batch (ReLU outputs are never negative)
            torch.sum(x.amax(dim=dims) > 0, 1, dtype=acc, out=raw[2])
            n_units = shape[units]
        elif kind:
            lo, hi = SATURATING_BOUNDS[kind]
            if scratch:  # |x - centre| >= half width - eps, on the copy: one boolean temporary, not three
                hit = flat.sub_((lo + hi) / 2).abs_() >= (hi - lo) / 2 - self.eps
            else:
                hit = (flat <= lo + self.eps) | (flat >= hi - self.eps)
            torch.sum(hit, 1, dtype=acc, out=raw[3])
            saturating = True
        self._blocks.append(_Block(raw.t(), [(layer, n, n_units, int(saturating)) for layer in layers]))

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
            raw = raw.index_select(0, self._const(("order", key), lambda: to_device(order, device, torch.long)))
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        info = self._const(("info", key, wide), lambda: to_device(
            [[float(max(meta[j][1], 1)), float(max(meta[j][2], 1)), float(meta[j][2] > 0), float(meta[j][3])]
             for j in order], device, wide))
        raw = raw.to(wide)
        count, units, is_relu, is_sat = info.unbind(1)
        mean = raw[:, 0] / count
        # sample std (Bessel's correction, as torch.std_mean's default); 0 for a single value
        std = ((raw[:, 1].square() - count * mean.square()).clamp(min=0.0) / (count - 1).clamp(min=1.0)).sqrt()
        dead = is_relu * (units - raw[:, 2]) / units
        sat = is_sat * raw[:, 3] / count
        return layers, torch.stack([mean, std, dead, sat], dim=1).float()


__all__ = ["ActivationAccumulator", "SMALL", "kept_by_autograd"]
