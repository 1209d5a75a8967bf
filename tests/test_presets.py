"""Every Hydra preset's values reach the callback it builds, and an override changes what the callback does.

An ``isinstance`` check after ``instantiate`` passes for a preset whose values are ignored; these tests read
each YAML file independently of Hydra, compare every key with the built callback's attribute of the same
name, and then run the callback to see the value take effect.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from torch import nn

from lightning_gradguard import GradientClipping, WeightInitialization

from tests.conftest import CONF_DIR, FAST

PRESETS = sorted(
    p for p in Path(CONF_DIR, "gradguard").rglob("*.yaml") if "_target_" in p.read_text()
)


def _first_positive_float(path: Path):
    raw = yaml.safe_load(path.read_text())
    return next((k for k, v in raw.items() if isinstance(v, float) and v > 0), None)


NUMERIC_PRESETS = [p for p in PRESETS if _first_positive_float(p)]


def _preset_override(path: Path) -> str:
    rel = path.relative_to(Path(CONF_DIR)).with_suffix("")
    return f"{rel.parent}={rel.name}"


def _callback_key(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# @package callbacks."), f"{path}: first line must be '# @package callbacks.NAME'"
    return first.split("callbacks.", 1)[1].strip()


_MISSING = object()


def _value_of(callback, key: str):
    """Where a callback keeps a constructor argument: an attribute of that name, or GradGuard's per-remedy
    ``modes``, or the monitor's health detector's field of that name."""
    if hasattr(callback, key):
        return getattr(callback, key)
    if key in getattr(callback, "modes", {}):
        return callback.modes[key]
    detector = getattr(callback, "detector", None)
    return getattr(detector, key, _MISSING)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b))
    if isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(b, dict):  # ActivationReplacement stores a mapping's targets normalized as {"name": ...}
        a = {k: v["name"] if isinstance(v, dict) and isinstance(b.get(k), str) else v for k, v in dict(a).items()}
        return a == dict(b)
    return a == b


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: _preset_override(p))
def test_every_preset_value_reaches_the_callback(compose_cfg, path):
    raw = yaml.safe_load(path.read_text())
    cfg = compose_cfg([_preset_override(path)])
    callback = instantiate(cfg.callbacks[_callback_key(path)])
    assert type(callback).__name__ == raw["_target_"].rsplit(".", 1)[1]
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        got = _value_of(callback, key)
        assert got is not _MISSING, f"{path.name}: key {key!r} is kept nowhere in {type(callback).__name__}"
        assert _same(got, value), f"{path.name}: {key}={value!r} but the callback has {got!r}"


@pytest.mark.parametrize("path", NUMERIC_PRESETS, ids=lambda p: _preset_override(p))
def test_an_override_of_a_numeric_preset_value_reaches_the_callback(compose_cfg, path):
    raw = yaml.safe_load(path.read_text())
    key = _first_positive_float(path)
    new = raw[key] * 2
    name = _callback_key(path)
    callback = instantiate(compose_cfg([_preset_override(path), f"callbacks.{name}.{key}={new}"]).callbacks[name])
    assert _value_of(callback, key) == pytest.approx(new)


@pytest.mark.parametrize("threshold", [0.05, 0.5])
def test_clip_norm_preset_threshold_bounds_the_gradients_a_fit_sees(compose_cfg, threshold):
    """The preset's threshold, overridden from the command line, is the norm the optimizer then sees."""
    from lightning_gradguard.demo.app import build

    cfg = compose_cfg([*FAST, "gradguard/clip=norm", f"callbacks.grad_clip.threshold={threshold}", "callbacks=none"])
    dm, model, trainer = build(cfg)
    clip = next(cb for cb in trainer.callbacks if isinstance(cb, GradientClipping))
    seen: list[float] = []
    import lightning.pytorch as pl

    class After(pl.Callback):  # runs after GradientClipping in the callback list
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer.callbacks.append(After())
    trainer.fit(model, datamodule=dm)
    assert clip.threshold == threshold and seen
    assert max(seen) <= threshold * (1 + 1e-4)
    assert max(seen) >= 0.5 * threshold  # the gradients are larger than the threshold: it is what bounds them


@pytest.mark.parametrize("preset,scheme", [("he_uniform", "he_uniform"), ("lecun_normal", "lecun_normal"), ("glorot_uniform", "glorot_uniform")])
def test_init_preset_scheme_is_the_one_applied(compose_cfg, preset, scheme):
    cfg = compose_cfg([f"gradguard/init={preset}", "callbacks.weight_init.seed=0"])
    callback = instantiate(cfg.callbacks.weight_init)
    assert isinstance(callback, WeightInitialization)
    from lightning_gradguard.init import initialize

    net = nn.Sequential(nn.Linear(200, 300), nn.ReLU(), nn.Linear(300, 10))
    records = initialize(net, callback.scheme, seed=callback.seed)
    assert [r.scheme for r in records] == [scheme, scheme]
    fan_in, fan_out = 200, 300
    var = {"he_uniform": 2 / fan_in, "lecun_normal": 1 / fan_in, "glorot_uniform": 2 / (fan_in + fan_out)}[scheme]
    assert float(net[0].weight.var()) == pytest.approx(var, rel=0.05)
