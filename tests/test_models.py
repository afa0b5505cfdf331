"""Tests of tfrobust.models: shapes, the logits layer, normalisation, seeds, sizes."""

import keras
import numpy as np
import pytest

from tfrobust.errors import UserError
from tfrobust.models import LOGITS_LAYER, MODELS, NORMALIZATION_LAYER, build_model

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def _trainable_count(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _images(shape, n=2, seed=0):
    return np.random.default_rng(seed).random((n,) + shape).astype(np.float32)


CASES = [
    ("small_cnn", (28, 28, 1), 10, (0.2860,), (0.3530,), {}),
    ("small_cnn", (32, 32, 3), 10, CIFAR_MEAN, CIFAR_STD, {}),
    ("preact_resnet18", (32, 32, 3), 10, CIFAR_MEAN, CIFAR_STD, {}),
    ("wide_resnet", (32, 32, 3), 100, CIFAR_MEAN, CIFAR_STD, {"depth": 10, "width": 1}),
    ("wide_resnet", (28, 28, 1), 10, None, None, {"depth": 10, "width": 2}),
]


@pytest.mark.parametrize("name, shape, classes, mean, std, kwargs", CASES)
def test_builds_and_maps_batch_to_logits(name, shape, classes, mean, std, kwargs):
    model = build_model(name, shape, classes, mean, std, seed=0, **kwargs)
    assert isinstance(model, keras.Model)
    logits = np.asarray(model(_images(shape, 3), training=False))
    assert logits.shape == (3, classes)
    assert np.isfinite(logits).all()
    # Raw logits, not probabilities.
    assert not np.allclose(logits.sum(axis=1), 1.0)
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense) and last.name == LOGITS_LAYER
    assert model.get_layer(LOGITS_LAYER) is last
    assert last.use_bias and last.bias is not None
    assert last.kernel.shape[-1] == classes
    assert last.activation in (None, keras.activations.linear)
    if mean is None:
        assert not any(isinstance(layer, keras.layers.Normalization) for layer in model.layers)
    else:
        norm = model.get_layer(NORMALIZATION_LAYER)
        assert isinstance(norm, keras.layers.Normalization)
        # The first layer after the input.
        assert model.layers[1] is norm
        assert norm.trainable_weights == []


def test_normalisation_is_applied():
    x = _images((32, 32, 3), 4)
    with_norm = build_model("small_cnn", (32, 32, 3), 10, CIFAR_MEAN, CIFAR_STD, seed=5)
    other_mean = build_model("small_cnn", (32, 32, 3), 10, (0.1, 0.2, 0.3), CIFAR_STD, seed=5)
    without = build_model("small_cnn", (32, 32, 3), 10, seed=5)
    out = np.asarray(with_norm(x))
    assert not np.allclose(out, np.asarray(other_mean(x)), atol=1e-4)
    # The layer computes (x - mean) / std.
    manual = (x - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)
    np.testing.assert_allclose(out, np.asarray(without(manual)), rtol=1e-4, atol=1e-4)
    assert _trainable_count(with_norm) == _trainable_count(without)


@pytest.mark.parametrize(
    "name, shape, kwargs",
    [("small_cnn", (28, 28, 1), {}), ("wide_resnet", (32, 32, 3), {"depth": 10, "width": 1})],
)
def test_seed_gives_identical_weights(name, shape, kwargs):
    a = build_model(name, shape, 10, seed=123, **kwargs)
    b = build_model(name, shape, 10, seed=123, **kwargs)
    c = build_model(name, shape, 10, seed=124, **kwargs)
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    assert len(wa) == len(wb) == len(wc)
    for u, v in zip(wa, wb):
        np.testing.assert_array_equal(u, v)
    kernels = [i for i, w in enumerate(wa) if w.ndim >= 2]
    assert all(not np.array_equal(wa[i], wc[i]) for i in kernels)
    # Different layers of one model do not share their draws.
    first_two = [wa[i] for i in kernels[:2]]
    assert first_two[0].shape != first_two[1].shape or not np.array_equal(*first_two)
    x = _images(shape, 2)
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_small_cnn_architecture():
    model = build_model("small_cnn", (28, 28, 1), 10, seed=0)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64]
    assert model.layers[-2].units == 256
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_small_cnn_width_multiplier():
    model = build_model("small_cnn", (28, 28, 1), 10, cnn_width=2, seed=0)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [64, 128]
    assert model.layers[-2].units == 512
    # 28 -> conv 26 -> pool 13 -> conv 11 -> pool 5: 5 * 5 * 128 inputs to the hidden layer.
    expected = (3 * 3 * 1 * 64 + 64) + (3 * 3 * 64 * 128 + 128) + (5 * 5 * 128 * 512 + 512) + (512 * 10 + 10)
    assert _trainable_count(model) == expected
    with pytest.raises(UserError, match="cnn_width"):
        build_model("small_cnn", (28, 28, 1), 10, cnn_width=0)


def test_preact_resnet18_size_and_layers():
    model = build_model("preact_resnet18", (32, 32, 3), 10, CIFAR_MEAN, CIFAR_STD, seed=0)
    assert abs(_trainable_count(model) - 11.17e6) / 11.17e6 < 0.01
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    # Stem, 8 blocks of two 3x3 convolutions, three 1x1 shortcuts.
    assert len(convs) == 1 + 16 + 3
    assert sorted(c.filters for c in convs if c.kernel_size == (1, 1)) == [128, 256, 512]
    assert all(not c.use_bias for c in convs)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 17
    assert all(bn.momentum == pytest.approx(0.9) and bn.epsilon == pytest.approx(1e-5) for bn in bns)
    assert model.get_layer(LOGITS_LAYER).kernel.shape == (512, 10)


def test_wide_resnet_34_10_size():
    model = build_model("wide_resnet", (32, 32, 3), 10, CIFAR_MEAN, CIFAR_STD, seed=0)
    assert abs(_trainable_count(model) - 46.16e6) / 46.16e6 < 0.01
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * 5 * 2 + 3
    assert all(not c.use_bias for c in convs)
    assert model.get_layer(LOGITS_LAYER).kernel.shape == (640, 10)


def test_wide_resnet_width_and_depth():
    model = build_model("wide_resnet", (32, 32, 3), 10, depth=16, width=2, seed=0)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * 2 * 2 + 3
    assert model.get_layer(LOGITS_LAYER).kernel.shape == (128, 10)
    for depth in (33, 4, 12):
        with pytest.raises(UserError, match="depth"):
            build_model("wide_resnet", (32, 32, 3), 10, depth=depth, width=1)
    with pytest.raises(UserError, match="width"):
        build_model("wide_resnet", (32, 32, 3), 10, depth=10, width=0)


def test_bad_arguments():
    with pytest.raises(UserError) as err:
        build_model("resnet50", (32, 32, 3), 10)
    assert "resnet50" in str(err.value)
    for name in MODELS:
        assert name in str(err.value)
    with pytest.raises(UserError, match="per channel"):
        build_model("small_cnn", (32, 32, 3), 10, mean=(0.5,), std=(0.2,))
    with pytest.raises(UserError, match="std"):
        build_model("small_cnn", (28, 28, 1), 10, mean=(0.5,), std=(0.0,))
    with pytest.raises(UserError, match="input_shape"):
        build_model("small_cnn", (28, 28), 10)
