"""The weight average of a network: an exponential moving average with a warmed-up decay (docs/algorithms.md, section 10).

The average is a clone of the network (:func:`average_of`) that the model
holds as an attribute, so its variables are saved, checkpointed and backed up
with the live weights; :class:`WeightAverage` updates it after every
optimizer step.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfrobust.errors import UserError
from tfrobust.export import input_shape_of


def average_of(network) -> keras.Model:
    """A non-trainable clone of ``network`` holding a copy of its weights (the average's start)."""
    try:
        clone = keras.models.clone_model(network)
    except Exception as e:  # clone_model raises several kinds for networks it cannot rebuild
        raise UserError(
            f"weight averaging needs a network keras.models.clone_model can copy "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    shape = input_shape_of(network)
    if not clone.built and shape is not None:
        clone.build((None,) + shape)
    live, averaged = network.weights, clone.weights
    if len(live) != len(averaged) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(live, averaged)):
        raise UserError("weight averaging: the cloned network's weights do not match the network's")
    for a, b in zip(averaged, live):
        a.assign(b.value)
    clone.trainable = False
    return clone


class WeightAverage:
    """``a <- tau_t a + (1 - tau_t) w`` after every optimizer step, with ``tau_t`` warmed up from ``start_step``.

    Keras' optimizer ``use_ema`` is not used: it has no warm-up of the decay,
    no start step and averages only what the optimizer updates, leaving
    BatchNorm statistics behind.
    """

    def __init__(self, decay: float, start_step: float):
        self.tau, self.start_step = float(decay), float(start_step)

    def decay(self, step):
        """The decay at optimizer step ``t`` (counted after the update):

        ``0`` while ``t < t0`` (the average is the live weights), then
        ``min(tau, (1 + d) / (10 + d))`` with ``d = t - t0`` (the references'
        warm-up of the decay).
        """
        t = tf.cast(step, tf.float32)
        delta = t - tf.constant(self.start_step, tf.float32)
        decay = tf.minimum(tf.constant(self.tau, tf.float32), (1.0 + delta) / (10.0 + delta))
        return tf.where(delta >= 0.0, decay, 0.0)

    def update(self, averaged, live, step) -> None:
        """One step of the average of network ``live`` into ``averaged``: trainable weights averaged,
        BatchNorm moving statistics (and any other non-trainable state) copied.

        Runs on every replica from the replicated weights (identical after
        the optimizer's update), so the average is identical on every
        replica without communication.
        """
        decay = self.decay(step)
        trainable = {id(v) for v in live.trainable_weights}
        for a, w in zip(averaged.weights, live.weights):
            value = tf.cast(w.value, a.value.dtype)
            if id(w) in trainable:
                a.assign(tf.cast(decay, a.value.dtype) * a.value + tf.cast(1.0 - decay, a.value.dtype) * value)
            else:
                a.assign(value)


__all__ = ["average_of", "WeightAverage"]
