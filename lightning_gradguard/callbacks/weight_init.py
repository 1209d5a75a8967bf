"""``WeightInitialization``: activation-matched init applied once at the start of ``fit``."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_gradguard._validation import check_bool, check_choice, check_number, check_patterns
from lightning_gradguard.callbacks._common import run_when_model_exists, sample_batch_provider
from lightning_gradguard.callbacks._lightning_internals import checkpoint_path_in_setup
from lightning_gradguard.callbacks._surgery_base import run_surgery_first
from lightning_gradguard.distributed import broadcast_object, check_strategy
from lightning_gradguard.init import (
    AUTO_DISTRIBUTIONS, BIAS_POLICIES, DISTRIBUTIONS, FAN_CONVENTIONS, LAYER_SCHEMES, MODES, SCHEMES, InitRecord, format_table,
    initialize,
)
from lightning_gradguard.reporting import log_text, print_table

_DONE_ATTR = "_gradguard_initialized"


class WeightInitialization(Callback):
    """Initialize every weighted layer to match the activation that follows it (Keras semantics).

    Runs once, in ``setup("fit")`` (or right after ``configure_model`` for models built there), before
    the optimizer exists. Never on ``validate``/``test``/``predict``, never twice on the same module, and
    not when ``fit`` resumes from a checkpoint (``ckpt_path=...``): the trained weights are kept. The schemes, fans and
    ``auto`` rules are documented in :mod:`lightning_gradguard.init`.

    Args:
        scheme: ``auto`` (default), ``glorot_uniform``, ``glorot_normal``, ``he_uniform``, ``he_normal``,
            ``lecun_uniform``, ``lecun_normal``, ``variance_scaling``, ``orthogonal``, ``lsuv``, ``zeros``, ``ones``.
        distribution: for ``auto``: ``normal`` (truncated, Keras's ``*_normal``) or ``uniform``.
        fan_convention: ``data_flow`` (default) or ``keras``: how ConvTranspose and recurrent fans are
            counted where the two differ (see :func:`lightning_gradguard.init.compute_fans`).
        scale, mode, vs_distribution: for ``variance_scaling``.
        gain: for ``orthogonal``.
        bias: ``zeros`` (default), ``ones`` or ``keep``.
        overrides: module-name pattern → scheme, e.g. ``{"encoder.*": "lecun_normal"}``.
        exclude: module-name patterns never touched.
        strict: an override/exclude pattern that matches no layer is an error (raised at ``setup``).
        seed: seed of the init's own generator; default: Lightning's ``seed_everything`` seed if set.
        lsuv_tol, lsuv_max_iters: LSUV's target tolerance and iteration bound.
        verbose: print the table (it is always written to TensorBoard text ``gradguard/init``).
        force: also re-initialize weights that are not fresh from construction. By default they are kept,
            and the table says why: adapters (``lora_*``), a Hugging Face model loaded with
            ``from_pretrained``, weights that look trained (:mod:`lightning_gradguard.pretrained`). A tied
            parameter is initialized once, by its owner (the embedding), either way.

    Raises:
        ValueError / TypeError: at construction, naming the field, the value and what is allowed.

    Example::

        from lightning_gradguard import WeightInitialization
        trainer = Trainer(callbacks=[WeightInitialization("auto")])
    """

    def __init__(
        self,
        scheme: Literal[
            "auto", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal",
            "variance_scaling", "orthogonal", "lsuv", "zeros", "ones",
        ] = "auto",
        distribution: Literal["normal", "uniform"] = "normal",
        fan_convention: Literal["data_flow", "keras"] = "data_flow",
        scale: float = 1.0,
        mode: Literal["fan_in", "fan_out", "fan_avg"] = "fan_in",
        vs_distribution: Literal["truncated_normal", "untruncated_normal", "uniform"] = "truncated_normal",
        gain: float = 1.0,
        bias: Literal["zeros", "ones", "keep"] = "zeros",
        overrides: Optional[Mapping[str, str]] = None,
        exclude: Optional[Sequence[str]] = None,
        strict: bool = False,
        seed: Optional[int] = None,
        lsuv_tol: float = 0.1,
        lsuv_max_iters: int = 10,
        verbose: bool = True,
        force: bool = False,
    ) -> None:
        owner = type(self).__name__
        self.scheme = check_choice(owner, "scheme", scheme, SCHEMES)
        self.distribution = check_choice(owner, "distribution", distribution, AUTO_DISTRIBUTIONS)
        self.fan_convention = check_choice(owner, "fan_convention", fan_convention, FAN_CONVENTIONS)
        self.scale = check_number(owner, "scale", scale, min_value=0.0, min_inclusive=False)
        self.mode = check_choice(owner, "mode", mode, MODES)
        self.vs_distribution = check_choice(owner, "vs_distribution", vs_distribution, DISTRIBUTIONS)
        self.gain = check_number(owner, "gain", gain, min_value=0.0, min_inclusive=False)
        self.bias = check_choice(owner, "bias", bias, BIAS_POLICIES)
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(f"{owner}: overrides={overrides!r} must be a mapping of module-name pattern -> scheme")
        self.overrides = {str(k): v for k, v in dict(overrides or {}).items()}
        for pattern, value in self.overrides.items():
            check_choice(owner, f"overrides[{pattern!r}]", value, LAYER_SCHEMES)
        self.exclude = check_patterns(owner, "exclude", exclude)
        self.strict = check_bool(owner, "strict", strict)
        self.seed = check_number(owner, "seed", seed, integer=True, allow_none=True)
        self.lsuv_tol = check_number(owner, "lsuv_tol", lsuv_tol, min_value=0.0, min_inclusive=False)
        self.lsuv_max_iters = check_number(owner, "lsuv_max_iters", lsuv_max_iters, min_value=1, integer=True)
        self.verbose = check_bool(owner, "verbose", verbose)
        self.force = check_bool(owner, "force", force)
        self.records: list[InitRecord] = []
        self.resumed = False
        self.resumed_from: Optional[str] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.scheme)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or getattr(pl_module, _DONE_ATTR, False):
            return
        check_strategy(trainer.strategy, type(self).__name__)
        run_surgery_first(trainer, pl_module, stage)  # init must see the final layers and activations
        self.resumed_from = checkpoint_path_in_setup(trainer)
        if self.resumed_from:  # a trained model is never re-initialized
            self.resumed = True
            setattr(pl_module, _DONE_ATTR, True)
            return
        sample = sample_batch_provider(trainer, pl_module)

        def apply() -> None:
            self.records = initialize(
                pl_module, self.scheme, distribution=self.distribution, fan_convention=self.fan_convention,
                scale=self.scale, mode=self.mode,
                vs_distribution=self.vs_distribution, gain=self.gain, bias=self.bias, overrides=self.overrides,
                exclude=self.exclude, strict=self.strict, seed=self.seed,
                sample_input=broadcast_object(sample()) if self.scheme == "lsuv" else sample, lsuv_tol=self.lsuv_tol,
                lsuv_max_iters=self.lsuv_max_iters, force=self.force,
            )
            setattr(pl_module, _DONE_ATTR, True)

        run_when_model_exists(pl_module, apply)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.resumed_from:
            rank_zero_info(f"gradguard weight initialization: skipped, resuming from {self.resumed_from}")
            return
        if not self.records:
            return
        table = format_table(self.records)
        if self.resumed:
            table = "resumed from a checkpoint: its weights replaced this init\n" + table
        if self.verbose:
            print_table(f"gradguard weight initialization ({self.scheme})", table)
        log_text(trainer, "gradguard/init", table, step=0)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": bool(self.records), "scheme": self.scheme}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed = bool(state_dict.get("applied", False))
