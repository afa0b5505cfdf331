"""Image classifiers as functional Keras models.

Every model takes ``float32`` NHWC images in ``[0, 1]``, normalises them per
channel inside the model (so attacks work in pixel space), and ends in a
``Dense`` layer named ``"logits"`` that returns raw logits. Defenses that act
on the last layer's weights find it with ``model.get_layer("logits")``.

* ``small_cnn``: two convolutions, two poolings and two dense layers.
* ``preact_resnet18``: the pre-activation ResNet-18 of He et al. (2016),
  identity mappings, as used for CIFAR-10 adversarial training.
* ``wide_resnet``: WideResNet-depth-width of Zagoruyko & Komodakis (2016),
  pre-activation, no dropout; WRN-34-10 by default.
* ``wide_resnet_swish``: the SiLU ("swish") WideResNet of Gowal et al. (2020)
  and Wang et al. (2023), e.g. WRN-28-10 (36.5M parameters) and WRN-70-16
  (266.8M): pre-activation blocks with a 1x1 shortcut only where the width
  changes, stride-2 convolutions padded by one pixel on the bottom and right
  only (the references' manual padding), BatchNormalization momentum 0.99
  (PyTorch's 0.01), He-normal (fan-out) convolution kernels, a zero-bias
  logits layer. :func:`wide_resnet_swish_parameters` counts its parameters
  without building it.

BatchNormalization uses momentum 0.9 and epsilon 1e-5 (PyTorch's defaults)
except in ``wide_resnet_swish``; ResNet convolutions have no bias.

``model.name`` may also name the user's own network (:func:`network_for`): a
``.keras`` file, or ``module:function``, a function called as
``function(input_shape=(H, W, C), num_classes=K)`` that returns a Keras model.
Either must map float32 images in [0, 1] to logits.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Optional

import keras
import numpy as np

from tfrobust.config import MODEL_NAMES
from tfrobust.errors import UserError, first_line, unknown_choice, user_code
from tfrobust.loading import evaluated_network, load_keras_file
from tfrobust.network_checks import SUPPORTED_IO, check_network_io

MODELS = MODEL_NAMES

LOGITS_LAYER = "logits"
NORMALIZATION_LAYER = "normalize"

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


class _Initializers:
    """Hands out initializers whose seeds derive from one model seed, one per layer."""

    def __init__(self, seed: Optional[int]):
        self.seed = seed
        self.count = 0

    def _next_seed(self) -> Optional[int]:
        if self.seed is None:
            return None
        self.count += 1
        return (int(self.seed) * 1_000_003 + self.count) % (2**31 - 1)

    def conv(self):
        return keras.initializers.HeNormal(seed=self._next_seed())

    def dense(self):
        return keras.initializers.GlorotUniform(seed=self._next_seed())


def _normalize(x, mean, std, channels: int):
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.ones_like(mean) if std is None else np.asarray(std, dtype=np.float64).reshape(-1)
    if mean.size != channels or std.size != channels:
        raise UserError(
            f"normalisation needs one mean and one std per channel ({channels}), got {mean.size} and {std.size}"
        )
    if np.any(std <= 0):
        raise UserError(f"normalisation std must be > 0, got {tuple(std)}")
    layer = keras.layers.Normalization(
        axis=-1, mean=mean.tolist(), variance=(std**2).tolist(), name=NORMALIZATION_LAYER
    )
    return layer(x)


def _bn_relu(x):
    x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON)(x)
    return keras.layers.ReLU()(x)


def _conv3x3(x, filters: int, stride: int, init: _Initializers):
    """A 3x3 convolution padded by one pixel on every side, as in the reference networks."""
    if stride == 1:
        return keras.layers.Conv2D(
            filters, 3, strides=1, padding="same", use_bias=False, kernel_initializer=init.conv()
        )(x)
    x = keras.layers.ZeroPadding2D(1)(x)
    return keras.layers.Conv2D(
        filters, 3, strides=stride, padding="valid", use_bias=False, kernel_initializer=init.conv()
    )(x)


def _conv1x1(x, filters: int, stride: int, init: _Initializers):
    return keras.layers.Conv2D(
        filters, 1, strides=stride, padding="valid", use_bias=False, kernel_initializer=init.conv()
    )(x)


def _preact_block(x, filters: int, stride: int, init: _Initializers):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    The shortcut is the identity when the shape is kept, else a 1x1 convolution
    of the pre-activated input.
    """
    in_filters = x.shape[-1]
    out = _bn_relu(x)
    if stride != 1 or in_filters != filters:
        shortcut = _conv1x1(out, filters, stride, init)
    else:
        shortcut = x
    out = _conv3x3(out, filters, stride, init)
    out = _bn_relu(out)
    out = _conv3x3(out, filters, 1, init)
    return keras.layers.Add()([out, shortcut])


def _head(x, num_classes: int, init: _Initializers):
    x = _bn_relu(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.layers.Dense(num_classes, use_bias=True, kernel_initializer=init.dense(), name=LOGITS_LAYER)(x)


def _small_cnn(x, num_classes: int, init: _Initializers, cnn_width: int = 1):
    x = keras.layers.Conv2D(32 * cnn_width, 3, activation="relu", kernel_initializer=init.dense())(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(64 * cnn_width, 3, activation="relu", kernel_initializer=init.dense())(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256 * cnn_width, activation="relu", kernel_initializer=init.dense())(x)
    return keras.layers.Dense(num_classes, use_bias=True, kernel_initializer=init.dense(), name=LOGITS_LAYER)(x)


def _preact_resnet18(x, num_classes: int, init: _Initializers):
    x = _conv3x3(x, 64, 1, init)
    for filters, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = _preact_block(x, filters, stride, init)
        x = _preact_block(x, filters, 1, init)
    return _head(x, num_classes, init)


def _wide_resnet(x, num_classes: int, depth: int, width: int, init: _Initializers):
    blocks = (depth - 4) // 6
    x = _conv3x3(x, 16, 1, init)
    for filters, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
        for i in range(blocks):
            x = _preact_block(x, filters, stride if i == 0 else 1, init)
    return _head(x, num_classes, init)


_SWISH_BN_MOMENTUM = 0.99  # PyTorch momentum 0.01 in the references


def _swish_bn(x):
    x = keras.layers.BatchNormalization(momentum=_SWISH_BN_MOMENTUM, epsilon=_BN_EPSILON)(x)
    return keras.layers.Activation("silu")(x)


def _swish_conv(x, filters: int, kernel: int, stride: int, seed: Optional[int]):
    """A bias-free convolution initialised N(0, 2 / (k * k * filters)), as the references."""
    init = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal", seed=seed)
    if kernel == 3 and stride == 2:
        # The references pad (0, 1, 0, 1) by hand before a stride-2 convolution.
        x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
        padding = "valid"
    else:
        padding = "same" if kernel == 3 else "valid"
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, kernel_initializer=init)(x)


def _swish_block(x, filters: int, stride: int, init: _Initializers):
    """BN-SiLU-conv3x3-BN-SiLU-conv3x3; a 1x1 shortcut of the activated input where the width changes."""
    has_shortcut = x.shape[-1] != filters
    activated = _swish_bn(x)
    out = _swish_conv(activated, filters, 3, stride, init._next_seed())
    out = _swish_bn(out)
    out = _swish_conv(out, filters, 3, 1, init._next_seed())
    shortcut = _swish_conv(activated, filters, 1, stride, init._next_seed()) if has_shortcut else x
    return keras.layers.Add()([shortcut, out])


def _wide_resnet_swish(x, num_classes: int, depth: int, width: int, init: _Initializers):
    blocks = (depth - 4) // 6
    x = _swish_conv(x, 16, 3, 1, init._next_seed())
    for filters, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
        for i in range(blocks):
            x = _swish_block(x, filters, stride if i == 0 else 1, init)
    x = _swish_bn(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # PyTorch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the references zero the bias.
    kernel_init = keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform", seed=init._next_seed())
    return keras.layers.Dense(num_classes, kernel_initializer=kernel_init, bias_initializer="zeros", name=LOGITS_LAYER)(x)


def wide_resnet_swish_parameters(depth: int, width: int, num_classes: int = 10, channels: int = 3,
                                 trainable_only: bool = True) -> int:
    """The parameter count of ``wide_resnet_swish`` computed from its layer shapes.

    ``trainable_only`` counts what PyTorch's ``parameters()`` counts (the
    published sizes); False adds the BatchNorm moving statistics.
    """
    bn = 2 if trainable_only else 4
    blocks = (depth - 4) // 6
    total, c_in = 9 * channels * 16, 16
    for c_out in (16 * width, 32 * width, 64 * width):
        for _ in range(blocks):
            total += bn * c_in + 9 * c_in * c_out + bn * c_out + 9 * c_out * c_out + (c_in * c_out if c_in != c_out else 0)
            c_in = c_out
    return total + bn * c_in + c_in * num_classes + num_classes


def build_model(
    name: str,
    input_shape: tuple,
    num_classes: int,
    mean=None,
    std=None,
    *,
    depth: int = 34,
    width: int = 10,
    cnn_width: int = 1,
    seed: Optional[int] = None,
) -> keras.Model:
    """Builds a classifier from :data:`MODELS`.

    Args:
      name: ``"small_cnn"``, ``"preact_resnet18"``, ``"wide_resnet"`` or ``"wide_resnet_swish"``.
      input_shape: (H, W, C) of the images.
      num_classes: number of logits.
      mean, std: per-channel constants for ``(x - mean) / std`` applied first
        inside the model; no normalisation when ``mean`` is None (``std``
        alone defaults to ones).
      depth, width: WideResNet depth (``(depth - 4) % 6 == 0``) and widening
        factor; ignored by the other models.
      cnn_width: ``small_cnn`` only: multiplies its widths (32 and 64
        filters, 256 hidden units); 2 gives the 64/128/512 network.
      seed: makes the initial weights reproducible; None draws them from
        Keras' global random state.

    Returns:
      A functional ``keras.Model`` whose last layer is the Dense ``"logits"``.
    """
    if name not in MODELS:
        raise unknown_choice("model", name, MODELS)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) <= 0:
        raise UserError(f"input_shape must be (height, width, channels), got {input_shape}")
    if int(num_classes) < 2:
        raise UserError(f"num_classes must be >= 2, got {num_classes}")
    if name in ("wide_resnet", "wide_resnet_swish"):
        if depth < 10 or (depth - 4) % 6 != 0:
            raise UserError(f"{name} depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        if width < 1:
            raise UserError(f"{name} width must be >= 1, got {width}")
    if name == "small_cnn" and cnn_width < 1:
        raise UserError(f"small_cnn cnn_width must be >= 1, got {cnn_width}")
    init = _Initializers(seed)
    inputs = keras.Input(shape=input_shape, dtype="float32", name="images")
    x = inputs
    if mean is not None:
        x = _normalize(x, mean, std, input_shape[-1])
    if name == "small_cnn":
        outputs = _small_cnn(x, num_classes, init, cnn_width)
        model_name = "small_cnn" if cnn_width == 1 else f"small_cnn_x{cnn_width}"
    elif name == "preact_resnet18":
        outputs = _preact_resnet18(x, num_classes, init)
        model_name = "preact_resnet18"
    elif name == "wide_resnet_swish":
        outputs = _wide_resnet_swish(x, num_classes, depth, width, init)
        model_name = f"wide_resnet_swish_{depth}_{width}"
    else:
        outputs = _wide_resnet(x, num_classes, depth, width, init)
        model_name = f"wide_resnet_{depth}_{width}"
    return keras.Model(inputs, outputs, name=model_name)


def model_kind(name: str) -> str:
    """What ``model.name`` refers to: ``builtin``, ``keras_file`` or ``factory`` (``module:function``)."""
    name = str(name)
    if name in MODELS:
        return "builtin"
    if name.endswith(".keras"):
        return "keras_file"
    if ":" in name:
        return "factory"
    raise UserError(
        f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}, a .keras file, "
        "or module:function (a function returning a Keras network)"
    )


def check_model_name(name: str) -> None:
    """Refuses a model name that cannot work, before any data is loaded (one-line UserError)."""
    kind = model_kind(name)
    if kind == "keras_file" and not os.path.isfile(name):
        raise UserError(f"model file not found: {name}")
    if kind == "factory":
        _factory(name)


def _factory(name: str):
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UserError(f"model {name!r} must be module:function, e.g. mypackage.nets:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module next to where the command runs, as `python -m` finds it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"model factory {name!r}: cannot import {module_name!r} ({first_line(e)})") from None
    except Exception as e:  # any error the module's own code raises while it is imported
        raise UserError(f"model factory {name!r}: importing {module_name!r} raised {type(e).__name__}: "
                        f"{first_line(e)}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"model factory {name!r}: {module_name} has no function {attr!r}")
    try:
        inspect.signature(fn).bind(input_shape=(1, 1, 1), num_classes=2)
    except TypeError as e:
        raise UserError(f"model factory {name!r}: {module_name}.{attr} must take the keyword arguments input_shape= "
                        f"and num_classes= ({first_line(e)})") from None
    except ValueError:  # a callable without a signature (a builtin): found out when it is called
        pass
    return fn


def user_network(name: str, input_shape: tuple, num_classes: int) -> keras.Model:
    """The user's network: a ``.keras`` file, or ``module:function`` called as
    ``function(input_shape=(H, W, C), num_classes=K)``.

    The network must map float32 images in [0, 1] of ``input_shape`` to
    ``num_classes`` logits (any normalisation inside it); a mismatch is a
    one-line UserError.
    """
    kind = model_kind(name)
    input_shape = tuple(int(d) for d in input_shape)
    if kind == "keras_file":
        check_model_name(name)
        # A saved RobustModel trains on from its evaluated network (the weight average, if it has one).
        network = evaluated_network(load_keras_file(name, compile=False))
    else:
        factory = _factory(name)
        with user_code(f"model factory {name!r}"):
            network = factory(input_shape=input_shape, num_classes=int(num_classes))
    if not isinstance(network, keras.Model):
        raise UserError(f"model {name!r} gave a {type(network).__name__}, not a keras.Model")
    try:
        check_network_io(network)  # before the first call: several inputs or outputs fail there obscurely
    except UserError as e:
        raise UserError(f"model {name!r}: {e}") from None
    probe = np.zeros((1,) + input_shape, np.float32)
    try:
        out = network(probe, training=False)
    except Exception as e:  # a shape mismatch surfaces as several exception types
        raise UserError(
            f"model {name!r} does not accept images of shape {input_shape} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if isinstance(out, (list, tuple, dict)):  # a subclassed network, unknown until called
        raise UserError(f"model {name!r} returns {len(out)} outputs; tfrobust supports {SUPPORTED_IO}")
    if len(out.shape) != 2 or int(out.shape[-1]) != int(num_classes):
        raise UserError(f"model {name!r} outputs shape {tuple(out.shape)}, but the data has {num_classes} classes")
    return network


def network_for(config, info, seed: Optional[int] = None) -> keras.Model:
    """The network a :class:`~tfrobust.config.ModelConfig` names, for data described by ``info``.

    Built-in networks normalise with the data's per-channel mean and std; the
    user's own networks are used as they are.
    """
    if model_kind(config.name) == "builtin":
        return build_model(
            config.name, info.image_shape, info.num_classes, info.mean, info.std,
            depth=config.depth, width=config.width, cnn_width=config.cnn_width, seed=seed,
        )
    return user_network(config.name, info.image_shape, info.num_classes)


__all__ = [
    "MODELS", "LOGITS_LAYER", "NORMALIZATION_LAYER", "build_model", "wide_resnet_swish_parameters",
    "model_kind", "check_model_name", "user_network", "network_for",
]
