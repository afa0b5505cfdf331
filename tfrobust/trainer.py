"""RobustModel: a keras.Model whose ``train_step`` performs adversarial training.

One compiled step does, for a batch ``(x, y)`` (docs/algorithms.md, sections 1-5;
the pieces in :mod:`tfrobust.step`):

1. the inner attack of the base objective at the weights plus the terms'
   attack offsets (RAT's noisy kernels), restored exactly afterwards;
2. each perturbing term's offsets ``v`` (AWP) from the base objective's
   gradient, all-reduced across replicas; the variables become ``w + v``;
3. the forward pass and the terms' soft targets (S2O, RAT);
4. the objective, its gradient, the exact restore of ``w``, the optimizer
   update and the weight average: ``w_new = w - update(grad at w + v)``.

The step knows no term by name (docs/algorithms.md, section 16). With
``accumulate_steps=N`` every pass walks N micro-batches (section 17).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import keras
import tensorflow as tf

from tfrobust import attacks, seeds
from tfrobust.attacks import random_start as start_point  # the attack's random start, same on any replica count
from tfrobust.defenses import Defense
from tfrobust.errors import UserError
from tfrobust.export import export_network
from tfrobust.step import metrics as metrics_lib
from tfrobust.step.averaging import WeightAverage, average_of
from tfrobust.step.checks import (
    WarmupLengthCheck, check_arrays, check_divisible, check_network, check_wrapped_network, check_outputs_are_logits, input_shape_of_data,
)
from tfrobust.step.hooks import WeightSpaceHooks
from tfrobust.step.fused_batch_norm import fused_network
from tfrobust.step.metrics import EVALUATION_METRICS
from tfrobust.step.micro_batches import MicroBatches
from tfrobust.step.objective import (
    Objective, ce_scale, finite_or_zero, global_mean, metric_weights, num_replicas, sample_weights,
)
from tfrobust.step.attack import start_radius, training_attack, training_attack_name
from tfrobust.step.settings import FIELDS, StepSettings
from tfrobust.weight_space import restore, snapshot

__all__ = ["RobustModel", "StepSettings", "start_point", "check_outputs_are_logits", "EVALUATION_METRICS"]


@keras.saving.register_keras_serializable(package="tfrobust")
class RobustModel(keras.Model):
    """Wraps a network (images in [0, 1] -> logits) with an adversarial train_step.

    A regular Keras model: ``compile``/``fit``/``evaluate``, callbacks, ``save("x.keras")`` and
    ``keras.models.load_model`` (after ``import tfrobust``) work; the defense is saved by name and
    hyperparameters, the network as a nested Keras object. The network's own losses (regularizers) are
    part of the objective, also in AWP's ascent; ``sample_weight`` makes the loss a weighted mean over
    examples (the attack and S2O's and RAT's batch statistics stay unweighted); metrics given to
    ``compile`` are computed on the adversarial logits. The train step uses the live network; everything
    else (``predict``, ``evaluate``, :meth:`export`) the :meth:`evaluated_network`, the weight average
    when there is one. While ``train_on_pgd`` is True (set by :mod:`tfrobust.collapse` after a rollback,
    read when the step is traced) a single-step base trains on PGD with the step's settings.

    Args:
      network: a Keras model mapping float32 NHWC images in [0, 1] to logits. A network that outputs
        probabilities, or that a defense cannot train (RAT needs the logits straight from a Dense
        layer), is refused as soon as its input shape is known.
      defense, settings: a :class:`~tfrobust.defenses.Defense` (or a defense name) and a
        :class:`~tfrobust.step.settings.StepSettings` (attacks, weight decay, averaging, accumulation, ...).
      **keywords: instead of ``settings``, its fields (``eps=8/255, step_size=2/255, steps=10,
        steps_per_epoch=..., ema_decay=...``); any other keyword goes to ``keras.Model``. A defense
        with a warm-up (``trades+awp``: 10 epochs) needs ``steps_per_epoch``, and ``fit`` refuses
        epochs of another length when Keras knows their length.
    """

    train_on_pgd = False

    def __init__(self, network: keras.Model, defense: Defense, settings: Optional[StepSettings] = None, **keywords):
        if isinstance(defense, str):
            defense = Defense(defense)
        if not isinstance(defense, Defense):
            raise UserError(f"defense must be a Defense or a defense name such as 'trades+awp', got {type(defense).__name__}")
        given = {k: keywords.pop(k) for k in FIELDS if k in keywords}
        if settings is None:
            missing = [k for k in ("eps", "step_size", "steps") if k not in given]
            if missing:
                raise UserError(f"RobustModel needs {', '.join(missing)} (or settings=StepSettings(...))")
            settings = StepSettings(**given)
        elif given:
            raise UserError(f"pass either settings or its fields, not both ({', '.join(given)})")
        super().__init__(**keywords)
        terms = tuple(defense.weight_space_terms())
        settings.check_for(defense, terms)
        check_wrapped_network(network)
        self.network = network
        self.defense = defense
        self.settings = settings
        self.hooks = WeightSpaceHooks(terms, settings.steps_per_epoch)
        self.objective = Objective(defense, terms, settings)
        self.average = WeightAverage(settings.ema_decay, settings.ema_start_step) if settings.ema_decay is not None else None
        self._network_checked = False
        self.averaged_network = None
        if getattr(network, "built", False):
            self._check_network()
            self._build_average()
            self.built = True
        statistics = [n for t in terms for n in t.STATISTICS]
        self.trackers = metrics_lib.trackers(self.objective.term_names(), statistics)
        if self.objective.state_variables():  # ELLE-A's weight and error moments: saved with the model
            self.regulariser_state = self.objective.state_variables()

    # -- Keras plumbing ---------------------------------------------------

    def get_config(self):
        """The network, the defense (name and hyperparameters) and every setting."""
        return {"name": self.name, "trainable": self.trainable,
                "network": keras.saving.serialize_keras_object(self.network),
                "defense": self.defense.hyperparameters(), **self.settings.to_config()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        defense = Defense(**config.pop("defense"))
        return cls(network, defense, **config)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Keras' compile without ``loss``: the defense's objective is the loss."""
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
        """Builds an unbuilt network on ``input_shape`` and checks it."""
        if not self.network.built:
            self.network.build(input_shape)
        self._check_network(tuple(input_shape)[1:])
        self._build_average()
        self.built = True

    def _check_network(self, input_shape=None):
        """The network's checks (:func:`~tfrobust.step.checks.check_network`), once its input shape is known."""
        if not self._network_checked:
            self._network_checked = check_network(self.network, self.hooks.terms, input_shape)

    def _build_average(self):
        """Creates the weight average (once), a tracked attribute so that it is saved with the live weights."""
        if self.average is not None and self.averaged_network is None:
            self.averaged_network = average_of(self.network)

    def fit(self, *args, callbacks=None, **kwargs):
        """Keras' fit, after the network's checks; refuses an epoch length that would change a warm-up,
        and a batch size that does not split into ``accumulate_steps`` micro-batches."""
        n = self.settings.accumulate_steps
        check_divisible(kwargs.get("batch_size"), n)
        data = args[0] if args else kwargs.get("x")
        if isinstance(data, tf.data.Dataset):  # a batch size fixed in the data set's shapes
            check_divisible(tf.nest.flatten(data.element_spec)[0].shape[0], n)
        check_arrays(data, args[1] if len(args) > 1 else kwargs.get("y"), self.settings.allow_unlabelled)
        self._check_network(input_shape_of_data(data))  # before anything is traced
        callbacks = list(callbacks or [])
        term = self.hooks.warmup_term()
        if term is not None:
            callbacks.append(WarmupLengthCheck(self.settings.steps_per_epoch, term))
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def call(self, inputs, training=False):
        """The live network when training, otherwise :meth:`evaluated_network`."""
        network = self.network if training else self.evaluated_network()
        return network(inputs, training=training)

    def evaluated_network(self):
        """The network that inference, validation, checkpoint selection and export use: the average if any."""
        return self.averaged_network if self.averaged_network is not None else self.network

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Exports :meth:`evaluated_network`: as a SavedModel (the default), ``serve`` maps ``images`` to
        ``{"logits": ...}`` (:func:`tfrobust.export.export_network`); other formats go to Keras' export."""
        network = self.evaluated_network()
        if format != "tf_saved_model" or input_signature is not None or kwargs:
            return network.export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)
        export_network(network, str(filepath))

    def description(self) -> str:
        """What this model trains with, in a few lines: the defense, the attacks, the averaging, the network."""
        d, s = self.defense, self.settings
        used = ", ".join(f"{k}={v}" for k, v in d.hyperparameters().items()
                         if (k == "beta" and v is not None) or any(k.startswith(t + "_") for t in d.terms))
        average = (f"decay {s.ema_decay}, from optimizer step {s.ema_start_step:g}; inference uses the average"
                   if s.ema_decay is not None else "none")
        return "\n".join([
            f"RobustModel: defense {d.name}" + (f" ({used})" if used else ""),
            f"  training attack: {training_attack_name(d.objective, s)}, BatchNorm in {s.bn_mode} mode",
            f"  validation attack: PGD-{s.eval_steps} on {s.eval_loss}, step {s.validation_step_size:.6g}",
            f"  weight averaging: {average}",
            f"  network: {self.network.name} ({type(self.network).__name__})",
        ])

    def summary(self, line_length=None, positions=None, print_fn=None, expand_nested=False, show_trainable=False,
                layer_range=None):
        """:meth:`description`, then Keras' summary of the network."""
        (print_fn or print)(self.description())
        self.network.summary(line_length=line_length, positions=positions, print_fn=print_fn,
                             expand_nested=expand_nested, show_trainable=show_trainable, layer_range=layer_range)

    # -- metrics ----------------------------------------------------------

    @property
    def metrics(self):
        """Every metric: those ``evaluate`` returns first (:attr:`metrics_names`), then the training ones, then
        one group that tells Keras' callbacks (``EarlyStopping``, ...) which way each improves."""
        return metrics_lib.ordered(self.trackers, getattr(self, "_compile_metrics", None))

    @property
    def metrics_names(self):
        """The names of the values ``evaluate`` returns, in order."""
        return metrics_lib.evaluation_names(getattr(self, "_compile_metrics", None))

    def _compiled_results(self, y, logits, sample_weight):
        """Updates the metrics given to compile() and returns their results."""
        compiled = getattr(self, "_compile_metrics", None)
        if compiled is None:
            return {}
        compiled.update_state(y, logits, sample_weight)
        result = compiled.result()
        return dict(result) if isinstance(result, dict) else {compiled.name: result}

    def _update_metrics(self, loss, terms, extra, y, logits_clean, logits_adv, sample_weight):
        """The training metrics (:func:`~tfrobust.step.metrics.update_training`) and the compiled ones; unlabelled
        examples never count in an accuracy."""
        allow = self.settings.allow_unlabelled
        y_metric, labelled = metric_weights(y, None, allow)
        results = metrics_lib.update_training(self.trackers, loss * num_replicas(), terms, extra, y_metric, labelled,
                                              sample_weight, logits_clean, logits_adv)
        results.update(self._compiled_results(y_metric, logits_adv, metric_weights(y, sample_weight, allow)[1]))
        return results

    # -- pieces of the step, public for tests and benchmarks -------------------

    def _seed(self, purpose: int):
        """The seed of one draw of this step (:func:`tfrobust.seeds.step_seed` at the optimizer's step)."""
        return seeds.step_seed(self.settings.seed, purpose, self.optimizer.iterations)

    def _attack_model_fn(self):
        """The network as the training attack sees it: float32 logits, BatchNorm in ``bn_mode`` (fused_batch_norm.py)."""
        training, network = self.settings.bn_mode == "train", fused_network(self.network)
        return lambda t: tf.cast(network(t, training=training), tf.float32)

    def _attack_gradient_scale(self) -> float:
        """Scale of the attack loss: large under float16 so small input gradients survive."""
        return 1024.0 if self.network.compute_dtype == "float16" else 1.0

    def _attack_start(self, x):
        s, seed = self.settings, self._seed(seeds.TRAIN_ATTACK_START)
        return start_point(x, start_radius(self.defense.objective, s, self.train_on_pgd), s.norm,
                           self.defense.attack_start, seed)

    def adversarial_examples(self, x, y, x_init=None):
        """The training attack of the base objective, at the terms' attack offsets (RAT's noisy kernels).

        ``x_init``: the random start (default: drawn for this batch from the step's seed).
        """
        s = self.settings
        state = self.network.non_trainable_variables
        saved_state = snapshot(state) if s.bn_mode == "train" else None
        applied = self.hooks.offset_for_attack(self.network.trainable_variables, self._seed(seeds.TRAIN_RAT_NOISE))
        model_fn = self._attack_model_fn()
        x_init = self._attack_start(x) if x_init is None else x_init
        x_adv = training_attack(self.defense, s, model_fn, x, y, x_init, self._attack_gradient_scale(),
                                self.train_on_pgd)
        self.hooks.restore_after_attack(applied)
        if saved_state is not None:
            restore(state, saved_state)
        return x_adv

    def ascent_gradients(self, x, x_adv, y, weights=None, variables=None, fraction=None):
        """This replica's gradient of the base objective w.r.t. ``variables`` (default: the perturbing term's);
        BatchNorm state is left unchanged. For a micro-batch (``fraction`` of the batch) the gradient of its
        share, not yet checked for overflow; for the batch, zeros if any entry overflowed."""
        network = self.network
        if variables is None:
            variables = self.hooks.perturbing_term(network.trainable_variables).ascent_variables(
                network.trainable_variables)
        state = network.non_trainable_variables
        saved_state = snapshot(state)
        with tf.GradientTape() as tape:
            # Scaled like the training loss so float16 gradients do not underflow; AWP normalises the gradient.
            loss = self.optimizer.scale_loss(self.objective.base_loss(network, x, x_adv, y, True, weights, fraction))
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(k.value) if g is None else tf.cast(g, k.value.dtype) for k, g in zip(variables, grads)]
        restore(state, saved_state)
        return grads if fraction is not None else finite_or_zero(grads)

    def weight_perturbation(self, x, x_adv, y, active=True, weights=None, term=None):
        """A term's weight offsets on this batch (AWP's ``v``; default: the first perturbing term)."""
        variables = self.network.trainable_variables
        term = term or self.hooks.perturbing_term(variables)
        ascent = lambda kernels: self.ascent_gradients(x, x_adv, y, weights, kernels)  # noqa: E731
        return self.hooks.weight_perturbation(term, variables, active, ascent)

    # -- the steps ----------------------------------------------------------

    def train_step(self, data):
        """One optimizer update from a batch, each pass walked in ``accumulate_steps`` micro-batches.

        The passes: the attack (from the whole batch's random start); each
        perturbing term's base-objective gradient, summed and all-reduced
        before ``v`` is formed; when the batch is split, the terms'
        statistics at ``w + v`` (unsplit, they come from the objective's own
        forward pass); the objective's gradient; then the exact restore of
        ``w``, one update and the metrics.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = tf.cast(x, tf.float32), tf.cast(y, tf.int32)
        self._check_network(x.shape[1:])  # at trace time, for a network built by its first batch
        batches = MicroBatches(self.settings.accumulate_steps)
        weights = sample_weights(sample_weight, y, self.settings.allow_unlabelled)
        w = weights.w if weights is not None else tf.zeros_like(y, tf.float32)

        def micro(wc):
            return None if weights is None else weights._replace(w=wc)

        x_init = self._attack_start(x)
        _, (x_adv,) = batches.run(lambda f, xc, yc, ic: ([], [self.adversarial_examples(xc, yc, ic)]), [x, y, x_init])

        def ascent(variables):  # the base objective's gradient over the batch
            sums, _ = batches.run(
                lambda f, xc, ac, yc, wc: (self.ascent_gradients(xc, ac, yc, micro(wc), variables, f), []),
                [x, x_adv, y, w])
            return finite_or_zero(sums) if batches.split else sums

        variables = self.trainable_variables
        applied = self.hooks.perturb(self.network.trainable_variables, self.optimizer.iterations, ascent)
        stats, extra = (None, {})
        if batches.split:
            stats, extra = self.hooks.batch_statistics(self.network, self._forward, batches, x, x_adv, y,
                                                       lambda v, f: global_mean(v, None, f))
        layout = {}
        draws = self.objective.input_draws(x, self._seed)  # none without an input-space term

        def objective(f, xc, ac, yc, wc, *dc):
            grads, loss, logits_clean, logits_adv, terms, found = self._objective_pass(
                variables, stats, micro(wc), f, xc, ac, yc, dc if draws else None)
            layout.update(present=[g is not None for g in grads], names=list(terms), extra=found)
            logits_clean = logits_adv if logits_clean is None else logits_clean  # recomputed after the update
            return ([g for g in grads if g is not None] + [loss],
                    [logits_clean, logits_adv] + [terms[n] for n in layout["names"]])

        sums, parts = batches.run(objective, [x, x_adv, y, w] + draws)
        grads, loss = iter(sums[:-1]), sums[-1]
        grads = [next(grads) if present else None for present in layout["present"]]
        extra.update(layout["extra"])
        extra.update(self.hooks.restore(applied))
        self.optimizer.apply(grads, variables)
        extra.update(self.objective.after_step(dict(zip(layout["names"], parts[2:]))))  # ELLE-A's adaptation
        if self.averaged_network is not None:
            self.average.update(self.averaged_network, self.network, self.optimizer.iterations)
        logits_clean, logits_adv, *values = parts
        if not self.defense.needs_clean_logits:  # AT: one more pass for the clean accuracy, if it is reported
            logits_clean = self._clean_logits(batches, x) if self.settings.train_clean_accuracy else None
        return self._update_metrics(loss, dict(zip(layout["names"], values)), extra, y, logits_clean, logits_adv,
                                    sample_weight)

    def _clean_logits(self, batches, x):
        """The updated network's float32 logits of the clean batch in inference mode (AT's clean accuracy)."""
        network = fused_network(self.network)
        return batches.run(lambda f, xc: ([], [tf.cast(network(xc, training=False), tf.float32)]), [x])[1][0]

    def _forward(self, x, x_adv):
        """``(logits_clean, logits_adv)`` of the live network in training mode (clean None when not needed)."""
        network = fused_network(self.network)
        logits_adv = tf.cast(network(x_adv, training=True), tf.float32)
        logits_clean = tf.cast(network(x, training=True), tf.float32) if self.defense.needs_clean_logits else None
        return logits_clean, logits_adv

    def _objective_pass(self, variables, stats, weights, fraction, x, x_adv, y, draws=None):
        """The forward pass, the soft targets, the objective and its gradient on (a micro-batch of) the batch.

        ``stats``: the terms' statistics summed over the batch, or None to take
        them from this pass; ``draws``: the input-space terms' noise (or None). Returns the gradients, the loss (this replica's
        share), both logits, the named per-example terms and the terms'
        metrics from the statistics of this pass.
        """
        extra = {}
        with tf.GradientTape() as tape:
            inner = (tf.GradientTape(persistent=True, watch_accessed_variables=self.hooks.watches_variables)
                     if stats is None else contextlib.nullcontext())
            with inner:
                logits_clean, logits_adv = self._forward(x, x_adv)
                if stats is None:
                    recorded = self.hooks.record(logits_clean, logits_adv, y, global_mean)
            # Soft targets are constants; their cross-replica sums stay off the tape.
            with tape.stop_recording():
                if stats is None:
                    targets, extra = self.hooks.soft_targets(self.network, logits_clean, logits_adv, y, recorded, inner)
                else:
                    targets = self.hooks.targets(stats, y)
            per_example, terms = self.objective.objective_terms(y, logits_clean, logits_adv, targets, ce_scale(weights))
            per_example, terms = self.objective.add_input_penalty(self.network, x, y, draws, per_example, terms)
            loss = self.objective.training_loss(self.network, per_example, weights, fraction)
            penalty = self.objective.weight_decay_penalty(self.network, variables, fraction)
            scaled = self.optimizer.scale_loss(loss + penalty)
        grads = tape.gradient(scaled, variables)
        del inner
        return grads, loss, logits_clean, logits_adv, terms, extra

    def test_step(self, data):
        """Clean and PGD accuracy (``eval_steps`` steps on ``eval_loss``, uniform start) of the evaluated network.

        ``loss`` (``val_loss`` in ``fit``) is the validation objective, the
        mean cross-entropy at the adversarial examples whichever loss PGD
        ascends, also reported as ``pgd_loss``. Sample weights weight the
        losses, not the accuracies.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = tf.cast(x, tf.float32), tf.cast(y, tf.int32)
        s, network = self.settings, fused_network(self.evaluated_network())
        model_fn = lambda inputs: tf.cast(network(inputs, training=False), tf.float32)  # noqa: E731
        logits = model_fn(x)
        seed = seeds.step_seed(s.seed, seeds.VALIDATION_ATTACK_START, 0)  # the same start at every validation
        x_init = start_point(x, s.eps, s.norm, "uniform", seed)
        x_adv = attacks.pgd(model_fn, x, y, s.eps, s.validation_step_size, s.eval_steps, norm=s.norm, x_init=x_init,
                            loss=s.eval_loss)
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
