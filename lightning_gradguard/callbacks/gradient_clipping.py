"""``GradientClipping``: value, norm, AGC, percentile (AutoClip) or z-score (ZClip) clipping at the optimizer
step, and skipping of whole optimizer steps (loss/grad-norm spikes, non-finite gradients)."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gradguard._validation import check_bool, check_choice, check_number
from lightning_gradguard.distributed import any_dtensor, check_strategy, is_multi_process, local
from lightning_gradguard.clipping import (
    PercentileClipper, ZScoreClipper, adaptive_clip_, agc_exempt_params, clip_by_norm_, clip_by_norm_per_group_,
    clip_by_value_,
    global_norm,
)
from lightning_gradguard.host_transfer import AsyncReader
from lightning_gradguard.shared_norms import step_norms_for
from lightning_gradguard.step_skip import SKIP_MODES, SpikeDetector, StepSkipper
from lightning_gradguard.graph import find_layers

ALGORITHMS = ("value", "norm", "agc", "percentile", "zscore", "none")
ON_NONFINITE = ("skip", "warn", "raise")
SKIP_SPIKES = ("loss", "grad_norm", "both")


def _forward_order(pl_module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters in forward order (registration order for a model that cannot be traced)."""
    from lightning_gradguard.stats import layer_groups

    try:
        ordered = [p for g in layer_groups(pl_module) for p in g.params]
    except Exception:  # noqa: BLE001 - an untraceable model: registration order
        ordered = []
    seen = {id(p) for p in ordered}
    return ordered + [p for p in pl_module.parameters() if id(p) not in seen]


def _norm_after(before: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The global norm after scaling every gradient by ``min(1, threshold / (before + 1e-6))`` (as
    ``clip_by_norm_`` does), without reading the gradients again."""
    return before * torch.clamp(threshold.to(before.dtype) / (before + 1e-6), max=1.0)


def first_nonfinite_parameter(pl_module: torch.nn.Module, params: list[torch.Tensor]) -> Optional[str]:
    """Name of the parameter nearest the loss (the last in forward order, so the first that backward reaches)
    whose gradient holds NaN/Inf: where the NaN first appeared (syncs; error path only)."""
    from lightning_gradguard.stats import layer_groups

    wanted = {id(p) for p in params}
    names = {id(p): n for n, p in pl_module.named_parameters()}
    try:
        ordered = [p for g in layer_groups(pl_module) for p in g.params]  # forward order
    except Exception:  # noqa: BLE001 - an untraceable model: registration order
        ordered = list(pl_module.parameters())
    for p in reversed(ordered):
        if id(p) in wanted and p.grad is not None and not bool(torch.isfinite(local(p.grad)).all()):
            return names.get(id(p))
    return None


class GradientClipping(Callback):
    """Clip gradients after they are final: after backward, AMP's unscale and DDP's all-reduce, once per
    optimizer step (so with ``accumulate_grad_batches`` only the accumulated gradient is clipped), for the
    parameters of the optimizer being stepped (each optimizer under manual optimization, where
    ``optimizer.step()`` runs the same hook). Optionally skips whole optimizer steps (spikes, non-finite).

    Args:
        algorithm: ``value`` (each element into [-threshold, threshold]), ``norm`` (global ``norm_type``-norm
            at most ``threshold``; ``per_layer=True`` for each layer's own norm), ``agc`` (unit-wise
            ‖g‖/max(‖w‖, ``eps``) ≤ ``threshold``; the output layer is skipped unless
            ``agc_clip_output_layer``), ``percentile`` (AutoClip: the ``percentile``-th percentile of past
            global norms, over the last ``history_size``; ``warmup_steps`` steps at ``warmup_threshold``),
            ``zscore`` (ZClip, exactly as ``zclip.ZClip``: see below), or ``none`` (no clipping: only the
            logged norms, ``on_nonfinite`` and ``skip_spikes``).
        threshold: the clipping threshold; for ``zscore`` ZClip's ``max_grad_norm`` (the plain norm cap during
            warm-up and the cap on every clip target afterwards; ``None``: no cap, allowed for ``zscore`` only).
        eps: AGC's floor on ‖w‖ (default ``1e-3``) or ZClip's ``eps`` in the z-score denominator (``1e-6``);
            ``None`` picks the algorithm's default.
        warmup_steps: steps before AutoClip uses its history (default 10) or before ZClip initializes its EMA
            from the norms seen (default 25); ``None`` picks the algorithm's default.
        z_thresh, ema_decay, clip_option, clip_factor, skip_update_on_spike: ZClip's ``z_thresh`` (2.5),
            ``alpha`` (0.97), ``clip_option`` (``adaptive_scaling``: clip a spike to mean + z_thresh²/z·std,
            or ``mean``), ``clip_factor`` (1.0, multiplies the adaptive target) and ``skip_update_on_spike``
            (False: the EMA takes the clipped norm; True: a spike leaves it unchanged). See
            :class:`~lightning_gradguard.clipping.ZScoreClipper` for the exact order of operations.
        skip_spikes: skip the whole optimizer step (weights and optimizer state untouched) when the ``loss``,
            the global ``grad_norm`` (before clipping) or either (``both``, as OLMo-core) is more than
            ``skip_sigma`` standard deviations above its mean over the previous ``skip_window`` steps, once
            ``skip_min_samples`` steps are recorded (default ``max(3, skip_window // 2)``). OLMo-core's
            defaults: 6 σ over 128 steps. Decided on the device; the loss is the sum of the losses passed
            to backward since the last step (the mean loss under ``accumulate_grad_batches``), averaged over
            ranks (one on-device all-reduce).
        skip_mode: how a step is skipped: ``auto`` (default), ``restore`` (sync-free: copy parameters and
            optimizer state, step, put them back with ``torch.where``) or ``sync`` (read the flag on the
            host, don't step). See :mod:`lightning_gradguard.step_skip` for the costs.
        on_nonfinite: ``warn`` (default), ``raise`` (naming the first parameter with a NaN/Inf gradient),
            or ``skip`` (skip the whole optimizer step, by the same mechanism as ``skip_spikes``, counted in
            ``gradguard/clip/nonfinite_steps``). Which ones need the host: only ``raise`` reads a flag on
            the host every step (it must stop at that step: on a GPU, one sync per step). ``skip`` decides
            on the device (but see ``skip_mode``). ``warn`` records the step, the count and the parameter
            nearest the loss on the device; the record is copied to the host without waiting and read on
            a later step once it has landed (on the CPU at once, at the same step), and at the end of fit:
            the warning names the first such step and its parameter. Under ``warn`` the step goes ahead:
            ``norm``/``percentile``/``zscore`` leave a non-finite step's gradients unscaled (a coefficient
            of 1 chosen on the device), ``value``/``agc``/``per_layer`` clip as usual. Under ``16-mixed`` with a gradient
            scaler, non-finite gradients are AMP overflows that the scaler skips by itself: they are counted
            as ``gradguard/clip/amp_overflow_steps`` and not warned about.

    Reads of the gradients: the global L2 norm comes from one ``torch._foreach_norm`` pass whose per-gradient
    norms are shared with ``GradientMonitor`` on the same Trainer (:mod:`lightning_gradguard.shared_norms`):
    whichever of the two runs first reads, the other reuses (the monitor's logging-step statistics include
    them; its every-step non-finite check uses clipping's). ``norm_after`` is computed from the norm and
    the coefficient for ``norm``/``percentile``/``zscore``/``none`` (no second read); ``value``, ``agc`` and
    ``per_layer`` read the clipped gradients' norm once more.

    Logs (through ``pl_module.log``, so every logger gets them) under ``gradguard/clip/``: ``norm_before``,
    ``norm_after``, ``threshold`` (value/norm/percentile/zscore; for zscore ZClip's effective clip value,
    ``min(spike target or the norm, threshold)``), ``clipped_fraction`` (steps clipped so far / steps), ``nonfinite_steps``, and
    ``skipped_steps`` (whole optimizer steps skipped so far) when skipping is on.

    Raises:
        ValueError / TypeError: bad arguments, at construction.
        MisconfigurationException: ``Trainer(gradient_clip_val=...)`` is also set (it would clip twice), a
            fused optimizer under 16-mixed (its gradients are still scaled in this hook), or LBFGS with
            step skipping.

    Example::

        from lightning_gradguard import GradientClipping
        trainer = Trainer(callbacks=[GradientClipping("norm", threshold=1.0)])
        trainer = Trainer(callbacks=[GradientClipping("percentile", percentile=10)])
        trainer = Trainer(callbacks=[GradientClipping("zscore", skip_spikes="loss")])  # ZClip + OLMo-core skipping
    """

    def __init__(
        self,
        algorithm: Literal["value", "norm", "agc", "percentile", "zscore", "none"] = "norm",
        threshold: Optional[float] = 1.0,
        norm_type: Union[float, Literal["inf"]] = 2.0,
        per_layer: bool = False,
        eps: Optional[float] = None,
        agc_clip_output_layer: bool = False,
        percentile: float = 10.0,
        history_size: int = 1000,
        warmup_steps: Optional[int] = None,
        warmup_threshold: Optional[float] = None,
        z_thresh: float = 2.5,
        ema_decay: float = 0.97,
        clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        skip_spikes: Optional[Literal["loss", "grad_norm", "both"]] = None,
        skip_sigma: float = 6.0,
        skip_window: int = 128,
        skip_min_samples: Optional[int] = None,
        skip_mode: Literal["auto", "restore", "sync"] = "auto",
        on_nonfinite: Literal["skip", "warn", "raise"] = "warn",
    ) -> None:
        owner = type(self).__name__
        self.algorithm = check_choice(owner, "algorithm", algorithm, ALGORITHMS)
        self.threshold = check_number(owner, "threshold", threshold, min_value=0.0, min_inclusive=False, allow_none=True)
        if threshold is None and self.algorithm != "zscore":
            raise ValueError(f"{owner}: threshold=None (no cap) needs algorithm='zscore', not algorithm={algorithm!r}")
        if norm_type not in (2, 2.0, "inf", float("inf")):
            raise ValueError(f"{owner}: norm_type={norm_type!r} is not one of: 2, inf")
        self.norm_type = "inf" if norm_type in ("inf", float("inf")) else 2.0
        if self.algorithm == "zscore" and self.norm_type != 2.0:
            raise ValueError(f"{owner}: norm_type={norm_type!r} is not allowed with algorithm='zscore' (ZClip uses the L2 norm)")
        self.per_layer = check_bool(owner, "per_layer", per_layer)
        if self.per_layer and self.algorithm != "norm":
            raise ValueError(f"{owner}: per_layer=True needs algorithm='norm', not algorithm={algorithm!r}")
        eps = check_number(owner, "eps", eps, min_value=0.0, min_inclusive=False, allow_none=True)
        self.eps = eps if eps is not None else (1e-6 if self.algorithm == "zscore" else 1e-3)
        self.agc_clip_output_layer = check_bool(owner, "agc_clip_output_layer", agc_clip_output_layer)
        self.percentile = check_number(owner, "percentile", percentile, min_value=0.0, max_value=100.0)
        self.history_size = check_number(owner, "history_size", history_size, min_value=1, integer=True)
        warmup_steps = check_number(owner, "warmup_steps", warmup_steps, min_value=0, integer=True, allow_none=True)
        self.warmup_steps = warmup_steps if warmup_steps is not None else (25 if self.algorithm == "zscore" else 10)
        if self.algorithm == "zscore" and self.warmup_steps < 1:
            raise ValueError(f"{owner}: warmup_steps={warmup_steps!r} must be >= 1 with algorithm='zscore'")
        self.warmup_threshold = check_number(
            owner, "warmup_threshold", warmup_threshold, min_value=0.0, min_inclusive=False, allow_none=True
        )
        self.z_thresh = check_number(owner, "z_thresh", z_thresh, min_value=0.0, min_inclusive=False)
        self.ema_decay = check_number(owner, "ema_decay", ema_decay, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.clip_option = check_choice(owner, "clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = check_number(owner, "clip_factor", clip_factor, min_value=0.0, min_inclusive=False)
        self.skip_update_on_spike = check_bool(owner, "skip_update_on_spike", skip_update_on_spike)
        if skip_spikes is not None:
            check_choice(owner, "skip_spikes", skip_spikes, SKIP_SPIKES)
        self.skip_spikes = skip_spikes
        self.skip_sigma = check_number(owner, "skip_sigma", skip_sigma, min_value=0.0, min_inclusive=False)
        self.skip_window = check_number(owner, "skip_window", skip_window, min_value=2, integer=True)
        self.skip_min_samples = check_number(
            owner, "skip_min_samples", skip_min_samples, min_value=3, max_value=self.skip_window + 1, integer=True,
            allow_none=True,
        )
        self.skip_mode = check_choice(owner, "skip_mode", skip_mode, SKIP_MODES)
        self.on_nonfinite = check_choice(owner, "on_nonfinite", on_nonfinite, ON_NONFINITE)
        self._percentile = (
            PercentileClipper(percentile, history_size, self.warmup_steps, warmup_threshold, self.norm_type)
            if self.algorithm == "percentile"
            else None
        )
        self._zscore = (
            ZScoreClipper(self.ema_decay, self.z_thresh, self.threshold, self.eps, self.warmup_steps, self.clip_option,
                          self.clip_factor, self.skip_update_on_spike)
            if self.algorithm == "zscore"
            else None
        )
        self._detectors = {
            kind: SpikeDetector(self.skip_sigma, self.skip_window, self.skip_min_samples)
            for kind in (("loss", "grad_norm") if skip_spikes == "both" else (skip_spikes,) if skip_spikes else ())
        }
        self._skipper = StepSkipper(self.skip_mode) if (skip_spikes or self.on_nonfinite == "skip") else None
        self._loss: Optional[torch.Tensor] = None
        self._steps = torch.zeros((), dtype=torch.long)
        self._clipped = torch.zeros((), dtype=torch.long)
        self._nonfinite = torch.zeros((), dtype=torch.long)
        self._amp_overflow = torch.zeros((), dtype=torch.long)
        self._skip_ids: set[int] = set()
        self._threshold_t: Optional[torch.Tensor] = None
        self._nf_record: Optional[torch.Tensor] = None  # warn: [count, first step, its parameter's rank, last step]
        self._nf_reader = AsyncReader()
        self._nf_warned = 0
        self._forward_rank: dict[int, int] = {}
        self._forward_names: list[str] = []
        self._rank_cache: dict[tuple, torch.Tensor] = {}
        self._layer_groups: list[list[torch.Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(algorithm=self.algorithm, threshold=self.threshold)

    # ------------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, type(self).__name__)
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise MisconfigurationException(
                f"GradientClipping({self.algorithm!r}) and Trainer(gradient_clip_val={trainer.gradient_clip_val}) "
                "would both clip the same gradients: remove gradient_clip_val from the Trainer, or drop the callback."
            )

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        layers = find_layers(pl_module)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        ordered = _forward_order(pl_module)
        self._forward_rank = {id(p): k for k, p in enumerate(ordered)}
        self._forward_names = [names.get(id(p), "?") for p in ordered]
        self._rank_cache = {}
        if self.algorithm == "agc" and not self.agc_clip_output_layer:
            self._skip_ids = agc_exempt_params(pl_module, layers)
        if self.per_layer:
            covered: set[int] = set()
            self._layer_groups = []
            for info in layers:  # a tied parameter (GPT-2's wte/lm_head) is clipped once, with its first holder
                group = [p for p in info.module.parameters() if id(p) not in covered]
                covered.update(id(p) for p in group)
                if group:
                    self._layer_groups.append(group)
            rest = [p for p in pl_module.parameters() if id(p) not in covered]
            if rest:
                self._layer_groups.append(rest)  # parameters outside weighted layers (norm layers, ...)
        for opt in trainer.optimizers:
            if getattr(opt, "_step_supports_amp_scaling", False) and getattr(trainer.precision_plugin, "scaler", None):
                raise MisconfigurationException(
                    f"GradientClipping: {type(opt).__name__} is fused (it unscales inside step), so under "
                    f"precision={trainer.precision!r} the gradients are still scaled when clipping runs. Use a "
                    "non-fused optimizer (fused=False) or bf16-mixed."
                )
        if self._skipper is not None:
            for opt in trainer.optimizers:  # after configure_optimizers (and any LR scheduler's own wrapper)
                try:
                    self._skipper.attach(opt)
                except ValueError as err:
                    raise MisconfigurationException(
                        f"GradientClipping(skip_spikes={self.skip_spikes!r}, on_nonfinite={self.on_nonfinite!r}): "
                        f"{err}; turn step skipping off or use another optimizer"
                    ) from None

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._skipper is not None:
            self._skipper.detach_all()
        self._poll_nonfinite(wait=True)  # a non-finite step whose record had not reached the host yet

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._skipper is not None:
            self._skipper.detach_all()  # also after an exception

    # ------------------------------------------------------------------------------- the loss, per batch
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # a new optimizer step begins
            self._loss = None
            if self._skipper is not None:
                self._skipper.discard()  # a request left by a step the AMP scaler did not take

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if "loss" not in self._detectors:
            return
        loss = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(scaler, "_scale", None) is not None:
            loss = loss / scaler._scale.to(loss.device)  # 16-mixed passes the scaled loss to this hook
        self._loss = loss if self._loss is None else self._loss + loss

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._skipper is not None:  # after the optimizer step: the count includes this step
            pl_module.log("gradguard/clip/skipped_steps", self._skipper.skipped.float(), on_step=True, on_epoch=False,
                          batch_size=1)

    # ------------------------------------------------------------------------------- the step
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        device = params[0].grad.device
        self._move(device)
        before, per_tensor = self._norms(trainer, optimizer, params)
        proceed, before = self._handle_nonfinite(trainer, pl_module, params, before, per_tensor)
        if not proceed:
            return
        keep = self.on_nonfinite == "warn"  # leave a non-finite step's gradients as they are (no host read)
        threshold: Optional[torch.Tensor] = None
        after: Optional[torch.Tensor] = None
        if self.algorithm == "value":
            clip_by_value_(params, self.threshold)
            threshold = self._threshold_on(device)
        elif self.algorithm == "norm":
            threshold = self._threshold_on(device)
            if self.per_layer:
                wanted = {id(p) for p in params}
                groups = [[p for p in g if id(p) in wanted] for g in self._layer_groups]
                clip_by_norm_per_group_(groups, self.threshold, self.norm_type)
            else:
                clip_by_norm_(params, self.threshold, self.norm_type, total_norm=before, keep_nonfinite=keep)
                after = _norm_after(before, threshold)
        elif self.algorithm == "agc":
            adaptive_clip_([p for p in params if id(p) not in self._skip_ids], self.threshold, self.eps)
        elif self.algorithm == "zscore":
            assert self._zscore is not None
            _, threshold = self._zscore.clip_(params, total_norm=before)
            after = _norm_after(before, threshold)
        elif self.algorithm == "percentile":
            assert self._percentile is not None
            before, threshold = self._percentile.clip_(params, total_norm=before, keep_nonfinite=keep)
            after = _norm_after(before, threshold)
        else:  # none
            after = before
        self._request_spike_skip(trainer, before)
        if after is None:  # value, agc, per-layer norm: the gradients changed in a way only a new read tells
            after = global_norm(params, self.norm_type)
        self._steps += 1
        self._clipped += (after < before * (1 - 1e-6)).long()
        metrics = {"norm_before": before, "norm_after": after, "clipped_fraction": self._clipped / self._steps,
                   "nonfinite_steps": self._nonfinite.float()}
        if threshold is not None:
            metrics["threshold"] = threshold
        for key, value in metrics.items():
            pl_module.log(f"gradguard/clip/{key}", value.float(), on_step=True, on_epoch=False, batch_size=1)

    def _norms(self, trainer: "pl.Trainer", optimizer: torch.optim.Optimizer,
               params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(global norm, each gradient's local norm² (L2) or norm (inf)): from ``GradientMonitor``'s read of
        this step when it published one, else one ``_foreach_norm`` pass, published for the monitor."""
        local_grads = [local(p.grad) for p in params]
        if self.norm_type != 2.0:
            per = torch.stack([n.float() for n in torch._foreach_norm(local_grads, float("inf"))])
            return global_norm(params, self.norm_type), per
        shared = step_norms_for(trainer)
        key = (trainer.global_step, id(optimizer))
        sq = shared.lookup(key, params)
        if sq is None:
            sq = torch.stack([n.float() for n in torch._foreach_norm(local_grads, 2)]) ** 2
            shared.publish(key, params, sq)
        return global_norm(params, 2.0, tensor_sq=sq), sq

    def _request_spike_skip(self, trainer: "pl.Trainer", grad_norm: torch.Tensor) -> None:
        """Ask the skipper to skip this step when the loss or grad norm is a spike (decided on the device)."""
        if not self._detectors or self._skipper is None:
            return
        spike = torch.zeros((), dtype=torch.bool, device=grad_norm.device)
        if "grad_norm" in self._detectors:
            spike = spike | self._detectors["grad_norm"].update(grad_norm)  # global already (DDP all-reduced)
        loss, self._loss = self._loss, None
        if "loss" in self._detectors and loss is not None:
            loss = loss.to(grad_norm.device)
            if _distributed(trainer):  # every rank must decide alike: the mean loss over ranks, on the device
                torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.SUM)
                loss = loss / trainer.world_size
            spike = spike | self._detectors["loss"].update(loss)
        self._skipper.request(spike)

    def _handle_nonfinite(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", params: list[torch.Tensor], norm: torch.Tensor,
        per_tensor: torch.Tensor,
    ) -> tuple[bool, torch.Tensor]:
        """(go on clipping?, the norm to use). ``skip``: the whole optimizer step is skipped (decided on the
        device); ``warn``: recorded on the device and warned about from :meth:`_poll_nonfinite` (no host read
        of a flag at this step); ``raise``: one flag read on the host (it must stop this step)."""
        finite = torch.isfinite(norm)
        sharded = any_dtensor([p.grad for p in params])  # then the norm is already global, equal on all ranks
        if not sharded and _distributed(trainer):
            # every rank must take the same decision (a gradient changed after DDP's all-reduce may differ);
            # an on-device all-reduce, on every rank, before any rank-dependent branch
            flag = (~finite).float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = flag == 0
            norm = torch.where(finite, norm, torch.full_like(norm, float("nan")))
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            self._amp_overflow += (~finite).long()  # the scaler skips such a step itself
            pl_module.log("gradguard/clip/amp_overflow_steps", self._amp_overflow.float(), on_step=True, batch_size=1)
            return True, norm  # clip_by_norm_ with an inf norm leaves inf/nan grads, which the scaler sees
        if self.on_nonfinite == "skip":
            assert self._skipper is not None
            self._nonfinite += (~finite).long()
            self._skipper.request(~finite)  # no host read: the skipper decides on the device
            return True, norm
        if self.on_nonfinite == "warn":
            self._record_nonfinite(trainer.global_step, params, finite, per_tensor)
            self._poll_nonfinite(wait=False)
            return True, norm
        if bool(finite):  # raise: one flag crosses to the host per step
            return True, norm
        self._nonfinite += 1
        name = first_nonfinite_parameter(pl_module, params)
        raise FloatingPointError(
            f"GradientClipping: non-finite gradient at step {trainer.global_step} in parameter {name!r} (the one "
            f"nearest the loss: where backward first produced it; global norm {float(norm)}); set "
            "on_nonfinite='skip' to skip such steps instead"
        )

    def _record_nonfinite(self, step: int, params: list[torch.Tensor], finite: torch.Tensor,
                          per_tensor: torch.Tensor) -> None:
        """On the device: count the step, and keep the first such step and its parameter nearest the loss (the
        last in forward order whose gradient norm is non-finite)."""
        dev = finite.device
        if self._nf_record is None or self._nf_record.device != dev:
            self._nf_record = torch.tensor([0.0, -1.0, -1.0, -1.0], device=dev)  # count, first step, param, last
        ids = tuple(id(p) for p in params)
        ranks = self._rank_cache.get((ids, str(dev)))
        if ranks is None:
            ranks = self._rank_cache[(ids, str(dev))] = torch.tensor(
                [float(self._forward_rank.get(i, -1)) for i in ids], device=dev)
        bad = ~finite
        nearest = torch.where(~torch.isfinite(per_tensor.to(dev)), ranks, torch.full_like(ranks, -1.0)).max()
        rec = self._nf_record
        first = bad & (rec[1] < 0)
        self._nonfinite += bad.long()
        self._nf_record = torch.stack([
            rec[0] + bad.float(),
            torch.where(first, torch.full_like(rec[1], float(step)), rec[1]),
            torch.where(first, nearest, rec[2]),
            torch.where(bad, torch.full_like(rec[3], float(step)), rec[3]),
        ])

    def _poll_nonfinite(self, wait: bool) -> None:
        """Warn about non-finite steps recorded on the device, once their record has reached the host (the copy
        is started without waiting and looked at on a later step; on the CPU at once). ``wait=True`` at the
        end of fit."""
        if self._nf_record is None:
            return
        values = self._nf_reader.wait(self._nf_record) if wait else self._nf_reader.poll(self._nf_record)
        if values is None or values[0] <= self._nf_warned:
            return
        count, first, rank, last = int(values[0]), int(values[1]), int(values[2]), int(values[3])
        name = self._forward_names[rank] if 0 <= rank < len(self._forward_names) else None
        where = f"in parameter {name!r} (the one nearest the loss: where backward first produced it)" if name else (
            "(the parameter is unknown for norm_type='inf' without per-parameter norms)")
        more = f"; {count} such steps so far, the last at step {last}" if count > 1 else ""
        how = ("gradients left unscaled" if self.algorithm in ("norm", "percentile", "zscore") and not self.per_layer
               else "gradients clipped as usual (non-finite values stay non-finite; value clipping clamps ±Inf)")
        warnings.warn(
            f"GradientClipping: non-finite gradient at step {first} {where}{more}; {how} and the optimizer steps on "
            "them (on_nonfinite='warn'; 'skip' skips such steps, 'raise' stops)", RuntimeWarning, stacklevel=2)
        self._nf_warned = count

    def _threshold_on(self, device: torch.device) -> torch.Tensor:
        """The threshold as a tensor on ``device``, made once (a host-to-device copy per step could make a
        GPU step wait)."""
        if self._threshold_t is None or self._threshold_t.device != device:
            self._threshold_t = torch.tensor(float(self.threshold), device=device)
        return self._threshold_t

    def _move(self, device: torch.device) -> None:
        if self._steps.device != device:
            self._steps, self._clipped = self._steps.to(device), self._clipped.to(device)
            self._nonfinite, self._amp_overflow = self._nonfinite.to(device), self._amp_overflow.to(device)

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "steps": int(self._steps), "clipped": int(self._clipped), "nonfinite": int(self._nonfinite),
            "amp_overflow": int(self._amp_overflow),
        }
        if self._percentile is not None:
            state["percentile"] = self._percentile.state_dict()
        if self._zscore is not None:
            state["zscore"] = self._zscore.state_dict()
        for kind, detector in self._detectors.items():
            state[f"spikes_{kind}"] = detector.state_dict()
        if self._skipper is not None:
            state["skipper"] = self._skipper.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = torch.tensor(state_dict["steps"])
        self._clipped = torch.tensor(state_dict["clipped"])
        self._nonfinite = torch.tensor(state_dict["nonfinite"])
        self._amp_overflow = torch.tensor(state_dict.get("amp_overflow", 0))
        if self._percentile is not None and "percentile" in state_dict:
            self._percentile.load_state_dict(state_dict["percentile"])
        if self._zscore is not None and "zscore" in state_dict:
            self._zscore.load_state_dict(state_dict["zscore"])
        for kind, detector in self._detectors.items():
            if f"spikes_{kind}" in state_dict:
                detector.load_state_dict(state_dict[f"spikes_{kind}"])
        if self._skipper is not None and "skipper" in state_dict:
            self._skipper.load_state_dict(state_dict["skipper"])


def _distributed(trainer: "pl.Trainer") -> bool:
    return trainer.world_size > 1 and is_multi_process()
