"""The metrics RobustModel reports, in the order ``evaluate`` returns them, with the direction each improves in."""

from __future__ import annotations

import keras

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


__all__ = ["EVALUATION_METRICS", "VALIDATION_ONLY", "Decreasing", "trackers", "training_names", "ordered",
           "evaluation_names", "direction_group"]
