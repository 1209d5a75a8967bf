"""The demo app: every config group composes and instantiates, a real fit writes TensorBoard events,
bad overrides fail with the key, the value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lightning_gradguard.demo import DeepMLP, DigitsDataModule, SmallCNN
from lightning_gradguard.demo.app import ConfigError, build, check_overrides, run
from tests.conftest import CONF_DIR
from tests.conftest import FAST
from tests.helpers import load_events

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data", ["digits", "synthetic"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_every_group_composes_and_instantiates(compose_cfg, data, model):
    shape = "data.input_shape=[1,4,4]" if data == "synthetic" else "data.batch_size=32"
    cfg = compose_cfg([f"data={data}", f"model={model}", shape])
    datamodule, module, trainer = build(cfg)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert module(x).shape == (x.shape[0], datamodule.num_classes)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.logger is not None and trainer.logger.save_dir == cfg.logger.save_dir


def test_fashion_mnist_config_composes_without_touching_disk(compose_cfg):
    cfg = compose_cfg(["data=fashion_mnist", "data.root=/nonexistent"])
    dm = instantiate(cfg.data)
    assert dm.input_shape == (1, 28, 28)
    with pytest.raises((FileNotFoundError, ImportError)):
        dm.setup("fit")


def test_callbacks_none_and_default(compose_cfg):
    for choice in ("none", "default"):
        cfg = compose_cfg([f"callbacks={choice}"])
        _, _, trainer = build(cfg)
        ours = sorted(type(cb).__name__ for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_gradguard"))
        wanted = sorted(entry["_target_"].rsplit(".", 1)[1] for entry in (cfg.get("callbacks") or {}).values())
        assert ours == wanted, (choice, ours, wanted)
        assert ours == ["GradientMonitor"]  # the monitor is on by default; no remedy until chosen
    _, _, trainer = build(compose_cfg(["callbacks=none", "~gradguard/monitor"]))
    assert not [cb for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_gradguard")]
    _, _, trainer = build(compose_cfg(["gradguard/clip=norm", "gradguard/init=auto"]))
    assert {"GradientMonitor", "GradientClipping", "WeightInitialization"} <= {type(cb).__name__ for cb in trainer.callbacks}


def test_fit_writes_tensorboard_events_that_read_back(compose_cfg, capsys, caplog):
    cfg = compose_cfg(FAST)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = run(cfg)
    out = capsys.readouterr().out
    # the demo's own lines are not buried under Lightning's adverts and its LeafSpec deprecation warning
    assert not [r for r in caplog.records if "Tip" in r.getMessage()]
    assert not [w for w in seen if "LeafSpec" in str(w.message)]
    assert any("Trainer.fit" in r.getMessage() for r in caplog.records)  # the rest of Lightning's lines stay
    assert f"TensorBoard logs: {result['log_dir']}" in out
    assert f"tensorboard --logdir {result['trainer'].logger.root_dir}" in out
    events = load_events(result["log_dir"])
    tags = events.Tags()["scalars"]
    assert "train/loss_step" in tags and "val/acc" in tags
    steps = [e.step for e in events.Scalars("train/loss_step")]
    assert len(steps) == result["trainer"].global_step  # log_every_n_steps=1
    assert 0.0 <= result["test_acc"] <= 1.0


def test_digits_split_is_fixed_and_standardized_on_train_only():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm._splits.items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    x_train = dm._splits["train"].tensors[0].flatten(1)
    assert x_train.mean(0).abs().max() < 1e-4
    x_val = dm._splits["val"].tensors[0].flatten(1)
    assert x_val.mean(0).abs().max() > 1e-3  # val was scaled with the train statistics, not its own
    dm2 = DigitsDataModule(batch_size=32)
    dm2.setup("fit")
    assert torch.equal(dm2._splits["test"].tensors[1], dm._splits["test"].tensors[1])


def test_deep_mlp_structure():
    m = DeepMLP(input_shape=[1, 8, 8], num_classes=10, depth=5, width=16, activation="tanh")
    linears = [mod for mod in m.net if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 6 and linears[0].in_features == 64 and linears[-1].out_features == 10
    assert sum(isinstance(mod, torch.nn.Tanh) for mod in m.net) == 5
    assert SmallCNN()(torch.randn(2, 1, 8, 8)).shape == (2, 10)




def _script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=300,
    )


def test_script_multirun_makes_two_runs(tmp_path):
    proc = _script(["-m", "model.activation=relu,tanh", *FAST, f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("test accuracy:") == 2
    assert len(list((tmp_path / "sweep").rglob("events.out.tfevents.*"))) >= 2


def test_script_bad_override_exits_with_message_not_traceback(tmp_path):
    proc = _script(["model.activation=sigmoidd", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode != 0
    assert "activation='sigmoidd' is not one of" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["model.actvation=sigmoid"], "model.actvation is not a valid key (did you mean 'activation'?); valid keys of model: depth, width, activation"),
    (["-m", "model.actvation=relu,tanh"], "valid keys of model: depth"),
    (["callbacks.grad_clip.threshold=0.5"], "callbacks.grad_clip does not exist until a preset of gradguard/clip creates it; "
                                            "select one first, e.g. gradguard/clip=... (agc, norm, percentile, value, zscore)"),
    (["gradguard/clip=norm", "callbacks.grad_clip.max_nrom=1"], "valid keys of callbacks.grad_clip: algorithm, threshold"),
    (["modl.depth=3"], "modl is not a valid key (did you mean 'model'?); valid top-level keys: data, model"),
])
def test_unknown_keys_list_the_valid_ones(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_overrides([o for o in overrides if not o.startswith("-")], CONF_DIR)
    assert message in str(err.value)
    check_overrides(["gradguard/clip=norm", "callbacks.grad_clip.threshold=0.5", "model.depth=3"], CONF_DIR)  # fine


def test_plus_override_of_an_unknown_argument_is_a_config_error(compose_cfg):
    cfg = compose_cfg(["+model.actvation=sigmoid"])  # '+' bypasses the struct check
    with pytest.raises(ConfigError, match=r"model.actvation is not a valid key \(did you mean 'activation'\?\)"):
        build(cfg)
