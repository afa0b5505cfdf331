"""DeepMind's pre-activation ResNet-18 (RobustBench's ``DMPreActResNet``) as a functional Keras model.

SiLU activations; each block is BN-SiLU-conv3x3-BN-SiLU-conv3x3 with a shortcut that is a 3x3
convolution of the block's input itself (not of its activation) where the stride or width
changes. Stride-2 convolutions are padded (0, 1, 0, 1) by hand in the reference, which is
``same`` padding here; the head averages the last 4x4 map. BatchNormalization momentum 0.99 and
epsilon 1e-5, as DeepMind trained it. The layers are created in the order
:func:`tfrobust.zoo.names.entries` lists them.
"""

from __future__ import annotations

import keras

from tfrobust.models import LOGITS_LAYER, NORMALIZATION_LAYER

_MOMENTUM, _EPSILON = 0.99, 1e-5


def _bn():
    return keras.layers.BatchNormalization(momentum=_MOMENTUM, epsilon=_EPSILON)


def _conv(filters, kernel, stride):
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)


def _block(x, filters: int, stride: int):
    bn_0, conv_1, bn_1, conv_2 = _bn(), _conv(filters, 3, stride), _bn(), _conv(filters, 3, 1)
    shortcut = _conv(filters, 3, stride) if stride != 1 or x.shape[-1] != filters else None
    out = keras.layers.Activation("silu")(bn_0(x))
    out = conv_1(out)
    out = conv_2(keras.layers.Activation("silu")(bn_1(out)))
    return keras.layers.Add()([out, shortcut(x) if shortcut is not None else x])


def dm_preact_resnet18(input_shape, num_classes: int, mean=None, std=None) -> keras.Model:
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="images")
    x = inputs
    if mean is not None:
        variance = [s * s for s in std]
        x = keras.layers.Normalization(axis=-1, mean=list(mean), variance=variance, name=NORMALIZATION_LAYER)(x)
    x = _conv(64, 3, 1)(x)
    for g in range(4):
        for i in range(2):
            x = _block(x, 64 * 2**g, 2 if g and not i else 1)
    x = keras.layers.Activation("silu")(_bn()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name="dm_preact_resnet18")


__all__ = ["dm_preact_resnet18"]
