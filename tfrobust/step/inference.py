"""The network in inference mode as the step's attacks and metrics call it: BatchNorm fused in mixed precision.

Keras' ``BatchNormalization`` computes in float32 whatever the layer's compute
dtype: under ``mixed_bfloat16`` (or ``mixed_float16``) every BatchNorm of an
inference-mode pass casts its input up, multiplies and adds in float32 and
casts back, and the backward pass of an attack does the same again. PyTorch's
autocast runs BatchNorm on the reduced-precision tensor in one kernel. The
attack makes ten or more such passes per step, so in mixed precision
:func:`inference_network` gives the step a twin of a functional network whose
BatchNorm layers run as one fused op (``FusedBatchNormV3`` with float32
statistics, one rounding to the compute dtype), sharing every variable with
the network. The other layers are the network's own layer objects.

The twin is used only where it computes the same function:

- in mixed precision; in float32 the network itself is called, so float32
  results are bit for bit those of Keras' layer;
- for a functional network (``keras.Model(inputs, outputs)`` or
  ``Sequential``); a subclassed network is called as it is;
- for the BatchNorm layers over the channels of 4-D NHWC tensors without
  renormalisation or synchronisation; any other BatchNorm runs Keras' layer.

Keras' layer rounds its float32 result ``x * inv + (offset - mean * inv)``
once to the compute dtype, the fused op rounds ``(x - mean) * inv + offset``
once: the two agree except where the float32 values fall within float32
rounding of a bfloat16 rounding boundary (docs/algorithms.md, section 9,
item 11).
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf

REDUCED = ("bfloat16", "float16")


def fusable(layer) -> bool:
    """Whether a layer is a BatchNormalization the fused op computes exactly as Keras does (up to rounding)."""
    return (isinstance(layer, keras.layers.BatchNormalization) and layer.compute_dtype in REDUCED
            and not getattr(layer, "renorm", False) and not getattr(layer, "synchronized", False)
            and layer.axis in (-1, 3))


class FusedInferenceBatchNorm(keras.layers.Layer):
    """A BatchNormalization layer's inference-mode function as one fused op on its own variables."""

    def __init__(self, batch_norm, **kwargs):
        # autocast off: the statistics, scale and offset are read in float32, as the fused op wants them.
        super().__init__(name=batch_norm.name + "_fused", dtype=batch_norm.dtype_policy, autocast=False, **kwargs)
        self._batch_norm = [batch_norm]  # in a list: the layer's variables stay its own

    def call(self, x, training=None, mask=None):  # noqa: ARG002 - inference mode whatever the caller says
        bn = self._batch_norm[0]
        if len(x.shape) != 4:
            return bn(x, training=False)
        ones = tf.ones_like(bn.moving_mean.value)
        scale = bn.gamma.value if bn.scale else ones
        offset = bn.beta.value if bn.center else tf.zeros_like(ones)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            tf.cast(x, self.compute_dtype), scale, offset, mean=bn.moving_mean.value,
            variance=bn.moving_variance.value, epsilon=bn.epsilon, data_format="NHWC", is_training=False)
        return y

    def compute_output_spec(self, x, training=None, mask=None):  # noqa: ARG002
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)


def _twin(network):
    """A functional copy of ``network`` calling its own layers, with fused BatchNorm; None when there is none."""
    if not any(fusable(layer) or isinstance(layer, keras.Model) for layer in getattr(network, "layers", [])):
        return None

    def clone(layer):
        if fusable(layer):
            return FusedInferenceBatchNorm(layer)
        return (_twin(layer) or layer) if isinstance(layer, keras.Model) else layer

    try:
        return keras.models.clone_model(network, clone_function=clone)
    except (ValueError, TypeError, NotImplementedError):  # a subclassed network: called as it is
        return None


_TWINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def inference_network(network):
    """``network`` as a callable in inference mode: its fused-BatchNorm twin in mixed precision, else itself.

    The twin is made on first use, also while ``fit`` traces its step (it
    creates no variables), and kept while the network lives.
    """
    if network not in _TWINS:
        _TWINS[network] = _twin(network) if network.compute_dtype in REDUCED else None
    twin = _TWINS[network]
    return twin if twin is not None else network


__all__ = ["FusedInferenceBatchNorm", "fusable", "inference_network"]
