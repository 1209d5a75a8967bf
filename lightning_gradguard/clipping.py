"""Gradient clipping on any set of parameters, torch only, batched and free of host syncs.

- :func:`clip_by_value_`: each element into [-t, t] (Keras ``clipvalue``, ``torch.nn.utils.clip_grad_value_``).
- :func:`clip_by_norm_`: rescale so the global p-norm is at most t (Keras ``global_clipnorm``,
  ``torch.nn.utils.clip_grad_norm_``, same ``1e-6`` in the coefficient), optionally per group (layer).
- :func:`adaptive_clip_`: unit-wise adaptive gradient clipping, AGC (Brock et al. 2021, "High-Performance
  Large-Scale Image Recognition Without Normalization"): per output unit, ‖g‖/max(‖w‖, eps) ≤ λ. The eps
  floor keeps zero-initialized parameters trainable.
- :class:`PercentileClipper`: AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for
  Source Separation Networks"): the norm threshold is the p-th percentile of the global gradient norms seen
  so far (a ring buffer of the last ``history_size`` finite norms, on the device).
- :class:`ZScoreClipper`: ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
  Pre-Training", arXiv 2504.02507): the global norm's z-score against an EMA of its mean and variance;
  a spike is clipped to ``mean + z_thresh²/z · std`` (or to the mean). A line-by-line port of the
  ``zclip`` package's ``ZClip`` that keeps its state on the device.

All functions return tensors (never Python floats), so nothing waits for the device.

Sharded gradients (FSDP2 ``DTensor``): every function acts on the full gradients. Norms come from the local
shards and one collective (:mod:`lightning_gradguard.distributed`), so thresholds, clipping coefficients and
non-finite norms are identical on every rank; ``value`` clamps each shard in place; AGC's unit norms are
local for FSDP2's row sharding (see :func:`adaptive_clip_` for other placements).

Example:
    >>> net = torch.nn.Linear(4, 2)
    >>> net(torch.randn(8, 4)).pow(2).sum().backward()
    >>> before = clip_by_norm_(list(net.parameters()), max_norm=0.5)
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from lightning_gradguard import distributed
from lightning_gradguard.distributed import local_tensors
from lightning_gradguard.graph import LayerInfo, find_layers

Tensors = Sequence[torch.Tensor]


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def masked_slot_write_(buf: torch.Tensor, slot: torch.Tensor, write: torch.Tensor, value: torch.Tensor) -> None:
    """``buf[slot] = value`` where ``write`` is true, for 0-dim device tensors ``slot``/``write``/``value``,
    without a host sync (indexing with a device scalar, ``buf[slot]``, reads it on the host on a GPU)."""
    idx = slot.reshape(1)
    old = buf.index_select(0, idx)
    buf.index_copy_(0, idx, torch.where(write, value.to(buf.dtype).reshape(1), old))


def global_norm(params: Iterable[torch.Tensor], norm_type: Union[float, str] = 2.0,
                tensor_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The p-norm of all gradients together (as ``clip_grad_norm_`` computes it), a 0-dim tensor.

    FSDP2 ``DTensor`` gradients: the norm of the full gradients, from the local shards and one collective
    (:func:`lightning_gradguard.distributed.global_norm`), identical on every rank.

    ``tensor_sq``: the squared L2 norm of each gradient (``params``' gradients in order, local shards), when
    already computed this step (e.g. by ``GradientMonitor``'s statistics): then no gradient is read again.
    Only for ``norm_type=2``.
    """
    if tensor_sq is not None:
        if float(norm_type) != 2.0:
            raise ValueError(f"global_norm: tensor_sq is only for norm_type=2, not norm_type={norm_type!r}")
        grads = _grads(params)
        if distributed.any_dtensor(grads):
            s, _ = distributed.reduce_sum_max((tensor_sq.float() * distributed.count_weights(grads, tensor_sq.device)).sum().reshape(1))
            return s[0].sqrt()
        return tensor_sq.float().sum().sqrt()
    return distributed.global_norm(_grads(params), norm_type)


def clip_by_value_(params: Iterable[torch.Tensor], clip_value: float) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place."""
    grads = local_tensors(_grads(params))  # a DTensor's local shard is a view: clamping it clamps the shard
    if grads:
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)


def clip_by_norm_(
    params: Iterable[torch.Tensor], max_norm: Union[float, torch.Tensor], norm_type: Union[float, str] = 2.0,
    total_norm: Optional[torch.Tensor] = None, keep_nonfinite: bool = False,
) -> torch.Tensor:
    """Rescale the gradients so their global norm is at most ``max_norm``; return the norm before.

    ``keep_nonfinite=True``: when the norm is NaN/Inf the gradients are left as they are (coefficient 1,
    chosen on the device with ``torch.where``: no host read) instead of being multiplied by
    ``max_norm / inf = 0`` (which turns every Inf into NaN), so a later look still finds where it arose.
    """
    params = list(params)
    grads = local_tensors(_grads(params))
    if total_norm is None:
        total_norm = global_norm(params, norm_type)
    if grads:
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        if keep_nonfinite:
            coef = torch.where(torch.isfinite(total_norm), coef, torch.ones_like(coef))
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total_norm


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def _segment_index(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[0]*sizes[0] + [1]*sizes[1] + ...`` as a long tensor on ``device``, made once per (sizes, device): a
    list turned into a device tensor every step is a host-to-device copy every step."""
    key = (sizes, str(device))
    index = _INDEX_CACHE.get(key)
    if index is None:
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        index = _INDEX_CACHE[key] = torch.tensor([i for i, n in enumerate(sizes) for _ in range(n)], dtype=torch.long,
                                                 device=device)
    return index


def clip_by_norm_per_group_(
    groups: Sequence[Sequence[torch.Tensor]], max_norm: float, norm_type: Union[float, str] = 2.0
) -> torch.Tensor:
    """:func:`clip_by_norm_` applied to each group (e.g. each layer's parameters); return the norms before.

    All groups' norms come from one batched pass (and, for ``DTensor`` shards, one collective).
    """
    groups = [list(g) for g in groups if _grads(g)]
    if not groups:
        return torch.zeros(0)
    grads = [_grads(g) for g in groups]
    flat = [g for gs in grads for g in gs]
    parts = local_tensors(flat)
    dev = parts[0].device
    index = _segment_index(tuple(len(gs) for gs in grads), dev)
    p = float("inf") if norm_type in ("inf", float("inf")) else float(norm_type)
    norms = torch.stack([n.to(dev, torch.float32) for n in torch._foreach_norm(parts, p)])
    sharded = distributed.any_dtensor(flat)
    if p == float("inf"):
        per = torch.zeros(len(groups), device=dev).scatter_reduce_(0, index, norms, reduce="amax", include_self=True)
        _, per = distributed.reduce_sum_max(torch.zeros(0, device=dev), per, enabled=sharded)
    else:
        sq = norms * norms * (distributed.count_weights(flat, dev) if sharded else 1.0)
        per, _ = distributed.reduce_sum_max(torch.zeros(len(groups), device=dev).index_add_(0, index, sq), enabled=sharded)
        per = per.sqrt()
    coef = torch.clamp(max_norm / (per + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    torch._foreach_mul_(parts, list(coef[index].unbind(0)))
    return per


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit: over all dims but the first (one value for a bias or scalar)."""
    if x.ndim <= 1:
        return x.norm(2)
    return x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)


def _agc_(w: torch.Tensor, g: torch.Tensor, clip_factor: float, eps: float,
          w_norm: Optional[torch.Tensor] = None, g_norm: Optional[torch.Tensor] = None) -> None:
    max_norm = (unitwise_norm(w) if w_norm is None else w_norm).clamp(min=eps).mul_(clip_factor)
    g_norm = unitwise_norm(g) if g_norm is None else g_norm
    clipped = g * (max_norm / g_norm.clamp(min=1e-6))
    g.copy_(torch.where(g_norm > max_norm, clipped, g))


def adaptive_clip_(params: Iterable[torch.Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """AGC: scale each unit's gradient so ‖g_i‖ ≤ λ·max(‖w_i‖, eps) (unit = output row/filter).

    FSDP2 ``DTensor`` parameters: a weight sharded by rows (``Shard(0)``, FSDP2's placement) holds whole
    units, so its unit norms are local and exact; a sharded bias/1-d parameter (one unit) gets its norms
    from the shards' squared sums (all such parameters in one collective); any other placement (e.g.
    tensor-parallel ``Shard(1)``) is gathered whole, clipped, and this rank's shard written back (exact,
    one gather per such parameter).
    """
    params = [p for p in params if p.grad is not None]
    whole: list[torch.Tensor] = []  # 1-d shards: norms need the other ranks' squares
    for p in params:
        w, g = p.detach(), p.grad.detach()
        if not distributed.is_dtensor(w):
            _agc_(w, g, clip_factor, eps)
        elif w.ndim <= 1 and any(pl.is_shard() for pl in w.placements):
            whole.append(p)
        elif all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in w.placements):
            _agc_(distributed.local(w), distributed.local(g), clip_factor, eps)  # rows are whole units
        else:
            full_g = distributed.full_tensor(g).clone()
            _agc_(distributed.full_tensor(w), full_g, clip_factor, eps)
            distributed.write_local_(g, full_g)
    if whole:
        ws = [distributed.local(p.detach()) for p in whole]
        gs = [distributed.local(p.grad.detach()) for p in whole]
        dev = ws[0].device
        weights = distributed.count_weights(whole, dev)
        sq = torch.stack([n.float() for n in torch._foreach_norm(ws + gs, 2)]) ** 2 * weights.repeat(2)
        sq, _ = distributed.reduce_sum_max(sq)
        norms = sq.sqrt()
        for k, (w, g) in enumerate(zip(ws, gs)):
            _agc_(w, g, clip_factor, eps, w_norm=norms[k], g_norm=norms[len(ws) + k])


class ZScoreClipper:
    """ZClip: clip the global L2 norm by its z-score against an EMA of past norms, on the device.

    Reproduces ``zclip.ZClip`` (package ``zclip`` 1.0.0, ``mode="zscore"``) step for step, read from its
    source, with its defaults and argument meanings (``ema_decay`` is ZClip's ``alpha``,
    ``max_grad_norm`` its ``max_grad_norm``):

    1. ``g`` = the global L2 norm of the gradients (before clipping).
    2. Warm-up (the first ``warmup_steps`` calls): ``g`` is recorded; the gradients are clipped to
       ``max_grad_norm`` as ``torch.nn.utils.clip_grad_norm_`` does (not at all when ``None``). On the
       ``warmup_steps``-th call mean and (population) variance are set from the recorded norms; no EMA
       update on that call.
    3. Afterwards: ``z = (g - mean) / (std + eps)``. When ``z > z_thresh`` the norm is a spike and is
       clipped to ``clip_val = clip_factor · (mean + z_thresh² / z · std)`` (``clip_option=
       "adaptive_scaling"``, ZClip's default; ZClip writes it ``mean + z_thresh·std / (z / z_thresh)``)
       or to ``clip_val = mean`` (``clip_option="mean"``). The target is ``min(clip_val or g,
       max_grad_norm)``; when ``g`` exceeds it the gradients are scaled by ``target / (g + 1e-6)``.
    4. Then the EMA is updated with ``clip_val`` on a spike, else with ``g`` (note: not with the
       ``max_grad_norm``-capped value), mean first, then ``var = α·var + (1-α)·(x - new mean)²``;
       with ``skip_update_on_spike=True`` a spike leaves mean and variance as they were.

    Deliberate difference: a non-finite norm is neither recorded nor fed to the EMA (in ZClip it would
    make mean and variance NaN for the rest of the run); the gradients are left to the caller's
    non-finite policy. State (mean, var, warm-up buffer and count) lives in float64 tensors on the
    gradients' device (float32 on MPS), like ZClip's Python floats; nothing is read on the host.

    Example:
        >>> net = torch.nn.Linear(4, 2)
        >>> clipper = ZScoreClipper()          # ZClip's defaults: 0.97, 2.5, 25 warm-up steps, cap 1.0
        >>> net(torch.randn(8, 4)).pow(2).sum().backward()
        >>> norm_before, target = clipper.clip_(list(net.parameters()))
    """

    def __init__(
        self, ema_decay: float = 0.97, z_thresh: float = 2.5, max_grad_norm: Optional[float] = 1.0,
        eps: float = 1e-6, warmup_steps: int = 25, clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0, skip_update_on_spike: bool = False,
    ) -> None:
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"ZScoreClipper: clip_option={clip_option!r} is not one of: adaptive_scaling, mean")
        if warmup_steps < 1:
            raise ValueError(f"ZScoreClipper: warmup_steps={warmup_steps!r} must be an integer >= 1")
        self.ema_decay = float(ema_decay)
        self.z_thresh = float(z_thresh)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.eps = float(eps)
        self.warmup_steps = int(warmup_steps)
        self.clip_option = clip_option
        self.clip_factor = float(clip_factor)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.mean = torch.zeros((), dtype=torch.float64)
        self.var = torch.zeros((), dtype=torch.float64)
        self.buffer = torch.zeros(self.warmup_steps, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.long)  # warm-up norms recorded (≥ warmup_steps: EMA on)

    def _to(self, device: torch.device) -> None:
        if self.buffer.device != device:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            self.mean, self.var, self.buffer = (t.to(device, dtype) for t in (self.mean, self.var, self.buffer))
            self.count = self.count.to(device)

    @property
    def initialized(self) -> torch.Tensor:
        """Whether the warm-up is over (a bool tensor on the device)."""
        return self.count >= self.warmup_steps

    def clip_(
        self, params: Iterable[torch.Tensor], total_norm: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ZClip step on ``params``' gradients; return (norm before, ZClip's effective clip value:
        ``min(spike target or the norm, max_grad_norm)``; during warm-up ``max_grad_norm``; ``inf`` where
        none applies). ``total_norm``: the global norm if already computed (e.g. all-reduced)."""
        params = list(params)
        total = global_norm(params) if total_norm is None else total_norm
        self._to(total.device)
        g = total.to(self.mean.dtype)
        finite = torch.isfinite(g)
        inf = torch.full_like(g, float("inf"))
        cap = inf if self.max_grad_norm is None else torch.full_like(g, self.max_grad_norm)

        # warm-up: record, clip at the cap like clip_grad_norm_, initialize on the last warm-up call
        warm = (self.count < self.warmup_steps) & finite
        slot = torch.clamp(self.count, max=self.warmup_steps - 1)
        masked_slot_write_(self.buffer, slot, warm, g)
        just_initialized = warm & (self.count + 1 >= self.warmup_steps)
        buf_mean = self.buffer.mean()
        buf_var = (self.buffer - buf_mean).pow(2).mean()

        # after warm-up: z-score against the EMA, computed from the state before this step
        active = self.initialized & finite
        std = self.var.sqrt()
        z = (g - self.mean) / (std + self.eps)
        spike = active & (z > self.z_thresh)
        if self.clip_option == "adaptive_scaling":
            clip_val = (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
        else:
            clip_val = self.mean
        target = torch.minimum(torch.where(spike, clip_val, g), cap)
        coef = torch.where(g > target, target / (g + 1e-6), torch.ones_like(g))
        warm_coef = torch.clamp(cap / (g + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_
        coef = torch.where(active, coef, torch.where(warm, warm_coef, torch.ones_like(g)))
        grads = local_tensors(_grads(params))  # DTensor shards: scale the local views
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device, grads[0].dtype))

        # EMA update with the clipped value (or none on a spike with skip_update_on_spike)
        x = torch.where(spike, clip_val, g)
        update = active & ~spike if self.skip_update_on_spike else active
        a = self.ema_decay
        new_mean = a * self.mean + (1 - a) * x
        new_var = a * self.var + (1 - a) * (x - new_mean) ** 2
        self.mean = torch.where(update, new_mean, torch.where(just_initialized, buf_mean, self.mean))
        self.var = torch.where(update, new_var, torch.where(just_initialized, buf_var, self.var))
        self.count = self.count + warm.long()
        in_force = torch.where(active, target, torch.where(warm, cap, inf))
        return total, in_force.to(total.dtype)

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu().clone(), "var": self.var.cpu().clone(), "buffer": self.buffer.cpu().clone(),
                "count": int(self.count)}

    def load_state_dict(self, state: dict) -> None:
        device, dtype = self.buffer.device, self.buffer.dtype
        if state["buffer"].numel() != self.warmup_steps:
            raise ValueError(
                f"ZScoreClipper: the checkpoint's warm-up buffer holds {state['buffer'].numel()} norms, this "
                f"clipper has warmup_steps={self.warmup_steps}; resume with the same warmup_steps"
            )
        self.mean = state["mean"].to(device, dtype)
        self.var = state["var"].to(device, dtype)
        self.buffer = state["buffer"].to(device, dtype)
        self.count = torch.tensor(int(state["count"]), device=device)


def agc_exempt_params(model: torch.nn.Module, layers: Optional[Sequence[LayerInfo]] = None) -> set[int]:
    """The ``id`` of each parameter AGC leaves unclipped: the output layer's (the last weighted layer in forward
    order), as NFNets do (Brock et al. 2021, §4.1). ``layers``: a :func:`~lightning_gradguard.graph.find_layers`
    result already at hand."""
    layers = find_layers(model) if layers is None else layers
    return {id(p) for p in layers[-1].module.parameters()} if layers else set()


class PercentileClipper:
    """AutoClip: clip the global norm at the ``percentile``-th percentile of past global norms.

    Keeps the last ``history_size`` *finite* norms in a ring buffer on the gradients' device; until
    ``warmup_steps`` norms are recorded, clips at ``warmup_threshold`` (or not at all when ``None``).

    Free of host syncs: the ring-buffer write goes through :func:`masked_slot_write_` (indexing the history
    with the device-side slot, ``history[slot]``, would read the slot on the host), the percentile is a
    ``torch.nanquantile`` over the masked buffer, and a non-finite norm is kept out of the history with
    ``torch.where``. Nothing is read on the host in any call.

    Example:
        >>> clipper = PercentileClipper(percentile=10.0, history_size=1000, warmup_steps=5)
        >>> # each step, after backward:  norm_before, threshold = clipper.clip_(model.parameters())
    """

    def __init__(
        self, percentile: float = 10.0, history_size: int = 1000, warmup_steps: int = 10,
        warmup_threshold: Optional[float] = None, norm_type: Union[float, str] = 2.0,
    ) -> None:
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"PercentileClipper: percentile={percentile!r} must be in [0, 100]")
        if int(history_size) < 1:
            raise ValueError(f"PercentileClipper: history_size={history_size!r} must be an integer >= 1")
        if int(warmup_steps) < 0:
            raise ValueError(f"PercentileClipper: warmup_steps={warmup_steps!r} must be an integer >= 0")
        self.percentile = percentile
        self.history_size = history_size
        self.warmup_steps = warmup_steps
        self.warmup_threshold = warmup_threshold
        self.norm_type = norm_type
        self.history = torch.zeros(history_size)
        self.count = torch.zeros((), dtype=torch.long)  # finite norms recorded so far (on the device)
        self._arange: Optional[torch.Tensor] = None
        self._fallback: Optional[torch.Tensor] = None

    def _to(self, device: torch.device) -> None:
        if self.history.device != device:
            self.history = self.history.to(device)
            self.count = self.count.to(device)
        if self._arange is None or self._arange.device != device:
            self._arange = torch.arange(self.history_size, device=device)
            fallback = self.warmup_threshold if self.warmup_threshold is not None else float("inf")
            self._fallback = torch.full((), fallback, device=device)

    def threshold(self) -> torch.Tensor:
        """The percentile of the recorded norms (inf while nothing is recorded)."""
        self._to(self.history.device)
        n = torch.clamp(self.count, max=self.history_size)
        valid = self._arange < n
        data = torch.where(valid, self.history, torch.full_like(self.history, float("nan")))
        q = torch.nanquantile(data, self.percentile / 100.0)
        return torch.where(n > 0, q, torch.full_like(q, float("inf")))

    def clip_(self, params: Iterable[torch.Tensor], total_norm: Optional[torch.Tensor] = None,
              keep_nonfinite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Record this step's global norm, clip; return (norm before, threshold in force).

        ``total_norm``: the global norm if already computed (shared with the monitor, or all-reduced);
        ``keep_nonfinite``: leave the gradients as they are when the norm is NaN/Inf (see :func:`clip_by_norm_`).
        """
        params = list(params)
        total = global_norm(params, self.norm_type) if total_norm is None else total_norm
        self._to(total.device)
        finite = torch.isfinite(total)
        slot = self.count % self.history_size
        masked_slot_write_(self.history, slot, finite, total)  # non-finite norms never poison it
        self.count += finite.long()
        thr = self.threshold()
        warm = self.count < self.warmup_steps
        assert self._fallback is not None
        thr = torch.where(warm, self._fallback.to(thr.dtype), thr)
        clip_by_norm_(params, thr, self.norm_type, total_norm=total, keep_nonfinite=keep_nonfinite)
        return total, thr

    def state_dict(self) -> dict:
        return {"history": self.history.cpu().clone(), "count": int(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].clone().to(self.history.device)
        self.count = torch.tensor(int(state["count"]), device=self.history.device)
