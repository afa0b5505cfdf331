"""The metrics RobustModel reports, in the order ``evaluate`` returns them, with the direction each improves in."""

from __future__ import annotations

import keras
import tensorflow as tf

# What ``evaluate`` (and the validation of ``fit``, as ``val_...``) reports, in this order.
EVALUATION_METRICS = ("loss", "clean_accuracy", "pgd_accuracy", "pgd_loss")
# Reported by ``evaluate`` only, not by the train step.
VALIDATION_ONLY = ("pgd_accuracy", "pgd_loss")


class Decreasing(keras.metrics.Mean):
    """A mean whose smaller values are better (a loss), as Keras' callbacks read it."""

    def __init__(self, name):
        super().__init__(name=name)
        self._direction = "down"


def trackers(term_names, statistics) -> dict:
    """The model's metrics by name: the objective and its terms, accuracies, the terms' statistics."""
    found = {n: Decreasing(n) for n in ["loss"] + list(term_names)}
    for name in ("clean_accuracy", "adv_accuracy"):
        found[name] = keras.metrics.SparseCategoricalAccuracy(name=name)
    found.update({n: keras.metrics.Mean(name=n) for n in statistics})
    found["pgd_accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="pgd_accuracy")
    found["pgd_loss"] = Decreasing("pgd_loss")
    return found


def update_training(found, loss, terms, extra, y, labelled, sample_weight, logits_clean, logits_adv) -> dict:
    """Updates the train step's metrics and returns their results.

    The loss (the global batch's) and the objective's per-example ``terms``
    are weighted alike by ``sample_weight``; ``extra`` values are means
    already. The accuracies are unweighted over the ``labelled`` examples, as
    Keras' ``metrics=``; the clean accuracy is left out of the results when
    ``logits_clean`` is None (AT with ``train_clean_accuracy`` off).
    """
    found["loss"].update_state(loss)
    weights = None if sample_weight is None else tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(y))
    for name, value in terms.items():
        if weights is None:
            found[name].update_state(tf.reduce_mean(value))
        else:  # the batch's weighted mean, as the loss
            found[name].update_state(tf.math.divide_no_nan(
                tf.reduce_sum(weights * tf.cast(value, tf.float32)), tf.reduce_sum(weights)))
    for name, value in extra.items():
        found[name].update_state(value)
    names = training_names(found)
    if logits_clean is None:
        names.remove("clean_accuracy")
    else:
        found["clean_accuracy"].update_state(y, logits_clean, labelled)
    found["adv_accuracy"].update_state(y, logits_adv, labelled)
    return {name: found[name].result() for name in names}


def training_names(all_trackers) -> list:
    """The names the train step reports, in order."""
    return [n for n in all_trackers if n not in VALIDATION_ONLY]


def ordered(all_trackers, compiled) -> list:
    """Every metric: those of ``evaluate`` first, the compiled ones, the training ones, then the direction group."""
    first = [all_trackers[n] for n in EVALUATION_METRICS] + ([compiled] if compiled is not None else [])
    rest = [m for n, m in all_trackers.items() if n not in EVALUATION_METRICS]
    return first + rest + direction_group(all_trackers.values())


def evaluation_names(compiled) -> list:
    """The names of the values ``evaluate`` returns: :data:`EVALUATION_METRICS`, then the compiled metrics."""
    names = list(EVALUATION_METRICS)
    if compiled is not None:
        names += [m.name for m in getattr(compiled, "metrics", [])] if compiled.built else [compiled.name]
    return names


def direction_group(metrics) -> list:
    """The metrics with a direction, as the one group Keras' callbacks search for it (``mode="auto"``).

    Keras' ``MonitorCallback`` reads a direction only from metrics grouped in
    its own list type; without it (another Keras), callbacks need ``mode=``.
    """
    try:
        from keras.src.trainers.compile_utils import MetricsList
    except ImportError:
        return []

    class Directions(MetricsList):
        def result(self):
            return {}  # adds no value of its own to the logs

    return [Directions([m for m in metrics if hasattr(m, "_direction")], name="directions")]


__all__ = ["EVALUATION_METRICS", "VALIDATION_ONLY", "Decreasing", "trackers", "update_training", "training_names", "ordered",
           "evaluation_names", "direction_group"]
