from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import settings
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

warnings.filterwarnings("ignore", ".*does not have many workers.*")

# Hypothesis: CI runs 40 examples per property; benchmarks/mutation.py selects ``mutation`` (fewer examples, the
# same derandomized start) so that each of hundreds of mutants costs a fraction of a second.
settings.register_profile("ci", max_examples=40)
settings.register_profile("mutation", max_examples=15)
settings.load_profile(os.environ.get("GRADGUARD_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with overrides; logs go under ``tmp_path`` (compose sets no run dir)."""

    def _compose(overrides: Sequence[str] = (), logs: bool = True) -> DictConfig:
        GlobalHydra.instance().clear()
        extra = [f"logger.save_dir={tmp_path}"] if logs else []
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=[*extra, *overrides])

    yield _compose
    GlobalHydra.instance().clear()


#: a quick config: synthetic data, a few steps, no progress bar
FAST = [
    "data=synthetic",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.enable_checkpointing=false",
]
