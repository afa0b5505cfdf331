"""The network as the step calls it: in mixed precision, BatchNorm as one fused op in both modes.

Keras' ``BatchNormalization`` computes in float32 whatever the layer's compute
dtype: under ``mixed_bfloat16`` (or ``mixed_float16``) every BatchNorm casts
its input up, computes the batch moments (training mode) or reads the moving
ones (inference mode), multiplies and adds in float32 and casts back, and the
backward pass does the same again op by op. PyTorch's autocast runs BatchNorm
on the reduced-precision tensor in one kernel each way. The step makes a dozen
or more passes through the network (the attack's, the update's, AWP's ascent),
so in mixed precision :func:`fused_network` gives the step a twin of a
functional network whose BatchNorm layers run as one fused op
(``FusedBatchNormV3``: float32 statistics, scale and offset, one rounding of
the output to the compute dtype), sharing every variable with the network.
The other layers are the network's own layer objects.

In training mode the fused op normalises with the batch's biased variance, as
Keras does, but returns the unbiased one; the twin scales it back by
``(n - 1) / n`` before it moves the layer's moving statistics with Keras' own
update, so the moving variance follows Keras' definition (not PyTorch's
unbiased one).

The twin is used only where it computes the same function:

- in mixed precision; in float32 the network itself is called, so float32
  results are bit for bit those of Keras' layer;
- for a functional network (``keras.Model(inputs, outputs)`` or
  ``Sequential``); a subclassed network is called as it is;
- for the BatchNorm layers over the channels of 4-D NHWC tensors without
  renormalisation, synchronisation or mask; any other BatchNorm call runs
  Keras' layer.

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
    """Whether a layer is a BatchNormalization the fused op computes as Keras does (up to rounding)."""
    return (isinstance(layer, keras.layers.BatchNormalization) and layer.compute_dtype in REDUCED
            and not getattr(layer, "renorm", False) and not getattr(layer, "synchronized", False)
            and layer.axis in (-1, 3))


def _values_per_channel(x):
    """``N * H * W`` of an NHWC tensor: a Python int when the shape is static, else a float32 tensor."""
    static = x.shape[0], x.shape[1], x.shape[2]
    if all(d is not None for d in static):
        return static[0] * static[1] * static[2]
    shape = tf.shape(x)
    return tf.cast(shape[0] * shape[1] * shape[2], tf.float32)


class FusedBatchNorm(keras.layers.Layer):
    """A BatchNormalization layer's function, in both modes, as one fused op on the layer's own variables."""

    def __init__(self, batch_norm, **kwargs):
        # autocast off: the statistics, scale and offset are read in float32, as the fused op wants them.
        super().__init__(name=batch_norm.name + "_fused", dtype=batch_norm.dtype_policy, autocast=False, **kwargs)
        self._batch_norm = [batch_norm]  # in a list: the layer's variables stay its own

    def call(self, x, training=None, mask=None):
        bn = self._batch_norm[0]
        batch_moments = bool(training and bn.trainable)  # as Keras: a frozen layer normalises with its moving moments
        if len(x.shape) != 4 or mask is not None:
            return bn(x, training=training, mask=mask)
        ones = tf.ones_like(bn.moving_mean.value)
        scale = bn.gamma.value if bn.scale else ones
        offset = bn.beta.value if bn.center else tf.zeros_like(ones)
        x = tf.cast(x, self.compute_dtype)
        if not batch_moments:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, mean=bn.moving_mean.value, variance=bn.moving_variance.value, epsilon=bn.epsilon,
                data_format="NHWC", is_training=False)
            return y
        y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=bn.epsilon, data_format="NHWC", is_training=True)
        count = _values_per_channel(x)
        # The biased variance the output was normalised with; 0 for one value per channel (as Keras), where the
        # unbiased one is 0/0.
        variance = tf.math.multiply_no_nan(unbiased, tf.cast((count - 1.0) / count, tf.float32))
        # Keras' own update of the moving statistics (BatchNormalization.call), on the same variables.
        bn.moving_mean.assign(bn.moving_mean.value * bn.momentum + mean * (1.0 - bn.momentum))
        bn.moving_variance.assign(bn.moving_variance.value * bn.momentum + variance * (1.0 - bn.momentum))
        return y

    def compute_output_spec(self, x, training=None, mask=None):  # noqa: ARG002
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)


def _twin(network):
    """A functional copy of ``network`` calling its own layers, with fused BatchNorm; None when there is none."""
    if not any(fusable(layer) or isinstance(layer, keras.Model) for layer in getattr(network, "layers", [])):
        return None

    def clone(layer):
        if fusable(layer):
            return FusedBatchNorm(layer)
        return (_twin(layer) or layer) if isinstance(layer, keras.Model) else layer

    try:
        return keras.models.clone_model(network, clone_function=clone)
    except (ValueError, TypeError, NotImplementedError):  # a subclassed network: called as it is
        return None


_TWINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fused_network(network):
    """``network`` as the step calls it: its fused-BatchNorm twin in mixed precision, else itself.

    Call it in either mode; the network's own ``losses`` (regularisers,
    ``add_loss``) stay the network's. The twin is made on first use, also
    while ``fit`` traces its step (it creates no variables), and kept while
    the network lives.
    """
    if network not in _TWINS:
        _TWINS[network] = _twin(network) if network.compute_dtype in REDUCED else None
    twin = _TWINS[network]
    return twin if twin is not None else network


__all__ = ["FusedBatchNorm", "fusable", "fused_network"]
