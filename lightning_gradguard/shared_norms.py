"""One read of the gradients per optimizer step for monitoring and clipping together.

:class:`StepNorms` holds the squared L2 norm of each gradient of one optimizer step, published by whichever
of ``GradientMonitor`` and ``GradientClipping`` computed them first (the monitor on a logging step, with its
statistics; clipping every step, with its global norm), and looked up by the other: the global norm, the
non-finite check and the per-layer non-finite flags then cost no further pass over the gradients.

A published set is valid for one key (the Trainer's ``global_step`` and the optimizer) and holds the norms of
the gradients *as they were when published*: clipping publishes the norms before it clips.

Example:
    >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    >>> norms = StepNorms()
    >>> norms.publish((0, 1), [a, b], torch.tensor([2.0, 3.0]))
    >>> norms.lookup((0, 1), [b, a]).tolist()
    [3.0, 2.0]
    >>> norms.lookup((1, 1), [a]) is None              # another step
    True
"""

from __future__ import annotations

import weakref
from typing import Any, Hashable, Optional, Sequence

import torch

from lightning_gradguard.host_transfer import to_device


class StepNorms:
    """The per-gradient squared L2 norms of one optimizer step, shared (see the module docstring)."""

    def __init__(self) -> None:
        self._key: Optional[Hashable] = None
        self._pos: dict[int, int] = {}
        self._sq: Optional[torch.Tensor] = None
        self._order: Optional[tuple[int, ...]] = None
        self._index: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        #: how many lookups were answered (tests and benchmarks read it)
        self.hits = 0

    def publish(self, key: Hashable, params: Sequence[torch.Tensor], sq: torch.Tensor) -> None:
        """``sq[i]`` is the squared norm of ``params[i].grad`` (this rank's local part) at step ``key``."""
        order = tuple(id(p) for p in params)
        if order != self._order:
            self._order = order
            self._pos = {pid: i for i, pid in enumerate(order)}
            self._index = {}
        self._key, self._sq = key, sq

    def lookup(self, key: Hashable, params: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The squared norms of ``params``' gradients in that order, or ``None`` when they were not published
        for ``key`` (another step or optimizer, or a parameter not among them)."""
        if self._sq is None or key != self._key:
            return None
        want = tuple(self._pos.get(id(p), -1) for p in params)
        if -1 in want:
            return None
        cache_key = (want, str(self._sq.device))
        index = self._index.get(cache_key)
        if index is None:
            index = self._index[cache_key] = to_device(want, self._sq.device, torch.long)
        self.hits += 1
        return self._sq.index_select(0, index)

    def clear(self) -> None:
        self._key, self._sq = None, None


_BY_OWNER: "weakref.WeakKeyDictionary[Any, StepNorms]" = weakref.WeakKeyDictionary()


def step_norms_for(owner: Any) -> StepNorms:
    """The one :class:`StepNorms` of ``owner`` (a Trainer): every callback of a Trainer shares it."""
    norms = _BY_OWNER.get(owner)
    if norms is None:
        norms = _BY_OWNER[owner] = StepNorms()
    return norms


__all__ = ["StepNorms", "step_norms_for"]
