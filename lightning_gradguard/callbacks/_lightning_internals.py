"""The Lightning internals the callbacks cannot do without, in one place.

Checked against Lightning 2.6.x (2.6.6). ``tests/test_lightning_internals.py`` exercises each one in a real
``Trainer`` and fails, naming the assumption, when an upgrade breaks it; at run time a broken assumption
warns instead of passing silently. Why each is needed (no public API covers it in 2.6):

- :func:`checkpoint_path_in_setup`: Lightning restores a checkpoint *after* the callbacks' ``setup`` and
  ``configure_model``, and sets the public ``trainer.ckpt_path`` only then. Surgery and init must know in
  ``setup`` that a resume is coming (re-apply recorded decisions, never re-initialize). The path is the
  ``ckpt_path`` argument of ``Trainer._run``, read from its frame.
- :func:`after_configure_model`: no callback hook runs between ``configure_model`` and the checkpoint
  restore / ``configure_optimizers``; the instance's ``configure_model`` is wrapped once and put back.
  Lightning calls it through ``getattr`` on the instance (``call._call_configure_model``).
- :func:`logging_muted`: ``LightningModule.log`` raises outside the Trainer's loops; GradGuard's probe calls
  ``training_step`` during ``setup``, so ``log`` / ``log_dict`` are shadowed on the instance meanwhile.
- :func:`fit_dataloader`: the loader given to ``trainer.fit(model, train_dataloaders=...)`` is reachable
  during ``setup`` only through ``trainer.fit_loop._data_source`` (``trainer.train_dataloader`` is set later,
  in the fit loop's ``setup_data``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

LIGHTNING_CHECKED = "2.6"


def _changed(what: str) -> None:
    rank_zero_warn(f"lightning_gradguard: {what} (checked against Lightning {LIGHTNING_CHECKED}.x; this is "
                   f"{pl.__version__}): please report it")


def checkpoint_path_in_setup(trainer: "pl.Trainer") -> Optional[str]:
    """The ``ckpt_path`` the running ``trainer.fit`` will restore, if any, while still in ``setup``."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
                if "ckpt_path" not in frame.f_locals:
                    _changed("Trainer._run has no ckpt_path argument: a resumed fit cannot be detected in setup")
                    return None
                path = frame.f_locals["ckpt_path"]
                return str(path) if path else None
            frame = frame.f_back
    finally:
        del frame
    return None if trainer.ckpt_path is None else str(trainer.ckpt_path)  # outside a Trainer run: what it knows


def after_configure_model(pl_module: "pl.LightningModule", action: Callable[[], None]) -> None:
    """Run ``action`` right after the module's ``configure_model`` (wrapped on the instance, removed after)."""
    original = pl_module.configure_model

    def configure_model_then_act() -> None:
        try:
            original()
        finally:
            if pl_module.__dict__.get("configure_model") is configure_model_then_act:
                del pl_module.__dict__["configure_model"]
        action()

    pl_module.configure_model = configure_model_then_act  # type: ignore[method-assign]


@contextlib.contextmanager
def logging_muted(pl_module: "pl.LightningModule") -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` are no-ops inside the block (``training_step`` outside the loops)."""
    muted = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
    pl_module.__dict__.update(muted)
    try:
        yield
    finally:
        for name in muted:
            pl_module.__dict__.pop(name, None)


def fit_dataloader(trainer: "pl.Trainer") -> Optional[Any]:
    """The training dataloader given to ``fit`` (or the module's ``train_dataloader``), during ``setup``."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not hasattr(source, "is_defined") or not hasattr(source, "dataloader"):
        _changed("trainer.fit_loop._data_source is gone: the training data cannot be read during setup")
        return None
    return source.dataloader() if source.is_defined() else None
