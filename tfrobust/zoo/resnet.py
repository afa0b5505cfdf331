"""torchvision's bottleneck ResNets (ResNet-50/101/152, WideResNet-50-2/101-2) as functional Keras models.

The ImageNet networks of RobustBench's ImageNet entries, in torchvision's layout (v1.5: the
stride sits on the 3x3 convolution). PyTorch pads symmetrically, also before its stride-2
convolutions and the stem's max pooling, which TensorFlow's ``same`` would not (it pads the
bottom and right only for even sizes), so those get an explicit ``ZeroPadding2D``; zeros are
the max pooling's ``-inf`` padding because its input has passed a ReLU. BatchNormalization
momentum 0.9 and epsilon 1e-5 (PyTorch's defaults). Any input size works (the head averages
globally, as torchvision's adaptive pooling does). The layers are created in the order
:func:`tfrobust.zoo.names.entries` lists them.
"""

from __future__ import annotations

import keras

from tfrobust.models import LOGITS_LAYER, NORMALIZATION_LAYER
from tfrobust.zoo.names import RESNET_BLOCKS

_MOMENTUM, _EPSILON = 0.9, 1e-5


def _bn():
    return keras.layers.BatchNormalization(momentum=_MOMENTUM, epsilon=_EPSILON)


def _conv(x, conv, pad: int):
    return conv(keras.layers.ZeroPadding2D(pad)(x) if pad else x)


def _bottleneck(x, width: int, c_out: int, stride: int, project: bool):
    conv1, bn1 = keras.layers.Conv2D(width, 1, use_bias=False), _bn()
    conv2, bn2 = keras.layers.Conv2D(width, 3, strides=stride, use_bias=False), _bn()
    conv3, bn3 = keras.layers.Conv2D(c_out, 1, use_bias=False), _bn()
    if project:
        down_conv, down_bn = keras.layers.Conv2D(c_out, 1, strides=stride, use_bias=False), _bn()
    out = keras.layers.ReLU()(bn1(conv1(x)))
    out = keras.layers.ReLU()(bn2(_conv(out, conv2, 1)))
    out = bn3(conv3(out))
    shortcut = down_bn(down_conv(x)) if project else x
    return keras.layers.ReLU()(keras.layers.Add()([out, shortcut]))


def torchvision_resnet(depth: int, width_factor: int, input_shape, num_classes: int, mean=None, std=None) -> keras.Model:
    inputs = keras.Input(shape=tuple(input_shape), dtype="float32", name="images")
    x = inputs
    if mean is not None:
        x = keras.layers.Normalization(axis=-1, mean=list(mean), variance=[s * s for s in std], name=NORMALIZATION_LAYER)(x)
    stem_conv, stem_bn = keras.layers.Conv2D(64, 7, strides=2, use_bias=False), _bn()
    x = keras.layers.ReLU()(stem_bn(_conv(x, stem_conv, 3)))
    x = keras.layers.MaxPooling2D(3, strides=2)(keras.layers.ZeroPadding2D(1)(x))
    for stage, count in enumerate(RESNET_BLOCKS[depth]):
        planes = 64 * 2**stage
        for i in range(count):
            x = _bottleneck(x, planes * width_factor, planes * 4, 2 if stage and not i else 1, i == 0)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    name = f"resnet{depth}" if width_factor == 1 else f"wide_resnet{depth}_{width_factor}"
    return keras.Model(inputs, outputs, name=name)


__all__ = ["torchvision_resnet"]
