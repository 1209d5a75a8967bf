"""The demo training app behind ``examples/train.py``: everything built from a composed Hydra config.

Usable without ``hydra.main`` (tests call :func:`run` on a config from ``hydra.compose``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

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


def _arguments(target: str) -> Optional[list[str]]:
    """The keyword arguments ``target`` accepts (None when it takes ``**kwargs`` or cannot be inspected)."""
    import inspect

    from hydra.utils import get_object

    try:
        obj = get_object(target)
        params = inspect.signature(obj).parameters.values()
    except Exception:  # noqa: BLE001 - an import error surfaces later, from instantiate, with its own message
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if not path:
        return f"{key} is not a valid key{hint}; valid top-level keys: {', '.join(valid)}"
    return f"{path}.{key} is not a valid key{hint}; valid keys of {path}: {', '.join(valid)}"


def check_keys(cfg: DictConfig) -> None:
    """Every key of an instantiated node (data, model, each callback, logger, trainer) must be an argument of
    its ``_target_`` — a ``+model.actvation=...`` override would otherwise end in a raw ``TypeError``."""
    nodes = [(name, cfg.get(name)) for name in ("data", "model", "logger", "trainer")]
    nodes += [(f"callbacks.{k}", v) for k, v in (cfg.get("callbacks") or {}).items()]
    for path, node in nodes:
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        valid = _arguments(str(node._target_))
        if valid is None:
            continue
        for key in node:
            if not str(key).startswith("_") and key not in valid:
                raise ConfigError(_unknown_key_message(path, str(key), valid))


def _presets(config_dir: str) -> dict[str, str]:
    """``callbacks.NAME`` -> the config group whose presets create it (from their ``# @package`` lines)."""
    from pathlib import Path

    out: dict[str, str] = {}
    for f in sorted(Path(config_dir).rglob("*.yaml")):
        first = f.read_text().splitlines()[:1]
        if first and first[0].startswith("# @package callbacks."):
            out.setdefault(first[0].split()[-1], str(f.parent.relative_to(config_dir)))
    return out


def check_overrides(overrides: list[str], config_dir: str, config_name: str = "train") -> None:
    """Compose the config with ``overrides`` as ``hydra.main`` would and turn Hydra's errors about unknown keys
    into one that lists the valid keys, or names the preset that creates a missing ``callbacks.NAME``.

    Raises:
        ConfigError: an override names a key that does not exist.
    """
    import re

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))])
    single = []
    for o in parsed:  # a sweep (-m a,b) is checked with its first value
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
        single.append(f"{o.get_key_element()}={value}" if o.value() is not None else o.input_line)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            try:
                compose(config_name=config_name, overrides=single)
                return
            except Exception as err:  # noqa: BLE001 - turned into a ConfigError below, or re-raised
                m = re.search(r"Could not override '([^']+)'", str(err)) or re.search(r"Key '([^']+)' is not in struct", str(err))
                if not m:
                    raise
                full = m.group(1)
                groups = [o for o in single if "/" in o.split("=")[0] or "." not in o.split("=")[0]]
                base = compose(config_name=config_name, overrides=[g for g in groups if not g.startswith(full)])
    finally:
        GlobalHydra.instance().clear()
    parts = full.lstrip("+~").split(".")
    node: Any = base
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, DictConfig) or part not in node:
            where = ".".join(parts[: i + 1])
            preset = _presets(config_dir).get(where)
            if preset:
                raise ConfigError(f"{full}: {where} does not exist until a preset of {preset} creates it; select one "
                                  f"first, e.g. {preset}=... ({', '.join(_options(config_dir, preset))})")
            valid = list(node) if isinstance(node, DictConfig) else []
            raise ConfigError(_unknown_key_message(".".join(parts[:i]), part, [str(k) for k in valid]))
        node = node[part]
    valid = [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, DictConfig) else []
    raise ConfigError(_unknown_key_message(".".join(parts[:-1]), parts[-1], valid))


def _options(config_dir: str, group: str) -> list[str]:
    from pathlib import Path

    return sorted(f.stem for f in (Path(config_dir) / group).glob("*.yaml"))


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate data module, model (sized from the data) and Trainer (logger and callbacks) from ``cfg``."""
    from hydra.utils import instantiate

    validate_run_config(cfg)
    check_keys(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, input_shape=list(datamodule.input_shape), num_classes=datamodule.num_classes)
    callbacks = [instantiate(entry) for entry in (cfg.get("callbacks") or {}).values() if entry is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    return datamodule, model, trainer


class _DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip: try installing litlogger/litmodels" adverts: noise that hides the demo's own lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_lightning_noise() -> None:
    """Hide two messages that every demo run would print and that say nothing about the run: Lightning's
    litlogger/litmodels tips and its ``isinstance(treespec, LeafSpec)`` deprecation warning (Lightning 2.6's own
    code on torch 2.13, nothing a user can act on). Everything else Lightning says stays."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _overrides() -> Optional[list[str]]:
    """The run's Hydra command-line overrides; None when the config was composed without ``hydra.main``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return [o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.", "trainer.enable_progress_bar"))]


def run_description(overrides: Optional[list[str]], params: dict[str, Any]) -> str:
    """``gradguard/run``: the overrides as a markdown list (``gradguard report`` reads it back), then the run's
    settings (the HParams of :func:`run_hparams`) as a table."""
    from lightning_gradguard._text import markdown_table

    if overrides is None:
        items = "- not known: the config was composed without `hydra.main`"
    else:
        items = "\n".join(f"- `{o}`" for o in overrides) or "- none: the defaults of `conf/train.yaml`"
    table = markdown_table(("setting", "value"), [(k, str(v)) for k, v in params.items()])
    return f"### overrides\n{items}\n\n### settings\n{table}"


def run_hparams(cfg: DictConfig, overrides: Optional[list[str]]) -> dict[str, Any]:
    """Hyperparameters for TensorBoard's HParams tab: every override (``key`` -> value), the model's arguments,
    the data module, epochs, seed and the callbacks on the Trainer."""
    params: dict[str, Any] = {}
    model = OmegaConf.to_container(cfg.model, resolve=True)
    params["model"] = str(model.pop("_target_", "?")).rsplit(".", 1)[-1]
    for k, v in model.items():
        params[f"model.{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    params["data"] = str(cfg.data.get("_target_", "?")).rsplit(".", 1)[-1]
    params["trainer.max_epochs"] = cfg.trainer.get("max_epochs")
    params["seed"] = cfg.get("seed")
    params["callbacks"] = ",".join(sorted(k for k, v in (cfg.get("callbacks") or {}).items() if v is not None)) or "none"
    for o in overrides or []:
        key, _, value = o.lstrip("+~").partition("=")
        params[key] = value if value else "removed"
    return {k: ("none" if v is None else v) for k, v in params.items()}


def _findings(trainer: pl.Trainer) -> list[Any]:
    from lightning_gradguard.callbacks.gradient_monitor import GradientMonitor

    for cb in trainer.callbacks:
        for c in (cb, *getattr(cb, "subs", {}).values()):
            if isinstance(c, GradientMonitor):
                return list(c.detector.findings)
    return []


def train_loss(trainer: pl.Trainer) -> float:
    """The last epoch's training loss (read it after fit: ``trainer.test`` replaces the callback metrics)."""
    value = trainer.callback_metrics.get("train/loss_epoch", trainer.callback_metrics.get("train/loss"))
    return float(value) if value is not None else float("nan")


def final_metrics(trainer: pl.Trainer, test_acc: float, test_loss: float, final_train_loss: float) -> dict[str, float]:
    """The HParams tab's metric columns: test accuracy/loss, the last epoch's training loss, finding counts."""
    from lightning_gradguard.health import REMEDY

    found = _findings(trainer)
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "final_train_loss": final_train_loss,
               "findings": float(len(found))}
    for kind in REMEDY:
        metrics[f"findings_{kind}"] = float(sum(f.kind == kind for f in found))
    return metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test, and print the test accuracy and where the TensorBoard logs are.

    Returns ``{"test_acc", "test_loss", "log_dir", "trainer", "model"}``.
    """
    quiet_lightning_noise()
    datamodule, model, trainer = build(cfg)
    from lightning_gradguard.reporting import log_hparams, log_markdown

    overrides = _overrides()
    params = run_hparams(cfg, overrides)
    # one HParams entry per run, ours (it holds the model's arguments too): Lightning's own would come first
    # and the HParams tab would show its columns instead
    model._log_hyperparams = False
    datamodule._log_hyperparams = False
    log_markdown(trainer, "gradguard/run", run_description(overrides, params), step=0)
    trainer.fit(model, datamodule=datamodule)
    final_train_loss = train_loss(trainer)
    results = trainer.test(model, datamodule=datamodule, verbose=False) if cfg.get("run_test", True) else [{}]
    test_acc = float(results[0].get("test/acc", float("nan")))
    test_loss = float(results[0].get("test/loss", float("nan")))
    log_hparams(trainer, params, final_metrics(trainer, test_acc, test_loss, final_train_loss))
    log_dir = trainer.logger.log_dir if trainer.logger is not None else None
    if trainer.is_global_zero:
        where = f"TensorBoard logs: {log_dir}" if log_dir else "no logger configured"
        print(f"test accuracy: {test_acc:.4f} (loss {test_loss:.4g}) | {where}")
        if log_dir:
            # the logger's root, so TensorBoard names the run after its version folder, not "."
            print(f"view them with: tensorboard --logdir {trainer.logger.root_dir}")
    return {"test_acc": test_acc, "test_loss": test_loss, "log_dir": log_dir, "trainer": trainer, "model": model}
