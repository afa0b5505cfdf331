"""Checks of a network and of ``fit``'s data, made before anything is traced: each failure is one line.

- :func:`check_outputs_are_logits`: a network ending in a softmax is refused;
- :func:`check_network`: that, and each weight-space term's requirements (RAT's logits layer, AWP's kernels);
- :func:`check_divisible`: a batch that does not split into equal micro-batches;
- :class:`WarmupLengthCheck`: an epoch length that would change a warm-up counted in epochs.
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfrobust.errors import UserError
from tfrobust.network_checks import check_labels, check_network_io, check_unit_range
from tfrobust.export import input_shape_of


def check_outputs_are_logits(network, input_shape=None, examples: int = 4) -> Optional[int]:
    """Refuses a network whose outputs look like probabilities instead of logits.

    The network is called in inference mode on a fixed probe batch of images
    uniform in [0, 1]; if every output row is non-negative and sums to 1
    (within 1e-4), the network most likely ends in a softmax, and the
    objectives, which apply their own softmax, would silently train the wrong
    thing. Returns the number of classes, or None (and checks nothing) when
    the input shape is unknown.

    Raises:
      UserError: the outputs are probabilities.
    """
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(network)
    if shape is None:
        return None
    probe = np.random.default_rng(0).uniform(size=(examples,) + tuple(shape)).astype("float32")
    with tf.init_scope():  # eagerly, also when Keras builds the model inside a graph
        out = np.asarray(tf.cast(network(probe, training=False), tf.float32))
    if out.ndim != 2:
        raise UserError(f"the network must output logits of shape (batch, classes), got shape {out.shape}")
    if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        raise UserError(
            "the network outputs probabilities (non-negative rows summing to 1), not logits; "
            "remove its final softmax: tfrobust's objectives apply softmax themselves"
        )
    return int(out.shape[1])


def check_network(network, terms, input_shape=None) -> bool:
    """:func:`check_outputs_are_logits`, then each term's ``check_network``; False when the shape is not known yet."""
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(network)
    if shape is None or any(d is None for d in shape):
        return False
    classes = check_outputs_are_logits(network, shape)
    for term in terms:
        term.check_network(network, classes)
    return True


def input_shape_of_data(data):
    """The shape (without batch) of the inputs ``fit`` is given (an array or a data set), or None."""
    if isinstance(data, tf.data.Dataset):
        spec = tf.nest.flatten(data.element_spec)[0]
    elif hasattr(data, "shape") and hasattr(data, "dtype"):
        spec = data
    else:
        return None
    shape = tuple(spec.shape[1:])
    return None if not shape or any(d is None for d in shape) else tuple(int(d) for d in shape)


def check_label_shape(data, y=None) -> None:
    """Refuses labels of shape (N, K > 1), one-hot most likely, before anything is traced.

    ``data`` is what ``fit`` gets as ``x`` (an array or a data set of
    ``(x, y[, w])``), ``y`` its labels when given apart.
    """
    if isinstance(data, tf.data.Dataset):
        specs = tf.nest.flatten(data.element_spec)
        shape = tuple(specs[1].shape) if len(specs) > 1 else None
    else:
        shape = tuple(y.shape) if hasattr(y, "shape") else None
    if shape is not None and len(shape) == 2 and shape[-1] not in (None, 1):
        raise UserError(f"labels of shape {shape} look one-hot; RobustModel takes integer class labels of shape (N,) "
                        "(use y.argmax(axis=-1))")


def check_wrapped_network(network) -> None:
    """Refuses what a RobustModel cannot wrap: anything but a keras.Model, or a network of several inputs or
    outputs (:func:`tfrobust.network_checks.check_network_io`)."""
    if not isinstance(network, keras.Model):
        raise UserError(f"RobustModel needs a keras.Model (images in [0, 1] -> logits) as its network, got "
                        f"{type(network).__name__}")
    check_network_io(network)


def check_arrays(data, y=None, allow_unlabelled: bool = False) -> None:
    """Refuses array inputs to ``fit`` that would train on something else than asked: images outside [0, 1]
    (0..255 not divided by 255) and labels that are not whole numbers (a float label would be truncated).

    A data set is not read here (its first batch is checked by the network's own checks).
    """
    check_label_shape(data, y)
    if isinstance(data, tf.data.Dataset) or not hasattr(data, "shape"):
        return
    check_unit_range(data, "x")
    if y is not None and hasattr(y, "shape"):
        labels = np.asarray(y)
        if allow_unlabelled and labels.size:
            labels = labels[labels != -1]  # -1 marks an example without a label
        check_labels(labels)


def check_divisible(batch_size, accumulate_steps: int) -> None:
    """Refuses a batch size that does not split into equal micro-batches (a last, partial batch is split unevenly)."""
    if batch_size is not None and batch_size % accumulate_steps:
        raise UserError(
            f"a batch of {batch_size} examples does not split into accumulate_steps={accumulate_steps} "
            "equal micro-batches; choose a batch size divisible by it"
        )


class WarmupLengthCheck(keras.callbacks.Callback):
    """Stops ``fit`` when its epoch length differs from ``steps_per_epoch``, which counts ``term``'s warm-up."""

    def __init__(self, steps_per_epoch: int, term):
        super().__init__()
        self.steps_per_epoch, self.term = steps_per_epoch, term

    def on_train_begin(self, logs=None):
        steps = self.params.get("steps") if self.params else None
        if steps is not None and steps != self.steps_per_epoch:
            raise UserError(
                f"fit runs {steps} steps per epoch but the model was built with steps_per_epoch="
                f"{self.steps_per_epoch}; {self.term.name.upper()}'s warm-up of {self.term.warmup_epochs()} epochs "
                "would not last that many epochs"
            )


__all__ = ["check_outputs_are_logits", "check_network", "input_shape_of_data", "check_label_shape", "check_arrays",
           "check_wrapped_network", "check_divisible",
           "WarmupLengthCheck"]
