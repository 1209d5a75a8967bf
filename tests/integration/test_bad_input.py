"""The bad-input matrix: every public constructor and every config group fed wrong types, out-of-range
numbers, unknown names and misspelled keys. Each error names the field, the bad value and what is allowed."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, InstantiationException

from lightning_gradguard import (
    ActivationReplacement, BatchNormInsertion, GradGuard, GradientClipping, GradientMonitor, WeightInitialization,
)
from lightning_gradguard.demo import DeepMLP, DigitsDataModule, SequenceDataModule, SmallCNN, SyntheticDataModule, VanillaRNN
from lightning_gradguard.demo.app import ConfigError, build

CONSTRUCTORS = [
    # WeightInitialization
    (WeightInitialization, {"scheme": "he_normall"}, ["scheme='he_normall'", "he_normal", "did you mean"]),
    (WeightInitialization, {"scheme": "variance_scaling", "scale": -1.0}, ["scale=-1.0", "> 0"]),
    (WeightInitialization, {"mode": "fan_sum"}, ["mode='fan_sum'", "fan_in, fan_out, fan_avg"]),
    (WeightInitialization, {"bias": "random"}, ["bias='random'", "zeros, ones, keep"]),
    (WeightInitialization, {"overrides": {"enc.*": "xavier"}}, ["overrides['enc.*']='xavier'", "glorot_uniform"]),
    (WeightInitialization, {"overrides": ["enc.*"]}, ["overrides=['enc.*']", "mapping"]),
    (WeightInitialization, {"exclude": [3]}, ["exclude", "3"]),
    (WeightInitialization, {"lsuv_max_iters": 0}, ["lsuv_max_iters=0", ">= 1"]),
    (WeightInitialization, {"seed": 1.5}, ["seed=1.5", "integer"]),
    # GradientClipping
    (GradientClipping, {"algorithm": "clipnorm"}, ["algorithm='clipnorm'", "value, norm, agc, percentile"]),
    (GradientClipping, {"threshold": -1.0}, ["threshold=-1.0", "> 0"]),
    (GradientClipping, {"threshold": "abc"}, ["threshold='abc'", "number"]),
    (GradientClipping, {"norm_type": 1}, ["norm_type=1", "2, inf"]),
    (GradientClipping, {"percentile": 120.0}, ["percentile=120.0", "<= 100"]),
    (GradientClipping, {"on_nonfinite": "ignore"}, ["on_nonfinite='ignore'", "skip, warn, raise"]),
    (GradientClipping, {"algorithm": "value", "per_layer": True}, ["per_layer=True", "algorithm='norm'"]),
    (GradientClipping, {"history_size": 0}, ["history_size=0", ">= 1"]),
    # GradientMonitor
    (GradientMonitor, {"log_every_n_steps": 0}, ["log_every_n_steps=0", ">= 1"]),
    (GradientMonitor, {"nonfinite_check": "always"}, ["nonfinite_check='always'", "auto, every_step, logging_steps"]),
    (GradientMonitor, {"vanishing_ratio": 2.0}, ["vanishing_ratio=2.0", "<= 1.0"]),
    (GradientMonitor, {"patience": "3"}, ["patience='3'", "integer"]),
    (GradientMonitor, {"histogram_bins": 1}, ["histogram_bins=1", ">= 2"]),
    (GradientMonitor, {"warn": "yes"}, ["warn='yes'", "true or false"]),
    # BatchNormInsertion
    (BatchNormInsertion, {"position": "before"}, ["position='before'", "before_activation, after_activation"]),
    (BatchNormInsertion, {"momentum": -0.1}, ["momentum=-0.1", ">= 0.0"]),
    (BatchNormInsertion, {"eps": 0}, ["eps=0", "> 0.0"]),
    (BatchNormInsertion, {"exclude": 5}, ["exclude=5"]),
    # ActivationReplacement
    (ActivationReplacement, {"mapping": {"sigmod": "elu"}}, ["'sigmod'", "sigmoid, tanh"]),
    (ActivationReplacement, {"mapping": {"sigmoid": "eluu"}}, ["'eluu'", "leaky_relu"]),
    (ActivationReplacement, {"mapping": {"sigmoid": {"name": "elu", "slope": 1}}}, ["slope", "alpha"]),
    (ActivationReplacement, {"mapping": {"sigmoid": {"name": "prelu", "num_parameters": 3}}}, ["num_parameters=3", "per-channel"]),
    (ActivationReplacement, {"mapping": "elu"}, ["mapping='elu'", "mapping of source"]),
    # GradGuard
    (GradGuard, {"init": "yes"}, ["init='yes'", "auto, force, off"]),
    (GradGuard, {"clip_algorithm": "autoclip"}, ["clip_algorithm='autoclip'", "percentile"]),
    (GradGuard, {"trial_steps": 2}, ["trial_steps=2", ">= 4"]),
    (GradGuard, {"flow_threshold": 0}, ["flow_threshold=0", "> 0.0"]),
    (GradGuard, {"saturating_target": "sigmoid"}, ["saturating_target='sigmoid'", "elu"]),
    # demo data and models
    (DeepMLP, {"activation": "sigmoidd"}, ["activation='sigmoidd'", "sigmoid, tanh"]),
    (DeepMLP, {"depth": 0}, ["depth=0", ">= 1"]),
    (DeepMLP, {"init_std": -1.0}, ["init_std=-1.0", "> 0.0"]),
    (SmallCNN, {"input_shape": [64]}, ["input_shape=[64]", "[channels, height, width]"]),
    (VanillaRNN, {"nonlinearity": "gelu"}, ["nonlinearity='gelu'", "relu, tanh"]),
    (DigitsDataModule, {"val_fraction": 0.9}, ["val_fraction=0.9", "<= 0.5"]),
    (SyntheticDataModule, {"input_shape": [0]}, ["input_shape=[0]", "positive"]),
    (SequenceDataModule, {"length": 2}, ["length=2", ">= 4"]),
]


@pytest.mark.parametrize("cls, kwargs, words", CONSTRUCTORS, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in CONSTRUCTORS])
def test_constructor_errors_name_field_value_and_allowed(cls, kwargs, words):
    with pytest.raises((ValueError, TypeError)) as info:
        cls(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert cls.__name__ in str(info.value) or "mapping" in str(info.value)


CONFIGS = [
    (["gradguard/init=auto", "callbacks.weight_init.scheme=glorot"], InstantiationException, ["scheme='glorot'", "glorot_uniform"]),
    (["gradguard/init=auto", "callbacks.weight_init.shceme=x"], ConfigCompositionException, ["callbacks.weight_init.shceme"]),
    (["gradguard/clip=norm", "callbacks.grad_clip.threshold=abc"], InstantiationException, ["threshold='abc'", "number"]),
    (["gradguard/clip=norm", "callbacks.grad_clip.max_nrom=1"], ConfigCompositionException, ["callbacks.grad_clip.max_nrom"]),
    (["gradguard/clip=nrom"], ConfigCompositionException, ["gradguard/clip", "nrom"]),
    (["gradguard/monitor=default", "callbacks.grad_monitor.patience=0"], InstantiationException, ["patience=0", ">= 1"]),
    (["gradguard/batchnorm=before", "callbacks.batchnorm.position=middle"], InstantiationException, ["position='middle'", "before_activation"]),
    (["gradguard/activation=elu", "+callbacks.activation.mapping.swish=elu"], InstantiationException, ["'swish'", "sigmoid"]),
    (["gradguard=auto", "callbacks.gradguard.batchnorm=maybe"], InstantiationException, ["batchnorm='maybe'", "auto, force, off"]),
    (["model.activation=sigmoidd"], InstantiationException, ["activation='sigmoidd'", "sigmoid, tanh"]),
    (["model=rnn", "model.recurrent_gain=-1"], InstantiationException, ["recurrent_gain=-1", ">= 0.0"]),
    (["data.batch_size=abc"], InstantiationException, ["batch_size='abc'", "integer"]),
    (["data=sequence", "data.length=1"], InstantiationException, ["length=1", ">= 4"]),
    (["trainer.max_epochs=-1"], ConfigError, ["trainer.max_epochs=-1", ">= 1"]),
    (["model.foo=1"], ConfigCompositionException, ["model.foo"]),
    (["callbacks.x=3"], ConfigCompositionException, ["callbacks.x"]),
]


@pytest.mark.parametrize("overrides, exc, words", CONFIGS, ids=[o[-1] for o, _, _ in CONFIGS])
def test_config_errors_name_key_value_and_allowed(compose_cfg, overrides, exc, words):
    with pytest.raises(exc) as info:
        build(compose_cfg(overrides))
    text = str(info.value) + str(getattr(info.value, "__cause__", ""))
    for w in words:
        assert w in text, (w, text)
