"""``GradientClipping``: value, norm, AGC or percentile (AutoClip) clipping at the optimizer step."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gradguard._validation import check_bool, check_choice, check_number
from lightning_gradguard.clipping import (
    PercentileClipper, adaptive_clip_, clip_by_norm_, clip_by_norm_per_group_, clip_by_value_, global_norm,
)
from lightning_gradguard.graph import find_layers

ALGORITHMS = ("value", "norm", "agc", "percentile")
ON_NONFINITE = ("skip", "warn", "raise")


def first_nonfinite_parameter(pl_module: torch.nn.Module, params: list[torch.Tensor]) -> Optional[str]:
    """Name of the first parameter (in registration order) whose gradient holds NaN/Inf (syncs; error path)."""
    wanted = {id(p) for p in params}
    for name, p in pl_module.named_parameters():
        if id(p) in wanted and p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return None


class GradientClipping(Callback):
    """Clip gradients after they are final: after backward, AMP's unscale and DDP's all-reduce, once per
    optimizer step (so with ``accumulate_grad_batches`` only the accumulated gradient is clipped), for the
    parameters of the optimizer being stepped (each optimizer under manual optimization, where
    ``optimizer.step()`` runs the same hook).

    Args:
        algorithm: ``value`` (each element into [-threshold, threshold]), ``norm`` (global ``norm_type``-norm
            at most ``threshold``; ``per_layer=True`` for each layer's own norm), ``agc`` (unit-wise
            ‖g‖/max(‖w‖, ``eps``) ≤ ``threshold``; the output layer is skipped unless
            ``agc_clip_output_layer``), ``percentile`` (AutoClip: the ``percentile``-th percentile of past
            global norms, over the last ``history_size``; ``warmup_steps`` steps at ``warmup_threshold``).
        on_nonfinite: ``warn`` (default), ``raise`` (naming the first parameter with a NaN/Inf gradient),
            or ``skip`` (zero all gradients of that step, counted in ``gradguard/clip/nonfinite_steps``).
            ``warn``/``raise`` read one flag from the device per step; ``skip`` never waits for the device.
            Under ``16-mixed`` with a gradient scaler, non-finite gradients are AMP overflows that the scaler
            skips by itself: they are counted as ``gradguard/clip/amp_overflow_steps`` and not warned about.

    Logs (through ``pl_module.log``, so every logger gets them) under ``gradguard/clip/``: ``norm_before``,
    ``norm_after``, ``threshold`` (value/norm/percentile), ``clipped_fraction`` (steps clipped so far /
    steps), ``nonfinite_steps``.

    Raises:
        ValueError / TypeError: bad arguments, at construction.
        MisconfigurationException: ``Trainer(gradient_clip_val=...)`` is also set (it would clip twice), or
            a fused optimizer under 16-mixed (its gradients are still scaled in this hook).

    Example::

        from lightning_gradguard import GradientClipping
        trainer = Trainer(callbacks=[GradientClipping("norm", threshold=1.0)])
        trainer = Trainer(callbacks=[GradientClipping("percentile", percentile=10)])
    """

    def __init__(
        self,
        algorithm: Literal["value", "norm", "agc", "percentile"] = "norm",
        threshold: float = 1.0,
        norm_type: Union[float, Literal["inf"]] = 2.0,
        per_layer: bool = False,
        eps: float = 1e-3,
        agc_clip_output_layer: bool = False,
        percentile: float = 10.0,
        history_size: int = 1000,
        warmup_steps: int = 10,
        warmup_threshold: Optional[float] = None,
        on_nonfinite: Literal["skip", "warn", "raise"] = "warn",
    ) -> None:
        owner = type(self).__name__
        self.algorithm = check_choice(owner, "algorithm", algorithm, ALGORITHMS)
        self.threshold = check_number(owner, "threshold", threshold, min_value=0.0, min_inclusive=False)
        if norm_type not in (2, 2.0, "inf", float("inf")):
            raise ValueError(f"{owner}: norm_type={norm_type!r} is not one of: 2, inf")
        self.norm_type = "inf" if norm_type in ("inf", float("inf")) else 2.0
        self.per_layer = check_bool(owner, "per_layer", per_layer)
        if self.per_layer and self.algorithm != "norm":
            raise ValueError(f"{owner}: per_layer=True needs algorithm='norm', not algorithm={algorithm!r}")
        self.eps = check_number(owner, "eps", eps, min_value=0.0, min_inclusive=False)
        self.agc_clip_output_layer = check_bool(owner, "agc_clip_output_layer", agc_clip_output_layer)
        self.percentile = check_number(owner, "percentile", percentile, min_value=0.0, max_value=100.0)
        self.history_size = check_number(owner, "history_size", history_size, min_value=1, integer=True)
        self.warmup_steps = check_number(owner, "warmup_steps", warmup_steps, min_value=0, integer=True)
        self.warmup_threshold = check_number(
            owner, "warmup_threshold", warmup_threshold, min_value=0.0, min_inclusive=False, allow_none=True
        )
        self.on_nonfinite = check_choice(owner, "on_nonfinite", on_nonfinite, ON_NONFINITE)
        self._percentile = (
            PercentileClipper(percentile, history_size, warmup_steps, warmup_threshold, self.norm_type)
            if self.algorithm == "percentile"
            else None
        )
        self._steps = torch.zeros((), dtype=torch.long)
        self._clipped = torch.zeros((), dtype=torch.long)
        self._nonfinite = torch.zeros((), dtype=torch.long)
        self._amp_overflow = torch.zeros((), dtype=torch.long)
        self._skip_ids: set[int] = set()
        self._threshold_t: Optional[torch.Tensor] = None
        self._layer_groups: list[list[torch.Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(algorithm=self.algorithm, threshold=self.threshold)

    # ------------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise MisconfigurationException(
                f"GradientClipping({self.algorithm!r}) and Trainer(gradient_clip_val={trainer.gradient_clip_val}) "
                "would both clip the same gradients: remove gradient_clip_val from the Trainer, or drop the callback."
            )

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        layers = find_layers(pl_module)
        if self.algorithm == "agc" and not self.agc_clip_output_layer and layers:
            output = layers[-1].module  # the last weighted layer in forward order (NFNets leave it unclipped)
            self._skip_ids = {id(p) for p in output.parameters()}
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

    # ------------------------------------------------------------------------------- the step
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        device = params[0].grad.device
        self._move(device)
        before = global_norm(params, self.norm_type) if self.algorithm != "percentile" else None
        if before is not None:
            proceed, before = self._handle_nonfinite(trainer, pl_module, params, before)
            if not proceed:
                return
        threshold: Optional[torch.Tensor] = None
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
                clip_by_norm_(params, self.threshold, self.norm_type, total_norm=before)
        elif self.algorithm == "agc":
            adaptive_clip_([p for p in params if id(p) not in self._skip_ids], self.threshold, self.eps)
        else:
            assert self._percentile is not None
            before, threshold = self._percentile.clip_(params)
            proceed, before = self._handle_nonfinite(trainer, pl_module, params, before)
            if not proceed:
                return
        after = global_norm(params, self.norm_type)
        self._steps += 1
        self._clipped += (after < before * (1 - 1e-6)).long()
        metrics = {"norm_before": before, "norm_after": after, "clipped_fraction": self._clipped / self._steps,
                   "nonfinite_steps": self._nonfinite.float()}
        if threshold is not None:
            metrics["threshold"] = threshold
        for key, value in metrics.items():
            pl_module.log(f"gradguard/clip/{key}", value.float(), on_step=True, on_epoch=False, batch_size=1)

    def _handle_nonfinite(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", params: list[torch.Tensor], norm: torch.Tensor
    ) -> tuple[bool, torch.Tensor]:
        """(go on clipping?, the norm to use): a non-finite step under warn is left alone; under skip its
        gradients are zeroed and its norm reads 0, so the clipping that follows leaves them at zero."""
        finite = torch.isfinite(norm)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
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
            self._nonfinite += (~finite).long()
            for p in params:  # zero the step's gradients without reading the flag on the host
                p.grad.mul_(finite.to(p.grad.dtype)).nan_to_num_(0.0, 0.0, 0.0)
            return True, torch.where(finite, norm, torch.zeros_like(norm))
        if bool(finite):  # one flag crosses to the host per step for warn/raise
            return True, norm
        self._nonfinite += 1
        name = first_nonfinite_parameter(pl_module, params)
        message = (
            f"GradientClipping: non-finite gradient at step {trainer.global_step} in parameter {name!r} "
            f"(global norm {float(norm)})"
        )
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message + "; set on_nonfinite='skip' to zero such steps instead")
        warnings.warn(message + "; gradients left unclipped (on_nonfinite='warn')", RuntimeWarning, stacklevel=2)
        return False, norm

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
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = torch.tensor(state_dict["steps"])
        self._clipped = torch.tensor(state_dict["clipped"])
        self._nonfinite = torch.tensor(state_dict["nonfinite"])
        self._amp_overflow = torch.tensor(state_dict.get("amp_overflow", 0))
        if self._percentile is not None and "percentile" in state_dict:
            self._percentile.load_state_dict(state_dict["percentile"])
