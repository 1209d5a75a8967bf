"""Train a model on the bundled digits data with gradguard remedies chosen from the command line.

    python examples/train.py                                   # shallow healthy MLP, >= 0.90 test accuracy
    python examples/train.py model.depth=20 model.activation=sigmoid   # stays near chance
    python examples/train.py -m model.activation=relu,tanh     # a Hydra multirun
"""

from __future__ import annotations

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from lightning_gradguard.demo.app import ConfigError, run


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["test_acc"]
    except (ConfigError, InstantiationException) as err:
        # a bad override: say which key and value, without a traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from lightning_gradguard.demo.app import check_overrides

    try:  # unknown keys: list the valid ones (Hydra's own message does not)
        check_overrides([a for a in sys.argv[1:] if not a.startswith("-")], str(Path(__file__).resolve().parents[1] / "conf"))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    main()
