"""Initialization against Keras 3 itself (torch backend), layer by layer.

README says the schemes follow Keras. Keras counts fans from its kernel shapes; for most layers that is the
same as the data flow, for two it is not (ConvTranspose, recurrent kernels). ``fan_convention="keras"``
must match Keras exactly there; the default ``data_flow`` differs by the factor stated in
:func:`lightning_gradguard.init.compute_fans`, which these tests pin down too.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
from keras.src.initializers.random_initializers import compute_fans as keras_fans  # noqa: E402

from lightning_gradguard.init import compute_fans, initialize  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="Keras must run on its torch backend")

SCHEMES = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal")


def _std(x) -> float:
    return float(torch.as_tensor(keras.ops.convert_to_numpy(x)).double().std())


def _keras_kernel(layer, input_shape) -> torch.Tensor:
    keras.utils.set_random_seed(0)
    layer.build(input_shape)
    return torch.as_tensor(keras.ops.convert_to_numpy(layer.kernel if hasattr(layer, "kernel") else layer.embeddings))


# (torch module, the same layer in Keras, Keras's input shape, the torch weight's Keras layout)
LAYERS = {
    "dense": (lambda: nn.Linear(96, 160), lambda init: keras.layers.Dense(160, kernel_initializer=init), (None, 96)),
    "conv1d": (lambda: nn.Conv1d(24, 40, 5), lambda init: keras.layers.Conv1D(40, 5, kernel_initializer=init), (None, 32, 24)),
    "conv2d": (lambda: nn.Conv2d(12, 48, 3), lambda init: keras.layers.Conv2D(48, 3, kernel_initializer=init), (None, 16, 16, 12)),
    "conv2d_transpose": (
        lambda: nn.ConvTranspose2d(64, 8, 3),
        lambda init: keras.layers.Conv2DTranspose(8, 3, kernel_initializer=init),
        (None, 16, 16, 64),
    ),
    "embedding": (
        lambda: nn.Embedding(300, 64),
        lambda init: keras.layers.Embedding(300, 64, embeddings_initializer=init),
        (None, 5),
    ),
}


def _keras_layout_shape(name: str, w: torch.Tensor) -> tuple[int, ...]:
    """The shape Keras gives the same layer's kernel."""
    if name == "dense":
        return (w.shape[1], w.shape[0])
    if name.startswith("conv") and "transpose" not in name:
        return (*w.shape[2:], w.shape[1], w.shape[0])  # (*k, in, filters)
    if name == "conv2d_transpose":
        return (*w.shape[2:], w.shape[1], w.shape[0])  # (*k, filters, in): torch's (in, filters, *k)
    return tuple(w.shape)  # embedding: (input_dim, output_dim) in both


@pytest.mark.parametrize("name", list(LAYERS))
def test_keras_convention_fans_equal_keras_own_fans(name):
    make, _, _ = LAYERS[name]
    m = make()
    assert compute_fans(m, convention="keras") == tuple(keras_fans(_keras_layout_shape(name, m.weight)))


def test_data_flow_fans_differ_from_keras_only_for_conv_transpose():
    for name, (make, _, _) in LAYERS.items():
        m = make()
        same = compute_fans(m) == compute_fans(m, convention="keras")
        assert same == (name != "conv2d_transpose"), name
    t = nn.ConvTranspose2d(64, 8, 3)
    assert compute_fans(t) == (64 * 9, 8 * 9)  # input channels in, as the data flows
    assert compute_fans(t, convention="keras") == (8 * 9, 64 * 9)  # Keras: filters are the kernel's dim -2


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_weights_have_keras_std(name, scheme):
    make, keras_layer, input_shape = LAYERS[name]
    k = _keras_kernel(keras_layer(keras.initializers.get(scheme)), input_shape)
    m = make()
    net = nn.Sequential(m)
    overrides = {"0": scheme}
    initialize(net, scheme, overrides=overrides, fan_convention="keras", seed=0)
    ours = m.weight.detach().double()
    assert ours.numel() == k.numel()
    assert float(ours.std()) == pytest.approx(float(k.double().std()), rel=0.04)
    if scheme.endswith("uniform"):  # same bound: max |w| within one bin of Keras's limit
        assert float(ours.abs().max()) == pytest.approx(float(k.abs().max()), rel=0.01)
    else:  # truncated at 2 std in both
        assert float(ours.abs().max()) <= 2.0 * float(k.double().std()) / 0.8796 * 1.01


@pytest.mark.parametrize("kind,gates", [("LSTM", 4), ("GRU", 3)])
def test_recurrent_kernels_match_keras_with_keras_fans(kind, gates):
    units, n_in = 48, 80
    keras.utils.set_random_seed(0)
    layer = getattr(keras.layers, kind)(units)
    layer.build((None, 7, n_in))
    cell = layer.cell
    k_kernel = torch.as_tensor(keras.ops.convert_to_numpy(cell.kernel)).double()  # (in, gates·units) glorot_uniform
    k_rec = torch.as_tensor(keras.ops.convert_to_numpy(cell.recurrent_kernel)).double()  # (units, gates·units) orthogonal
    assert tuple(k_kernel.shape) == (n_in, gates * units)

    rnn = getattr(nn, kind)(n_in, units)
    initialize(nn.Sequential(rnn), "glorot_uniform", fan_convention="keras", seed=0)
    w_ih = rnn.weight_ih_l0.detach().double()
    assert float(w_ih.std()) == pytest.approx(float(k_kernel.std()), rel=0.04)
    assert float(w_ih.abs().max()) == pytest.approx(math.sqrt(6.0 / (n_in + gates * units)), rel=0.01)

    # recurrent kernel: "auto" gives Keras's orthogonal recurrent_initializer, as one matrix with keras fans
    rnn2 = getattr(nn, kind)(n_in, units)
    initialize(nn.Sequential(rnn2), "auto", fan_convention="keras", seed=0)
    w_hh = rnn2.weight_hh_l0.detach().double()  # (gates·units, units) = Keras's recurrent_kernel transposed
    assert torch.allclose(w_hh.T @ w_hh, torch.eye(units, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(k_rec @ k_rec.T, torch.eye(units, dtype=torch.float64), atol=1e-5)
    assert float(w_hh.std()) == pytest.approx(float(k_rec.std()), rel=0.05)


@pytest.mark.parametrize("kind,gates", [("LSTM", 4), ("GRU", 3)])
def test_recurrent_data_flow_convention_is_per_gate(kind, gates):
    """The default differs from Keras on purpose: each gate block gets its own fans and orthogonal block."""
    units, n_in = 48, 80
    rnn = getattr(nn, kind)(n_in, units)
    initialize(nn.Sequential(rnn), "auto", seed=0)
    w_ih = rnn.weight_ih_l0.detach().double()
    w_hh = rnn.weight_hh_l0.detach().double()
    for g in range(gates):
        blk = w_hh[g * units : (g + 1) * units]
        assert torch.allclose(blk @ blk.T, torch.eye(units, dtype=torch.float64), atol=1e-5)
    # glorot per gate: variance 2/(in + units), Keras's is 2/(in + gates·units)
    assert float(w_ih.var()) == pytest.approx(2.0 / (n_in + units), rel=0.06)


def test_bad_fan_convention_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"fan_convention='kears'.*data_flow, keras"):
        initialize(nn.Sequential(nn.Linear(2, 2)), "auto", fan_convention="kears")
    from lightning_gradguard import WeightInitialization

    with pytest.raises(ValueError, match=r"fan_convention='per_gate'"):
        WeightInitialization(fan_convention="per_gate")
