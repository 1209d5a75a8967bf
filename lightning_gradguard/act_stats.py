"""Activation statistics reduced as each output arrives, finished for all layers in a few kernels.

A forward hook hands each layer's activation output to :meth:`ActivationAccumulator.add`, which keeps only
what the statistics need and lets the output go at once (memory stays bounded: no output is held until the
end of the step, no float32 stack of all of them):

- the sum and the L2 norm of the output, accumulated in float64 (two vectorized reductions; the mean and
  the sample std follow as ``s/n`` and ``sqrt((q - n·mean²)/(n-1))``, to float64 rounding the numbers
  ``torch.std_mean`` gives, which is ~10× slower on a CPU);
- ReLU family (``relu``, ``relu6``: outputs are never negative): the maximum per unit over every other dim
  (``amax`` with a dim tuple, one kernel, no copy even for channel-first convolutions), then how many units
  have a maximum other than 0 (``count_nonzero``): one number kept per layer; a unit is dead when its maximum
  is 0;
- sigmoid/tanh: the count of values within ``eps`` of a bound (three small kernels).

:meth:`ActivationAccumulator.finish` turns them into the ``ACT_STATS`` rows of all layers at once (a few stacks
and element-wise kernels, with the constant vectors kept between steps).

Columns (:data:`lightning_gradguard.stats.ACT_STATS`): mean, std (population), fraction of dead units (a
ReLU-family unit whose output is 0 for every sample and position of the batch), fraction of saturated values.

Example:
    >>> acc = ActivationAccumulator()
    >>> acc.add(0, torch.tensor([[0.0, 1.0], [0.0, 3.0]]), "relu", unit_dim=-1)
    >>> layers, rows = acc.finish(torch.device("cpu"))
    >>> layers, rows[0, 2].item()          # unit 0 is 0 for the whole batch: half the units are dead
    ([0], 0.5)
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_gradguard.activations import RELU_FAMILY, SATURATING_BOUNDS


class ActivationAccumulator:
    """Per-layer activation statistics of one step, reduced as the outputs arrive (see the module docstring)."""

    def __init__(self, eps: float = 0.01) -> None:
        self.eps = float(eps)
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._nonzero: dict[int, tuple[torch.Tensor, int]] = {}  # layer -> (units alive, units)
        self._dims: dict[tuple[int, int], tuple[int, ...]] = {}
        self._saturated: dict[int, tuple[torch.Tensor, int]] = {}
        self._consts: dict[tuple, torch.Tensor] = {}

    def __contains__(self, layer: int) -> bool:
        return layer in self._moments

    def __len__(self) -> int:
        return len(self._moments)

    def clear(self) -> None:
        """Forget this step's values (the index buffers are kept)."""
        self._moments.clear()
        self._nonzero.clear()
        self._saturated.clear()

    def add(self, layer: int, out: torch.Tensor, activation: Optional[str], unit_dim: int) -> None:
        """Reduce ``out`` (layer ``layer``'s activation output; units along ``unit_dim``) into this step's record."""
        x = out.detach()
        if not x.is_floating_point():
            x = x.float()
        wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
        total = x.sum(dtype=wide)
        sq = torch.linalg.vector_norm(x, 2, dtype=wide)
        nonzero = saturated = None
        if activation in RELU_FAMILY and x.dim() >= 2:
            units = unit_dim % x.dim()
            dims = self._dims.get((x.dim(), units))
            if dims is None:
                dims = self._dims[(x.dim(), units)] = tuple(d for d in range(x.dim()) if d != units)
            # units that are > 0 somewhere in the batch: one number kept, the per-unit maxima freed at once
            nonzero = (torch.count_nonzero(x.amax(dim=dims)), x.shape[units])
        if activation in SATURATING_BOUNDS:
            lo, hi = SATURATING_BOUNDS[activation]
            saturated = (((x <= lo + self.eps) | (x >= hi - self.eps)).sum(), x.numel())
        self._moments[layer] = (total, sq, x.numel())
        if nonzero is not None:
            self._nonzero[layer] = nonzero
        if saturated is not None:
            self._saturated[layer] = saturated

    def _const(self, key: tuple, make: Any) -> torch.Tensor:
        """A small constant tensor made once per key: a Python list copied to the device every step would make
        a GPU step wait."""
        value = self._consts.get(key)
        if value is None:
            if len(self._consts) > 64:
                self._consts.clear()
            value = self._consts[key] = make()
        return value

    def finish(self, device: torch.device, only: Optional[set[int]] = None) -> tuple[list[int], torch.Tensor]:
        """(layers in ascending order, ``(layers, 4)`` float32 rows on ``device``) of the layers recorded
        (those in ``only`` when given)."""
        layers = sorted(k for k in self._moments if only is None or k in only)
        n = len(layers)
        if not n:
            return [], torch.zeros(0, 4, device=device)
        sums = torch.stack([t.to(device) for k in layers for t in self._moments[k][:2]]).view(n, 2)
        count = self._const(("count", tuple(self._moments[k][2] for k in layers), str(device), sums.dtype),
                            lambda: torch.tensor([float(max(self._moments[k][2], 1)) for k in layers], dtype=sums.dtype,
                                                 device=device))
        mean = sums[:, 0] / count
        # sample std (Bessel's correction, as torch.std_mean's default); 0 for a single value
        std = ((sums[:, 1].square() - count * mean.square()).clamp(min=0.0) / (count - 1).clamp(min=1.0)).sqrt()
        dead = torch.zeros(n, device=device)
        relu = [k for k in layers if k in self._nonzero]
        if relu:
            pos = {k: j for j, k in enumerate(layers)}
            key = (tuple(pos[k] for k in relu), tuple(self._nonzero[k][1] for k in relu), str(device))
            units = self._const(("units", key), lambda: torch.tensor([float(u) for u in key[1]], device=device))
            alive = torch.stack([self._nonzero[k][0].to(device) for k in relu]).float()
            at = self._const(("at", key), lambda: torch.tensor(key[0], dtype=torch.long, device=device)) \
                if len(relu) != n else None
            frac = (units - alive) / units
            dead = frac if at is None else dead.index_copy_(0, at, frac)
        sat = torch.zeros(n, device=device)
        tanh = [(j, k) for j, k in enumerate(layers) if k in self._saturated]
        if tanh:
            counts = torch.stack([self._saturated[k][0].to(device, torch.float32) for _, k in tanh])
            skey = (tuple(j for j, _ in tanh), tuple(self._saturated[k][1] for _, k in tanh), str(device))
            sizes = self._const(("sizes", skey), lambda: torch.tensor([float(self._saturated[k][1]) for _, k in tanh],
                                                                       device=device))
            where = self._const(("where", skey), lambda: torch.tensor(list(skey[0]), dtype=torch.long, device=device))
            sat.index_copy_(0, where, counts / sizes)
        return layers, torch.stack([mean.float(), std.float(), dead, sat], dim=1)


__all__ = ["ActivationAccumulator"]
