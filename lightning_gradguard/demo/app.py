"""The demo training app behind ``examples/train.py``: everything built from a composed Hydra config.

Usable without ``hydra.main`` (tests call :func:`run` on a config from ``hydra.compose``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key, the value and what is allowed."""


def validate_run_config(cfg: DictConfig) -> None:
    """Checks that Lightning would accept but that make no sense for this app (e.g. infinite training)."""
    max_epochs = cfg.trainer.get("max_epochs")
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
        raise ConfigError(
            f"trainer.max_epochs={max_epochs!r} is not allowed: must be an integer >= 1 "
            "(the demo app never trains forever; Lightning's -1 means 'no limit')"
        )
    if max_epochs is None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"trainer.max_steps={max_steps!r} must be an integer >= 1 when trainer.max_epochs is null")
    callbacks = cfg.get("callbacks")
    if callbacks is None:
        return
    if not isinstance(callbacks, DictConfig):
        raise ConfigError(
            f"callbacks={OmegaConf.to_container(callbacks) if OmegaConf.is_config(callbacks) else callbacks!r} "
            "must be a mapping of name -> {_target_: ...}; select presets with callbacks=default or callbacks=none"
        )
    for name, entry in callbacks.items():
        if entry is not None and (not isinstance(entry, DictConfig) or "_target_" not in entry):
            raise ConfigError(f"callbacks.{name}={entry!r} must be a mapping with a _target_ key (or null to disable)")


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate data module, model (sized from the data) and Trainer (logger and callbacks) from ``cfg``."""
    from hydra.utils import instantiate

    validate_run_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    callbacks = [instantiate(entry) for entry in (cfg.get("callbacks") or {}).values() if entry is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    return datamodule, model, trainer


def _log_run_name(trainer: pl.Trainer) -> None:
    """Name the run after its Hydra overrides (TensorBoard text ``gradguard/run``; ``gradguard report`` shows it)."""
    from hydra.core.hydra_config import HydraConfig

    from lightning_gradguard.reporting import log_text

    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.", "trainer.enable_progress_bar"))]
        log_text(trainer, "gradguard/run", " ".join(overrides) or "(defaults)", step=0)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test, and print the test accuracy and where the TensorBoard logs are.

    Returns ``{"test_acc", "test_loss", "log_dir", "trainer", "model"}``.
    """
    datamodule, model, trainer = build(cfg)
    _log_run_name(trainer)
    trainer.fit(model, datamodule=datamodule)
    results = trainer.test(model, datamodule=datamodule, verbose=False) if cfg.get("run_test", True) else [{}]
    test_acc = float(results[0].get("test/acc", float("nan")))
    test_loss = float(results[0].get("test/loss", float("nan")))
    log_dir = trainer.logger.log_dir if trainer.logger is not None else None
    if trainer.is_global_zero:
        where = f"TensorBoard logs: {log_dir}" if log_dir else "no logger configured"
        print(f"test accuracy: {test_acc:.4f} (loss {test_loss:.4g}) | {where}")
        if log_dir:
            print(f"view them with: tensorboard --logdir {log_dir}")
    return {"test_acc": test_acc, "test_loss": test_loss, "log_dir": log_dir, "trainer": trainer, "model": model}
