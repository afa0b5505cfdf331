"""RobustModel: a keras.Model whose ``train_step`` performs adversarial training.

One compiled step does, for a batch ``(x, y)`` (docs/algorithms.md, sections 1-5),
calling the defense's weight-space terms (:mod:`tfrobust.defenses.terms`) in
their canonical order at each point:

1. the inner attack of the base objective (PGD on CE for AT, on KL for
   TRADES, on CE from a Gaussian start for MART), at the weights plus the
   terms' ``attack_weights`` offsets (RAT: randomly perturbed convolution
   kernels), restored exactly afterwards;
2. for each term with ``ascent_variables`` (AWP), after its warm-up, the
   offsets ``v`` from the gradient of the base objective, all-reduced across
   replicas; the variables become ``w + v``;
3. the forward pass; the terms' soft-target statistics (S2O's second moments,
   RAT's last-layer gradients), summed across replicas off the tape, and
   their targets;
4. the full objective (the base, its primary term mixed by each term), its
   gradient, the exact restore of ``w`` and the optimizer update, so that
   ``w_new = w - update(grad at w + v)``.

The step knows no term by name: a new weight-space method plugs in through
:func:`tfrobust.defense_names.register_term` (docs/algorithms.md, section 16).
With ``accumulate_steps=N`` the same points run over N micro-batches of the
batch, one after the other, with the sums of step 2 and 3 taken over the whole
batch before they are used, and one update (docs/algorithms.md, section 17).
Everything else is Keras' own machinery: ``fit``, callbacks, metrics,
optimizers, checkpoints and export. Under ``tf.distribute`` the hand-built loss
is divided by the number of replicas (gradients are summed across replicas).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from tfrobust import attacks, seeds
from tfrobust.attacks import random_start as start_point  # the attack's random start, same on any replica count
from tfrobust.config import WEIGHT_DECAY_EXCLUDE
from tfrobust.defenses import Defense, WeightSpaceTerm
from tfrobust.errors import UserError, check_number, check_steps
from tfrobust.export import export_network, input_shape_of
from tfrobust.step.micro_batches import MicroBatches
from tfrobust.weight_space import assign_offset, restore, snapshot

__all__ = ["RobustModel", "start_point", "check_outputs_are_logits", "EVALUATION_METRICS"]


class BatchWeights(NamedTuple):
    """How a step averages its per-example objective over the global batch.

    ``w``: each example's weight; ``total``: the sum of ``w`` over the global
    batch (all replicas), so that ``sum(w * L) / total`` is this replica's
    share of the weighted mean; ``ce_scale``: with unlabelled examples
    (label -1), ``total`` divided by the weight of the labelled examples of
    the global batch, the factor that turns the CE term into a mean over the
    labelled examples only (None when every example has a label).
    """

    w: tf.Tensor
    total: tf.Tensor
    ce_scale: Optional[tf.Tensor] = None


def _all_layers(layer):
    """Every layer nested in ``layer`` (itself included), depth first."""
    yield layer
    for child in getattr(layer, "layers", None) or []:
        yield from _all_layers(child)


def _replica_context():
    return tf.distribute.get_replica_context()


def _num_replicas() -> int:
    ctx = _replica_context()
    return ctx.num_replicas_in_sync if ctx is not None else 1


def _ce_scale(weights):
    return None if weights is None else weights.ce_scale


def _all_reduce_sum(values):
    ctx = _replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


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
    import numpy as np

    shape = tuple(input_shape) if input_shape is not None else input_shape_of(network)
    if shape is None:
        return
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


# What ``evaluate`` (and the validation of ``fit``, as ``val_...``) reports, in this order.
EVALUATION_METRICS = ("loss", "clean_accuracy", "pgd_accuracy", "pgd_loss")


class _Decreasing(keras.metrics.Mean):
    """A mean whose smaller values are better (a loss), as Keras' callbacks read it."""

    def __init__(self, name):
        super().__init__(name=name)
        self._direction = "down"


def _trackers(term_names, statistics) -> dict:
    """The model's metrics by name: the objective and its terms, accuracies, the terms' statistics."""
    trackers = {n: _Decreasing(n) for n in ["loss"] + list(term_names)}
    for name in ("clean_accuracy", "adv_accuracy"):
        trackers[name] = keras.metrics.SparseCategoricalAccuracy(name=name)
    trackers.update({n: keras.metrics.Mean(name=n) for n in statistics})
    trackers["pgd_accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="pgd_accuracy")
    trackers["pgd_loss"] = _Decreasing("pgd_loss")
    return trackers


def _direction_group(metrics) -> list:
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


def _input_shape_of_data(data):
    """The shape (without batch) of the inputs ``fit`` is given (an array or a data set), or None."""
    if isinstance(data, tf.data.Dataset):
        spec = tf.nest.flatten(data.element_spec)[0]
    elif hasattr(data, "shape") and hasattr(data, "dtype"):
        spec = data
    else:
        return None
    shape = tuple(spec.shape[1:])
    return None if not shape or any(d is None for d in shape) else tuple(int(d) for d in shape)


class _WarmupLengthCheck(keras.callbacks.Callback):
    """Stops fit when its epoch length differs from the model's ``steps_per_epoch``."""

    def on_train_begin(self, logs=None):
        steps = self.params.get("steps") if self.params else None
        expected = self.model.steps_per_epoch
        if steps is not None and steps != expected:
            term = self.model.warmup_term()
            raise UserError(
                f"fit runs {steps} steps per epoch but the model was built with steps_per_epoch={expected}; "
                f"{term.name.upper()}'s warm-up of {term.warmup_epochs()} epochs would not last that many epochs"
            )


@keras.saving.register_keras_serializable(package="tfrobust")
class RobustModel(keras.Model):
    """Wraps a network (images in [0, 1] -> logits) with an adversarial train_step.

    A regular Keras model: ``compile``/``fit``/``evaluate``, callbacks
    (``ModelCheckpoint``, ``BackupAndRestore``), ``save("x.keras")`` and
    ``keras.models.load_model`` all work; the defense is saved by name and
    hyperparameters, the network as a nested Keras object.

    In the objective, beyond the defense's own terms:

    - the network's own losses (``network.losses``: kernel/activity
      regularizers) are added to the training loss and to AWP's ascent loss,
      divided by the replica count like the rest of the hand-built loss;
    - ``sample_weight`` (a third element of each batch, as in Keras) makes the
      loss a weighted mean ``sum_n w_n L_n / sum_n w_n`` of the per-example
      objective (also in AWP's ascent); the attack and the batch statistics
      of S2O and RAT's soft targets stay unweighted;
    - metrics passed to ``compile(metrics=[...])`` are updated on the
      adversarial logits (the training attack in ``fit``, PGD in ``evaluate``).

    Args:
      network: a built Keras model mapping float32 NHWC images in [0, 1] to
        logits. A network that outputs probabilities is refused (checked on a
        probe batch when its input shape is known).
      defense: a :class:`~tfrobust.defenses.Defense` (or a defense name).
      eps, step_size, steps: the training attack.
      norm: ``"linf"`` or ``"l2"``.
      bn_mode: BatchNorm mode during the attack: "eval" or "train" (in both,
        the moving statistics are left exactly as they were).
      steps_per_epoch: optimizer steps per epoch, which turns AWP's warm-up
        (in epochs) into steps. Required when the defense has a warm-up
        (``trades+awp`` has 10 epochs by default); ``fit`` refuses epochs of
        a different length whenever Keras knows their length.
      weight_decay: L2 penalty ``wd/2 ||w||^2`` on all trainable variables,
        added to the loss (as PyTorch SGD's weight_decay; with AWP it is
        taken at the perturbed weights, as in the reference).
      eval_steps, eval_step_size: PGD used by ``test_step`` (step size
        default ``eps / 4``).
      seed: base seed of every random draw in the step.
      eval_loss: the loss PGD ascends in ``test_step``: ``"ce"`` or ``"cw"``
        (the CW margin, with which the references select checkpoints).
      label_smoothing: ``s`` in the smoothed cross-entropy
        ``(1 - s) CE(f, y) + s mean_k(-log p_k)`` that replaces the CE term of
        AT (adversarial) and TRADES (clean), also in AWP's ascent; 0 (default)
        leaves the objective unchanged. MART has no such term and refuses it.
      ema_decay: the decay ``tau`` of the exponential moving average of the
        weights (0.995 in the references), or None for no average. See
        :meth:`update_average`.
      ema_start_step: optimizer steps before the average starts (until then
        it equals the live weights).
      weight_decay_exclude: variables without the L2 penalty: ``"none"``
        (default: every trainable variable), ``"batchnorm"`` (BatchNorm's
        gamma and beta, as the references' weight-averaging trainer) or
        ``"batchnorm_and_bias"`` (also every bias).
      accumulate_steps: ``N`` micro-batches per optimizer update. Each batch
        is split into N micro-batches processed one after the other (so only
        one micro-batch's activations are in memory), making one update equal
        (up to float rounding) to the update on the whole batch: the attack
        per micro-batch from the batch's random start, AWP's ascent gradient,
        S2O's second moments and RAT's last-layer gradients summed over the
        whole batch before they are used, one optimizer iteration. BatchNorm's
        batch statistics are those of each micro-batch (and its moving
        averages move once per micro-batch). A batch size not divisible by N
        is refused; 1 (default) is the plain step.
      allow_unlabelled: accept batches in which label -1 marks an unlabelled
        example (a pool of extra images without labels). Such examples enter
        only TRADES's KL term and the attack; the CE term is the mean over the
        labelled examples of the global batch (Carmon et al. 2019,
        ``ignore_index=-1``; docs/algorithms.md, section 14), and the accuracy
        metrics count only labelled examples. Only for ``trades`` and
        ``trades+awp``: AT and MART have no label-free term, and S2O's and
        RAT's soft targets need a label per example.
    """

    def __init__(
        self,
        network: keras.Model,
        defense: Defense,
        eps: float,
        step_size: float,
        steps: int,
        norm: str = "linf",
        bn_mode: str = "eval",
        steps_per_epoch: Optional[int] = None,
        weight_decay: float = 0.0,
        eval_steps: int = 20,
        eval_step_size: Optional[float] = None,
        seed: int = 0,
        eval_loss: str = "ce",
        label_smoothing: float = 0.0,
        ema_decay: Optional[float] = None,
        ema_start_step: float = 0.0,
        weight_decay_exclude: str = "none",
        accumulate_steps: int = 1,
        allow_unlabelled: bool = False,
        **kwargs,
    ):
        if isinstance(defense, str):
            defense = Defense(defense)
        if not isinstance(defense, Defense):
            raise UserError(f"defense must be a Defense or a defense name such as 'trades+awp', got {type(defense).__name__}")
        eps, step_size = check_number("eps", eps), check_number("step_size", step_size)
        steps, eval_steps = check_steps("steps", steps), check_steps("eval_steps", eval_steps)
        super().__init__(**kwargs)
        if norm not in ("linf", "l2"):
            raise UserError(f"unknown norm {norm!r}; allowed: l2, linf")
        if bn_mode not in ("eval", "train"):
            raise UserError(f"unknown bn_mode {bn_mode!r}; allowed: eval, train")
        self.weight_space_terms = tuple(defense.weight_space_terms())
        for term in self.weight_space_terms:
            if term.warmup_epochs() > 0 and steps_per_epoch is None:
                raise UserError(
                    f"defense {defense.name!r} has an {term.name.upper()} warm-up of {term.warmup_epochs()} epochs: "
                    f"pass steps_per_epoch=... (optimizer steps per epoch), or set {term.name}_warmup_epochs=0"
                )
        self.network = network
        self.defense = defense
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.norm = norm
        self.bn_mode = bn_mode
        self.steps_per_epoch = max(int(steps_per_epoch), 1) if steps_per_epoch is not None else None
        self.weight_decay = float(weight_decay)
        self.eval_steps = int(eval_steps)
        self._eval_step_size_arg = eval_step_size
        self.eval_step_size = float(eval_step_size) if eval_step_size is not None else self.eps / 4.0
        self.seed = int(seed)
        self._network_checked = False
        if eval_loss not in ("ce", "cw"):
            raise UserError(f"unknown eval_loss {eval_loss!r}; allowed: ce, cw")
        self.eval_loss = eval_loss
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if self.label_smoothing and defense.base == "mart":
            raise UserError("label smoothing applies to the CE term of at and trades; mart has none")
        if ema_decay is not None and not 0.0 <= float(ema_decay) < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if float(ema_start_step) < 0:
            raise UserError(f"ema_start_step must be >= 0, got {ema_start_step!r}")
        self.ema_decay = float(ema_decay) if ema_decay is not None else None
        self.ema_start_step = float(ema_start_step)
        if weight_decay_exclude not in WEIGHT_DECAY_EXCLUDE:
            raise UserError(
                f"unknown weight_decay_exclude {weight_decay_exclude!r}; allowed: {', '.join(WEIGHT_DECAY_EXCLUDE)}"
            )
        self.weight_decay_exclude = weight_decay_exclude
        self.accumulate_steps = check_steps("accumulate_steps", accumulate_steps, minimum=1)
        self.allow_unlabelled = bool(allow_unlabelled)
        if self.allow_unlabelled and not defense.accepts_unlabelled:
            raise UserError(
                f"unlabelled examples enter only TRADES's KL term, which defense {defense.name!r} does not have in a "
                "form that needs no label: use trades or trades+awp, or pseudo-label them (pseudo_label.py)"
            )
        self.averaged_network = None
        if getattr(network, "built", False):
            self._check_network()
            self._build_average()
            self.built = True
        self.trackers = _trackers(self._term_names(), [n for t in self.weight_space_terms for n in t.STATISTICS])

    # -- Keras plumbing ---------------------------------------------------

    def get_config(self):
        """Everything the constructor takes; the defense as its name and hyperparameters."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "network": keras.saving.serialize_keras_object(self.network),
            "defense": self.defense.hyperparameters(),
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "norm": self.norm,
            "bn_mode": self.bn_mode,
            "steps_per_epoch": self.steps_per_epoch,
            "weight_decay": self.weight_decay,
            "eval_steps": self.eval_steps,
            "eval_step_size": self._eval_step_size_arg,
            "seed": self.seed,
            "eval_loss": self.eval_loss,
            "label_smoothing": self.label_smoothing,
            "ema_decay": self.ema_decay,
            "ema_start_step": self.ema_start_step,
            "weight_decay_exclude": self.weight_decay_exclude,
            "accumulate_steps": self.accumulate_steps,
            "allow_unlabelled": self.allow_unlabelled,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        defense = Defense(**config.pop("defense"))
        return cls(network, defense, **config)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Keras' compile without ``loss``: the defense's objective is the loss.

        ``metrics=[...]`` are updated on the adversarial logits.
        """
        if loss is not None:
            raise UserError("RobustModel trains on its defense's objective; compile it without loss=")
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a loaded model (optimizer, metrics) so its saved optimizer state can be restored."""
        config = keras.saving.deserialize_keras_object(config)
        config.pop("loss", None)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def build(self, input_shape):
        """Builds an unbuilt network on ``input_shape`` and checks that it outputs logits."""
        if not self.network.built:
            self.network.build(input_shape)
        self._check_network(tuple(input_shape)[1:])
        self._build_average()
        self.built = True

    def _check_network(self, input_shape=None):
        """Runs :func:`check_outputs_are_logits` and each term's network check once, as soon as the input shape is known.

        So a network a defense cannot train is refused when the model is
        built (or at the latest when its first step is traced), in one line.
        """
        if self._network_checked:
            return
        shape = tuple(input_shape) if input_shape is not None else input_shape_of(self.network)
        if shape is None or any(d is None for d in shape):
            return
        classes = check_outputs_are_logits(self.network, shape)
        for term in self.weight_space_terms:
            term.check_network(self.network, classes)
        self._network_checked = True

    def _check_divisible(self, batch_size):
        """Refuses a batch size that does not split into equal micro-batches (a last, partial batch is split unevenly)."""
        if batch_size is not None and batch_size % self.accumulate_steps:
            raise UserError(
                f"a batch of {batch_size} examples does not split into accumulate_steps={self.accumulate_steps} "
                "equal micro-batches; choose a batch size divisible by it"
            )

    def fit(self, *args, callbacks=None, **kwargs):
        """Keras' fit; refuses an epoch length that would change AWP's warm-up, and a batch size that
        does not split into ``accumulate_steps`` micro-batches."""
        self._check_divisible(kwargs.get("batch_size"))
        data = args[0] if args else kwargs.get("x")
        if isinstance(data, tf.data.Dataset):  # a batch size fixed in the data set's shapes
            self._check_divisible(tf.nest.flatten(data.element_spec)[0].shape[0])
        self._check_network(_input_shape_of_data(data))  # before anything is traced
        callbacks = list(callbacks or [])
        if self.warmup_term() is not None:
            callbacks.append(_WarmupLengthCheck())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def call(self, inputs, training=False):
        """The live network when training, otherwise :meth:`evaluated_network` (the weight average, if any).

        So ``predict``, ``model(x)``, ``evaluate``, :meth:`export` and the
        run's saved networks all use the same network; only the train step
        (and ``model(x, training=True)``) uses the live one.
        """
        network = self.network if training else self.evaluated_network()
        return network(inputs, training=training)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Exports :meth:`evaluated_network` (the network alone, without the defense).

        As a SavedModel (the default format), its ``serve`` endpoint (also
        ``serving_default``) maps ``images`` (float32, [0, 1]) to
        ``{"logits": ...}`` (:func:`tfrobust.export.export_network`). Other
        formats and an explicit ``input_signature`` go to Keras' own export
        of the network.
        """
        network = self.evaluated_network()
        if format != "tf_saved_model" or input_signature is not None or kwargs:
            return network.export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)
        export_network(network, str(filepath))

    def description(self) -> str:
        """What this model trains with, in a few lines: the defense, the attacks, the averaging, the network."""
        d = self.defense
        settings = d.hyperparameters()
        used = ", ".join(f"{k}={v}" for k, v in settings.items()
                         if (k == "beta" and v is not None) or any(k.startswith(t + "_") for t in d.terms))
        lines = [
            f"RobustModel: defense {d.name}" + (f" ({used})" if used else ""),
            f"  training attack: PGD-{self.steps} ({self.norm}) eps {self.eps:.6g}, step {self.step_size:.6g}, "
            f"BatchNorm in {self.bn_mode} mode",
            f"  validation attack: PGD-{self.eval_steps} on {self.eval_loss}, step {self.eval_step_size:.6g}",
            "  weight averaging: " + (f"decay {self.ema_decay}, from optimizer step {self.ema_start_step:g}; "
                                      "inference uses the average" if self.ema_decay is not None else "none"),
            f"  network: {self.network.name} ({type(self.network).__name__})",
        ]
        return "\n".join(lines)

    def summary(self, line_length=None, positions=None, print_fn=None, expand_nested=False, show_trainable=False,
                layer_range=None):
        """:meth:`description`, then Keras' summary of the network (the layers that are trained)."""
        (print_fn or print)(self.description())
        self.network.summary(line_length=line_length, positions=positions, print_fn=print_fn,
                             expand_nested=expand_nested, show_trainable=show_trainable, layer_range=layer_range)

    # -- weight averaging ---------------------------------------------------

    def _build_average(self):
        """Creates the averaged copy of the network (once), when ``ema_decay`` is set.

        The copy is a clone of the network whose variables are ordinary Keras
        variables of this model, so ``save_weights``, checkpoints and the
        epoch backup hold them with the live weights. It is not trainable.
        """
        if self.ema_decay is None or self.averaged_network is not None:
            return
        try:
            clone = keras.models.clone_model(self.network)
        except Exception as e:  # clone_model raises several kinds for networks it cannot rebuild
            raise UserError(
                f"weight averaging needs a network keras.models.clone_model can copy "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        shape = input_shape_of(self.network)
        if not clone.built and shape is not None:
            clone.build((None,) + shape)
        live, averaged = self.network.weights, clone.weights
        if len(live) != len(averaged) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(live, averaged)):
            raise UserError("weight averaging: the cloned network's weights do not match the network's")
        for a, b in zip(averaged, live):
            a.assign(b.value)
        clone.trainable = False
        self.averaged_network = clone

    def _average_pairs(self):
        """``(averaged, live, is_trainable)`` for every weight of the network."""
        trainable = {id(v) for v in self.network.trainable_weights}
        return [(a, w, id(w) in trainable) for a, w in zip(self.averaged_network.weights, self.network.weights)]

    def averaging_decay(self, step):
        """The decay at optimizer step ``t`` (counted after the update):

        ``0`` while ``t < t0`` (the average is the live weights), then
        ``min(tau, (1 + d) / (10 + d))`` with ``d = t - t0`` (the references'
        warm-up of the decay; docs/algorithms.md, section 10).
        """
        t = tf.cast(step, tf.float32)
        delta = t - tf.constant(self.ema_start_step, tf.float32)
        decay = tf.minimum(tf.constant(self.ema_decay, tf.float32), (1.0 + delta) / (10.0 + delta))
        return tf.where(delta >= 0.0, decay, 0.0)

    def update_average(self, step):
        """One step of the average: ``a <- tau_t a + (1 - tau_t) w`` for the
        trainable weights; the BatchNorm moving statistics (and any other
        non-trainable state) are copied from the live network, not averaged.

        Runs on every replica from the replicated weights (identical after
        the optimizer's update), so the average is identical on every
        replica without communication. Keras' optimizer ``use_ema`` is not
        used: it has no warm-up of the decay, no start step and averages
        only what the optimizer updates, leaving BatchNorm statistics behind.
        """
        decay = self.averaging_decay(step)
        for a, w, trainable in self._average_pairs():
            value = tf.cast(w.value, a.value.dtype)
            if trainable:
                a.assign(tf.cast(decay, a.value.dtype) * a.value + tf.cast(1.0 - decay, a.value.dtype) * value)
            else:
                a.assign(value)

    def evaluated_network(self):
        """The network that validation, checkpoint selection and export use: the averaged one if any."""
        return self.averaged_network if self.averaged_network is not None else self.network

    @property
    def metrics(self):
        """Every metric, those of ``evaluate`` first (in :attr:`metrics_names` order), then the training ones.

        The last entry groups the loss-like and accuracy metrics for Keras'
        callbacks, so that ``EarlyStopping``, ``ReduceLROnPlateau`` and
        ``ModelCheckpoint`` infer whether to minimise or maximise them.
        """
        compiled = getattr(self, "_compile_metrics", None)
        names = list(EVALUATION_METRICS) + [n for n in self.trackers if n not in EVALUATION_METRICS]
        ordered = [self.trackers[n] for n in EVALUATION_METRICS] + ([compiled] if compiled else [])
        ordered += [self.trackers[n] for n in names[len(EVALUATION_METRICS):]]
        return ordered + _direction_group(self.trackers.values())

    @property
    def metrics_names(self):
        """The names of the values ``evaluate`` returns, in order: :data:`EVALUATION_METRICS`, then compiled metrics."""
        compiled = getattr(self, "_compile_metrics", None)
        names = list(EVALUATION_METRICS)
        if compiled is not None:
            names += [m.name for m in getattr(compiled, "metrics", [])] if compiled.built else [compiled.name]
        return names

    def _compiled_results(self, y, logits, sample_weight):
        """Updates the metrics given to compile() and returns their results."""
        compiled = getattr(self, "_compile_metrics", None)
        if compiled is None:
            return {}
        compiled.update_state(y, logits, sample_weight)
        result = compiled.result()
        return dict(result) if isinstance(result, dict) else {compiled.name: result}

    def _term_names(self):
        names = {"at": ["ce_adv"], "trades": ["ce_clean", "kl"], "mart": ["bce", "weighted_kl"]}[self.defense.base]
        return names + [n for term in self.weight_space_terms for n in term.TERMS]

    def warmup_term(self):
        """The first weight-space term with a warm-up (in epochs), or None."""
        return next((t for t in self.weight_space_terms if t.warmup_epochs() > 0), None)

    # -- pieces of the step -------------------------------------------------

    def _seed(self, purpose: int):
        """The seed of one draw of this step (:func:`tfrobust.seeds.step_seed` at the optimizer's step)."""
        return seeds.step_seed(self.seed, purpose, self.optimizer.iterations)

    def _attack_model_fn(self):
        training = self.bn_mode == "train"

        def model_fn(x):
            return tf.cast(self.network(x, training=training), tf.float32)

        return model_fn

    def _attack_gradient_scale(self) -> float:
        """Scale of the attack loss: large under float16 so small input gradients survive."""
        return 1024.0 if self.network.compute_dtype == "float16" else 1.0

    def decayed_variables(self, variables):
        """The variables among ``variables`` that get the L2 penalty (per ``weight_decay_exclude``)."""
        if self.weight_decay_exclude == "none":
            return list(variables)
        excluded = set()
        for layer in _all_layers(self.network):
            if isinstance(layer, keras.layers.BatchNormalization):
                excluded.update(id(v) for v in layer.trainable_weights)
            elif self.weight_decay_exclude == "batchnorm_and_bias" and getattr(layer, "bias", None) is not None:
                excluded.add(id(layer.bias))
        return [v for v in variables if id(v) not in excluded]

    def adversarial_examples(self, x, y, x_init=None):
        """The training attack of the base objective (for RAT: at noisy conv kernels).

        ``x_init``: the random start (default: drawn for this batch from the step's seed).
        """
        objective = self.defense.objective
        state = self.network.non_trainable_variables
        saved_state = snapshot(state) if self.bn_mode == "train" else None
        offset, saved_weights = [], []
        for term in self.weight_space_terms:  # the weights the attack sees (RAT's noisy kernels)
            variables, offsets = term.attack_weights(self.network.trainable_variables,
                                                     self._seed(seeds.TRAIN_RAT_NOISE))
            saved = snapshot(variables)
            assign_offset(variables, saved, offsets)
            offset, saved_weights = offset + list(variables), saved_weights + saved
        model_fn = self._attack_model_fn()
        if x_init is None:
            x_init = self._attack_start(x)
        x_adv = attacks.pgd(
            model_fn, x, y, self.eps, self.step_size, self.steps, norm=self.norm,
            loss=objective.ATTACK_LOSS, x_init=x_init, gradient_scale=self._attack_gradient_scale(),
            project_start=self.defense.attack_start != "gaussian_unclipped",
        )
        restore(offset[::-1], saved_weights[::-1])
        if saved_state is not None:
            restore(state, saved_state)
        return x_adv

    def _attack_start(self, x):
        return start_point(x, self.eps, self.norm, self.defense.attack_start, self._seed(seeds.TRAIN_ATTACK_START))

    def _loss_terms(self, logits_clean, logits_adv, y, ce_scale=None):
        """The base objective's ``(primary, regulariser, terms)``, its CE term label-smoothed when asked.

        With ``ce_scale`` (:class:`BatchWeights`), examples labelled -1 get no
        CE term and the labelled ones' is multiplied by ``ce_scale``, so that
        its batch mean is the mean over the labelled examples.
        """
        d = self.defense
        name = "ce_adv" if d.base == "at" else "ce_clean"
        if ce_scale is not None:
            labelled = y >= 0
            y = tf.where(labelled, y, tf.zeros_like(y))
        primary, regulariser, terms = d.objective.loss_terms(logits_clean, logits_adv, y, d.beta)
        if self.label_smoothing:
            logits = logits_adv if d.base == "at" else logits_clean
            primary = attacks.smoothed_cross_entropy(logits, y, self.label_smoothing)
            terms = dict(terms, **{name: primary})
        if ce_scale is not None:
            primary = primary * tf.cast(labelled, primary.dtype) * ce_scale
            terms = dict(terms, **{name: primary})
        return primary, regulariser, terms

    def _base_loss(self, x, x_adv, y, training=True, weights=None, fraction=None):
        """Mean base objective over the global batch (divided by the replica count), plus the network's losses.

        ``fraction``: the share of the batch that ``x`` is (a micro-batch), or None for the whole batch.
        """
        logits_adv = self.network(x_adv, training=training)
        logits_clean = self.network(x, training=training) if self.defense.objective.NEEDS_CLEAN_LOGITS else None
        primary, regulariser, _ = self._loss_terms(logits_clean, logits_adv, y, _ce_scale(weights))
        loss = self._global_mean(primary + regulariser, weights, fraction)
        network_losses = self._network_losses(fraction)
        return loss if network_losses is None else loss + network_losses

    def _global_mean(self, per_example, weights=None, fraction=None):
        """This replica's share of the global mean; ``weights = (w, global sum of w)`` makes it weighted.

        For a micro-batch that is ``fraction`` of this replica's batch, its share of that mean.
        """
        if weights is None:
            mean = tf.reduce_mean(per_example) / _num_replicas()
            return mean if fraction is None else mean * fraction
        return tf.math.divide_no_nan(tf.reduce_sum(weights.w * tf.cast(per_example, tf.float32)), weights.total)

    def _sample_weights(self, sample_weight, y):
        """The step's :class:`BatchWeights`, or None for a plain mean (no weights, every example labelled)."""
        if sample_weight is None and not self.allow_unlabelled:
            return None
        if sample_weight is None:
            w = tf.ones(tf.shape(y), tf.float32)
        else:
            w = tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(y))
        if not self.allow_unlabelled:
            return BatchWeights(w, _all_reduce_sum(tf.reduce_sum(w)))
        # One all-reduce for both sums, outside of any conditional.
        total, labelled = _all_reduce_sum([tf.reduce_sum(w), tf.reduce_sum(w * tf.cast(y >= 0, tf.float32))])
        return BatchWeights(w, total, tf.math.divide_no_nan(total, labelled))

    def _metric_weights(self, y, sample_weight):
        """Labels and sample weights for the accuracy metrics: unlabelled examples count with weight 0."""
        if not self.allow_unlabelled:
            return y, sample_weight
        labelled = tf.cast(y >= 0, tf.float32)
        if sample_weight is not None:
            labelled = labelled * tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(y))
        return tf.where(y >= 0, y, tf.zeros_like(y)), labelled

    def _network_losses(self, fraction=None):
        """The network's own losses (regularizers), divided by the replica count (times a micro-batch's fraction)."""
        losses = self.network.losses
        if not losses:
            return None
        total = tf.add_n([tf.cast(l, tf.float32) for l in losses]) / _num_replicas()
        return total if fraction is None else total * fraction

    def _weight_decay_penalty(self, variables, fraction=None):
        """``wd/2 ||w||^2`` over the decayed variables, divided by the replica count (times a micro-batch's fraction)."""
        if not self.weight_decay:
            return 0.0
        decayed = self.decayed_variables(variables)
        penalty = 0.5 * self.weight_decay * tf.add_n([tf.reduce_sum(tf.square(v.value)) for v in decayed])
        penalty = penalty / _num_replicas()
        return penalty if fraction is None else penalty * fraction

    def _perturbing_term(self):
        for term in self.weight_space_terms:
            if term.ascent_variables(self.network.trainable_variables):
                return term
        raise ValueError(f"defense {self.defense.name!r} has no term that perturbs the weights")

    def ascent_gradients(self, x, x_adv, y, weights=None, variables=None, fraction=None):
        """This replica's gradient of the base objective w.r.t. ``variables``; BatchNorm state is left unchanged.

        ``variables`` defaults to the perturbing term's (AWP's kernels). For a
        micro-batch (``fraction`` of the batch) the gradient of its share, not
        yet checked for overflow (see :meth:`_finite_or_zero`).
        """
        if variables is None:
            variables = self._perturbing_term().ascent_variables(self.network.trainable_variables)
        state = self.network.non_trainable_variables
        saved_state = snapshot(state)
        with tf.GradientTape() as tape:
            # Scaled like the training loss so float16 gradients do not underflow;
            # AWP normalises the gradient, so the scale cancels.
            loss = self.optimizer.scale_loss(self._base_loss(x, x_adv, y, True, weights, fraction))
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(k.value) if g is None else tf.cast(g, k.value.dtype) for k, g in zip(variables, grads)]
        restore(state, saved_state)
        return grads if fraction is not None else self._finite_or_zero(grads)

    @staticmethod
    def _finite_or_zero(grads):
        """The gradients, or zeros if any entry overflowed: a NaN added to the weights could not be undone."""
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        return [tf.where(finite, g, tf.zeros_like(g)) for g in grads]

    def weight_perturbation(self, x, x_adv, y, active=True, weights=None, term=None, ascent=None):
        """A term's weight offsets (AWP's ``v``), one entry per ascent variable (zeros when ``active`` is False).

        The gradient is all-reduced across replicas outside of any conditional
        (a cross-replica sum cannot sit inside ``tf.cond``), so every replica
        applies the same ``v``. A zero gradient gives ``v = 0`` exactly.
        ``term`` defaults to the defense's first term with ascent variables;
        ``ascent(variables)`` replaces :meth:`ascent_gradients` on the batch
        (the sum over micro-batches).
        """
        term = term or self._perturbing_term()
        kernels = term.ascent_variables(self.network.trainable_variables)
        if ascent is None:
            ascent = lambda variables: self.ascent_gradients(x, x_adv, y, weights, variables)  # noqa: E731
        if active is True:
            grads = ascent(kernels)
        else:
            grads = tf.cond(active, lambda: ascent(kernels), lambda: [tf.zeros_like(k.value) for k in kernels])
        grads = _all_reduce_sum(grads)
        return term.weight_perturbation([k.value for k in kernels], grads)

    def _perturb_weights(self, x, x_adv, y, weights, ascent=None):
        """Applies every term's weight offsets before the update; returns what :meth:`_restore_weights` undoes."""
        applied = []
        for term in self.weight_space_terms:
            variables = term.ascent_variables(self.network.trainable_variables)
            if not variables:
                continue
            active = self.optimizer.iterations >= term.warmup_epochs() * (self.steps_per_epoch or 1)
            offsets = self.weight_perturbation(x, x_adv, y, active, weights, term, ascent)
            saved = snapshot(variables)
            assign_offset(variables, saved, offsets)
            applied.append((term, variables, saved, offsets))
        return applied

    def _restore_weights(self, applied):
        """Restores the weights exactly (last perturbation first); returns the terms' perturbation statistics."""
        statistics = {}
        for term, variables, saved, offsets in reversed(applied):
            restore(variables, saved)
            statistics.update(term.perturbation_statistics(saved, offsets))
        return statistics

    def _soft_targets(self, logits_clean, logits_adv, y, recorded, tape):
        """Every term's per-example soft targets from statistics summed across replicas, and their metrics."""
        targets, extra = [], {}
        for term, record in zip(self.weight_space_terms, recorded):
            statistics = term.statistics(self.network, logits_clean, logits_adv, y, record, tape)
            if statistics:
                statistics = _all_reduce_sum(statistics)
            target, metrics = term.soft_targets(statistics, y)
            targets.append(target)
            extra.update(metrics)
        return targets, extra

    # -- the steps ----------------------------------------------------------

    def train_step(self, data):
        """One optimizer update from a batch, walked in ``accumulate_steps`` micro-batches (one: the batch).

        The passes, each over the micro-batches: the attack (from the whole
        batch's random start); for each perturbing term (AWP) the base
        objective's gradient, summed and all-reduced before ``v`` is formed;
        when the batch is split, the terms' soft-target statistics at
        ``w + v`` (BatchNorm state restored), summed and all-reduced before
        the targets are formed (unsplit, they come from the objective's own
        forward pass); the objective's gradient, summed; then the exact
        restore of ``w``, one update and the metrics.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = tf.cast(x, tf.float32), tf.cast(y, tf.int32)
        self._check_network(x.shape[1:])  # at trace time, for a network built by its first batch
        batches = MicroBatches(self.accumulate_steps)
        weights = self._sample_weights(sample_weight, y)
        w = weights.w if weights is not None else tf.zeros_like(y, tf.float32)

        def micro_weights(wc):
            return None if weights is None else weights._replace(w=wc)

        x_init = self._attack_start(x)
        _, (x_adv,) = batches.run(lambda f, xc, yc, ic: ([], [self.adversarial_examples(xc, yc, ic)]), [x, y, x_init])

        def ascent(variables):  # the base objective's gradient over the batch
            sums, _ = batches.run(
                lambda f, xc, ac, yc, wc: (self.ascent_gradients(xc, ac, yc, micro_weights(wc), variables, f), []),
                [x, x_adv, y, w],
            )
            return self._finite_or_zero(sums) if batches.split else sums

        applied = self._perturb_weights(x, x_adv, y, weights, ascent)
        stats, extra = self._batch_statistics(batches, x, x_adv, y) if batches.split else (None, {})
        variables = self.trainable_variables
        layout = {}

        def objective(f, xc, ac, yc, wc):
            grads, loss, logits_clean, logits_adv, terms, found = self._objective_pass(
                variables, stats, micro_weights(wc), f, xc, ac, yc)
            layout.update(present=[g is not None for g in grads], names=list(terms), extra=found)
            logits_clean = logits_adv if logits_clean is None else logits_clean  # recomputed after the update
            return ([g for g in grads if g is not None] + [loss],
                    [logits_clean, logits_adv] + [terms[n] for n in layout["names"]])

        sums, parts = batches.run(objective, [x, x_adv, y, w])
        grads, loss = iter(sums[:-1]), sums[-1]
        grads = [next(grads) if present else None for present in layout["present"]]
        extra.update(layout["extra"])
        extra.update(self._restore_weights(applied))
        self._apply(grads, variables)
        logits_clean, logits_adv, *values = parts
        if not self.defense.needs_clean_logits:
            _, (logits_clean,) = batches.run(
                lambda f, xc: ([], [tf.cast(self.network(xc, training=False), tf.float32)]), [x])
        return self._update_metrics(loss, dict(zip(layout["names"], values)), extra, y, logits_clean, logits_adv,
                                    sample_weight)

    def _objective_pass(self, variables, stats, weights, fraction, x, x_adv, y):
        """The forward pass at ``x_adv`` (and ``x``), the soft targets, the objective and its gradient.

        ``stats``: the terms' statistics summed over the whole batch, or None
        to take them from this pass (the batch is not split). Returns the
        gradients, the loss (this replica's share), both logits (clean None
        when the objective does not need it), the named per-example terms
        and the terms' metrics from the statistics of this pass.
        """
        d = self.defense
        watch = any(term.WATCHES_VARIABLES for term in self.weight_space_terms)
        extra = {}
        with tf.GradientTape() as tape:
            inner = (tf.GradientTape(persistent=True, watch_accessed_variables=watch) if stats is None
                     else contextlib.nullcontext())
            with inner:
                logits_adv = tf.cast(self.network(x_adv, training=True), tf.float32)
                logits_clean = tf.cast(self.network(x, training=True), tf.float32) if d.needs_clean_logits else None
                if stats is None:
                    recorded = [t.record(logits_clean, logits_adv, y, self._global_mean) for t in self.weight_space_terms]
            # Soft targets are constants; their cross-replica sums stay off the tape.
            with tape.stop_recording():
                if stats is None:
                    targets, extra = self._soft_targets(logits_clean, logits_adv, y, recorded, inner)
                else:
                    targets = [t.soft_targets(st, y)[0] for t, st in zip(self.weight_space_terms, stats)]
            per_example, terms = self._objective_terms(y, logits_clean, logits_adv, targets, _ce_scale(weights))
            loss = self._training_loss(per_example, weights, fraction)
            scaled = self.optimizer.scale_loss(loss + self._weight_decay_penalty(variables, fraction))
        grads = tape.gradient(scaled, variables)
        del inner
        return grads, loss, logits_clean, logits_adv, terms, extra

    def _batch_statistics(self, batches, x, x_adv, y):
        """The terms' soft-target statistics at ``w + v`` summed over the micro-batches and across replicas,
        and the terms' metrics from them; BatchNorm state is restored after each micro-batch."""
        terms = self.weight_space_terms
        watch = any(term.WATCHES_VARIABLES for term in terms)
        state = self.network.non_trainable_variables
        counts = {}

        def statistics(f, xc, ac, yc):
            saved_state = snapshot(state)
            with tf.GradientTape(persistent=True, watch_accessed_variables=watch) as tape:
                logits_adv = tf.cast(self.network(ac, training=True), tf.float32)
                logits_clean = (tf.cast(self.network(xc, training=True), tf.float32)
                                if self.defense.needs_clean_logits else None)
                mean = lambda v: self._global_mean(v, None, f)  # noqa: E731
                recorded = [t.record(logits_clean, logits_adv, yc, mean) for t in terms]
            found = [t.statistics(self.network, logits_clean, logits_adv, yc, r, tape) for t, r in zip(terms, recorded)]
            del tape
            restore(state, saved_state)
            counts["per_term"] = [len(stats) for stats in found]
            return [tf.stop_gradient(s) for stats in found for s in stats], []

        summed = []
        if any(type(t).statistics is not WeightSpaceTerm.statistics for t in terms):
            summed, _ = batches.run(statistics, [x, x_adv, y])
        stats, extra = [], {}
        for term, count in zip(terms, counts.get("per_term", [0] * len(terms))):  # summed across replicas per term
            mine, summed = summed[:count], summed[count:]
            stats.append(_all_reduce_sum(mine) if mine else [])
            extra.update(term.soft_targets(stats[-1], y)[1])
        return stats, extra

    def _training_loss(self, per_example, weights, fraction=None):
        """The objective's share of this replica (and micro-batch), plus the network's losses."""
        loss = self._global_mean(per_example, weights, fraction)
        network_losses = self._network_losses(fraction)
        return loss if network_losses is None else loss + network_losses

    def _apply(self, grads, variables):
        """One optimizer update (and one step of the weight average)."""
        self.optimizer.apply(grads, variables)
        if self.averaged_network is not None:
            self.update_average(self.optimizer.iterations)

    def _update_metrics(self, loss, terms, extra, y, logits_clean, logits_adv, sample_weight):
        """Updates the training metrics: the loss and its terms weighted alike, the accuracies unweighted.

        As in Keras, sample weights (and ``class_weight``) weight the loss and
        each reported term of it, not the accuracies (``metrics=`` of
        ``compile`` are unweighted too; ``weighted_metrics=`` are weighted).
        Unlabelled examples never count in an accuracy.
        """
        y_metric, labelled = self._metric_weights(y, None)
        self.trackers["loss"].update_state(loss * _num_replicas())
        weights = None if sample_weight is None else tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(y))
        for name, value in terms.items():
            if weights is None:
                self.trackers[name].update_state(tf.reduce_mean(value))
            else:  # the batch's weighted mean, as the loss
                self.trackers[name].update_state(tf.math.divide_no_nan(
                    tf.reduce_sum(weights * tf.cast(value, tf.float32)), tf.reduce_sum(weights)))
        for name, value in extra.items():
            self.trackers[name].update_state(value)
        self.trackers["clean_accuracy"].update_state(y_metric, logits_clean, labelled)
        self.trackers["adv_accuracy"].update_state(y_metric, logits_adv, labelled)
        results = {name: self.trackers[name].result() for name in self._training_metric_names()}
        results.update(self._compiled_results(y_metric, logits_adv, self._metric_weights(y, sample_weight)[1]))
        return results

    def _training_metric_names(self):
        return [n for n in self.trackers if n not in ("pgd_accuracy", "pgd_loss")]

    def _objective_terms(self, y, logits_clean, logits_adv, targets, ce_scale=None):
        """Per-example objective (the base, its primary term mixed by each weight-space term) and its named terms.

        ``targets`` holds each term's soft targets (computed without gradient), in term order;
        ``ce_scale`` as in :meth:`_loss_terms`.
        """
        primary, regulariser, terms = self._loss_terms(logits_clean, logits_adv, y, ce_scale)
        for term, target in zip(self.weight_space_terms, targets):
            primary, reported = term.mix(primary, logits_clean, logits_adv, target)
            terms = dict(terms, **reported)
        return primary + regulariser, terms

    def test_step(self, data):
        """Clean and PGD accuracy (``eval_steps`` steps on ``eval_loss``, uniform start) on validation data.

        With weight averaging, of the averaged network. ``loss`` (so
        ``val_loss`` in ``fit``) is the validation objective, the robust
        cross-entropy: the mean cross-entropy at the adversarial examples
        whichever loss PGD ascends; ``pgd_loss`` is the same number under its
        older name. Sample weights weight the losses, not the accuracies.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = tf.cast(x, tf.float32), tf.cast(y, tf.int32)
        network = self.evaluated_network()
        model_fn = lambda inputs: tf.cast(network(inputs, training=False), tf.float32)  # noqa: E731
        logits = model_fn(x)
        seed = seeds.step_seed(self.seed, seeds.VALIDATION_ATTACK_START, 0)  # the same start at every validation
        x_init = start_point(x, self.eps, self.norm, "uniform", seed)
        x_adv = attacks.pgd(
            model_fn, x, y, self.eps, self.eval_step_size, self.eval_steps, norm=self.norm, x_init=x_init,
            loss=self.eval_loss,
        )
        logits_adv = model_fn(x_adv)
        self.trackers["clean_accuracy"].update_state(y, logits)
        self.trackers["pgd_accuracy"].update_state(y, logits_adv)
        pgd_loss = attacks.cross_entropy(logits_adv, y)
        for name in ("loss", "pgd_loss"):
            if sample_weight is None:
                self.trackers[name].update_state(tf.reduce_mean(pgd_loss))  # one value per batch
            else:
                self.trackers[name].update_state(pgd_loss, sample_weight)
        results = {name: self.trackers[name].result() for name in EVALUATION_METRICS}
        results.update(self._compiled_results(y, logits_adv, sample_weight))
        return results
