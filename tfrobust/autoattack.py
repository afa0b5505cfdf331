"""AutoAttack in TensorFlow: APGD-CE, APGD-DLR, APGD-T, FAB, FAB-T and Square, and their ensembles.

The ensemble of Croce and Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020), with

* APGD (ibid., section 3 and Algorithm 1): projected gradient ascent with
  momentum 0.75 and a step size that starts at 2 eps and is halved at
  checkpoints where progress stalled; cross-entropy, the difference of logits
  ratio (DLR) or the targeted DLR loss (ibid., section 4).
* FAB (Croce and Hein, "Minimally distorted adversarial examples with a fast
  adaptive boundary attack", ICML 2020, Algorithm 1): repeated projections onto
  the linearised decision boundary intersected with the box [0, 1]^d, biased
  towards the original point, with extrapolation (eta) and a backward step
  (beta); the targeted variant linearises only the boundary to one class.
* Square (Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a
  query-efficient black-box adversarial attack via random search", ECCV 2020,
  Algorithms 1-3): random search with square-shaped updates on the margin loss,
  no gradients.

A ``model_fn`` is any callable mapping float32 NHWC images in [0, 1] to
logits of shape (B, C); a ``keras.Model`` (or layer) is called with
``training=False``. The attacks only read the model through ``model_fn`` and
never change a variable. Every attack returns points inside the eps-ball
(L-inf or L2) around ``x`` and inside [0, 1].

The attack functions take all of ``x`` as one batch and run eagerly, calling
compiled ``tf.function`` s (one ``tf.while_loop`` per run, no Python loop
per iteration); :func:`run_autoattack` splits the data into batches. Random
numbers come from stateless ops keyed by ``seed``: the same seed, data and
batch size give the same result (on a GPU, bit-exact repetition also needs
``tf.config.experimental.enable_op_determinism()``). Compiled functions are
cached per model object (held weakly), so repeated calls do not re-trace.

Differences from the reference implementation (fra31/auto-attack), all
documented at the function that has them:

* APGD's first oscillation check compares the first iterate with the starting
  point; the reference compares it with an unwritten (zero) history entry.
* APGD stops once every example of the batch is misclassified and FAB once
  every example has an adversarial point within eps (the reference keeps
  iterating; only which adversarial point is returned can differ).
* Square draws the square's position (and, for L-inf, its colour; for L2, the
  orientation of its pattern) for each image separately, as in the paper; the
  reference draws one per batch. Its position covers the whole image; the
  reference never places a square on the last row or column.
* The number of target classes is capped at C - 1, and a binary or 3-class
  model is refused by the targeted DLR loss (it needs the 4th largest logit).
* APGD warns about examples with an all-zero input gradient for every loss
  (the reference only for DLR); FAB's projection is solved exactly in float64
  from sorted breakpoints (the reference bisects in float32).
* :func:`run_autoattack` projects every returned point onto the ball and
  [0, 1] and classifies it again. The reference's automatic checks are
  computed by :func:`tfrobust.integrity.autoattack_flags` and returned as
  ``flags`` (Square's check counts the examples Square itself broke).
* With EOT (version "rand"), APGD keeps the reference's mean-gradient step
  but picks its best point and tests misclassification on the mean loss and
  mean logits of the passes, and every verdict of the ensemble is the argmax
  of the mean logits of 20 passes (the reference uses the last pass, and one
  pass for the final verdict).

Versions (:data:`VERSIONS`, budgets in :data:`VERSION_ATTACKS`, following
the reference's ``set_version``; docs/algorithms.md, section 15 gives the lines):
"standard" (APGD-CE, APGD-T, FAB-T, Square), "plus" (APGD-CE and APGD-DLR
with 5 restarts, FAB with 5 restarts, Square, APGD-T, FAB-T), "rand" (APGD-CE
and APGD-DLR with EOT over 20 passes) and "fast" (APGD-CE, APGD-T).
:func:`run_autoattack` can write every decided batch to a JSON-lines file
and resume from it, and can split each batch across the replicas of a
``tf.distribute`` strategy.

``reference_quirks=True`` on :func:`apgd`, :func:`apgd_targeted` and
:func:`square` restores the reference behaviour of the first and third
points (the early stops of the second change no accuracy).
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from typing import Callable, Dict, Mapping, Sequence, Union

import numpy as np
import tensorflow as tf

from tfrobust.errors import UserError, unknown_choice

__all__ = [
    "NORMS",
    "APGD_LOSSES",
    "ATTACKS",
    "VERSIONS",
    "apgd",
    "apgd_targeted",
    "fab_targeted",
    "fab",
    "square",
    "ALL_ATTACKS",
    "VERSION_ATTACKS",
    "run_autoattack",
    "project",
    "perturbation_norms",
]

NORMS = ("linf", "l2")
APGD_LOSSES = ("ce", "dlr", "dlr-targeted")

# Tolerance of the final check that every returned point lies in the ball.
BALL_TOLERANCE = 1e-6

_TINY = 1e-12


# --------------------------------------------------------------------------
# Argument checks and conversions
# --------------------------------------------------------------------------


def _check_norm(norm) -> str:
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise unknown_choice("norm", norm, NORMS)
    return norm.lower()


def _check_eps(eps) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise UserError(f"eps must be a number >= 0, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def _check_positive_int(name, value, minimum=1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    return int(seed) % (2**62)


def _as_inputs(x, y):
    """Converts (x, y) to float32 images in [0, 1] and int32 labels (tensors)."""
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise UserError(f"x must hold floating-point images in [0, 1], got dtype {x.dtype.name}")
    x = tf.cast(x, tf.float32)
    if x.shape.rank is None or x.shape.rank < 2:
        raise UserError(f"x must have a batch axis and at least one feature axis, got shape {x.shape}")
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2:
        y = tf.argmax(y, axis=-1)
    if y.shape.rank != 1 or y.shape[0] != x.shape[0]:
        raise UserError(f"y must hold one integer label per example: x has shape {x.shape}, y has shape {y.shape}")
    if y.dtype.is_floating:
        if not bool(tf.reduce_all(tf.equal(y, tf.round(y)))):
            raise UserError("y must hold integer class labels")
    y = tf.cast(y, tf.int32)
    if x.shape[0] and x.shape[0] > 0:
        lo = float(tf.reduce_min(x))
        hi = float(tf.reduce_max(x))
        if lo < -BALL_TOLERANCE or hi > 1 + BALL_TOLERANCE or not (math.isfinite(lo) and math.isfinite(hi)):
            raise UserError(
                f"x must lie in [0, 1] (normalisation belongs inside the model), got values in [{lo:.4g}, {hi:.4g}]"
            )
        x = tf.clip_by_value(x, 0.0, 1.0)
    return x, y


def _seed_tensor(seed: int, *stream: int):
    """A stateless-RNG seed for one (attack, target, restart) stream."""
    code = 0
    for part in stream:
        code = code * 1009 + int(part) + 1
    return tf.constant([seed, code % (2**62)], dtype=tf.int64)


# --------------------------------------------------------------------------
# Model calls and the per-model cache of compiled functions
# --------------------------------------------------------------------------


def _call_model(model, x):
    try:
        import keras

        is_layer = isinstance(model, keras.layers.Layer)
    except ImportError:  # pragma: no cover
        is_layer = False
    out = model(x, training=False) if is_layer else model(x)
    if isinstance(out, Mapping):
        if len(out) != 1:
            raise UserError(f"model_fn returned a dict with keys {sorted(out)}; expected logits")
        out = next(iter(out.values()))
    if isinstance(out, (list, tuple)) and len(out) == 1:
        out = out[0]
    return tf.cast(out, tf.float32)


def _model_caller(model):
    """``x -> logits`` holding ``model`` weakly when possible (no cache cycles)."""
    try:
        ref = weakref.ref(model)
    except TypeError:
        return lambda x: _call_model(model, x)

    def call(x):
        m = ref()
        if m is None:  # pragma: no cover
            raise RuntimeError("the model was garbage-collected while an attack was using it")
        return _call_model(m, x)

    return call


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(model, key, build):
    """The compiled function ``build(call)`` for ``model`` and the static ``key``, cached."""
    try:
        table = _CACHE.get(model)
        if table is None:
            table = {}
            _CACHE[model] = table
    except TypeError:
        return build(_model_caller(model))
    fn = table.get(key)
    if fn is None:
        fn = build(_model_caller(model))
        table[key] = fn
    return fn


def _image_spec(shape):
    return tf.TensorSpec([None] + list(shape[1:]), tf.float32)


_LABEL_SPEC = tf.TensorSpec([None], tf.int32)
_SCALAR_SPEC = tf.TensorSpec([], tf.float32)
_SEED_SPEC = tf.TensorSpec([2], tf.int64)


def _mean_logits(call, passes):
    """``x -> `` the mean of ``passes`` forward passes (one pass: the call itself)."""
    if passes == 1:
        return call

    def mean(x):
        def body(i, total):
            return i + 1, total + call(x)

        _, total = tf.while_loop(lambda i, _: i < passes, body, (tf.constant(1), call(x)))
        return total / float(passes)

    return mean


def _predict_logits(model, x, batch_size=None, passes=1):
    """Logits of ``model`` at ``x`` (eager tensor), in batches of ``batch_size``.

    With ``passes`` > 1, the mean logits of that many forward passes: the
    prediction of a randomised model in expectation.
    """
    key = ("logits", tuple(x.shape[1:])) if passes == 1 else ("logits", tuple(x.shape[1:]), int(passes))
    fn = _compiled(
        model,
        key,
        lambda call: tf.function(_mean_logits(call, int(passes)), input_signature=[_image_spec(x.shape)]),
    )
    n = int(x.shape[0])
    if n == 0:
        return tf.zeros([0, 0], tf.float32)
    if batch_size is None or batch_size >= n:
        return fn(x)
    return tf.concat([fn(x[i : i + batch_size]) for i in range(0, n, batch_size)], axis=0)


# --------------------------------------------------------------------------
# Norms, balls and losses
# --------------------------------------------------------------------------


def _bcast(v, x):
    """Reshapes a per-example vector to broadcast against ``x``."""
    return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1))


def _flat(t):
    return tf.reshape(t, [tf.shape(t)[0], -1])


def _norm(t, norm):
    """Per-example L-inf or L2 norm, shape (B,)."""
    flat = _flat(t)
    if norm == "linf":
        return tf.reduce_max(tf.abs(flat), axis=1)
    return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))


def _normalize(t, norm):
    return t / _bcast(_norm(t, norm) + _TINY, t)


def _project(x_adv, x, eps, norm):
    """Projection onto the eps-ball around ``x``, then clipping to [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        n = _norm(delta, "l2")
        delta = delta * _bcast(tf.minimum(1.0, eps / tf.maximum(n, _TINY)), delta)
    return tf.clip_by_value(x + delta, 0.0, 1.0)


def project(x_adv, x, eps, norm="linf"):
    """Projects ``x_adv`` onto the eps-ball (L-inf or L2) around ``x``, then onto [0, 1]."""
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    return _project(tf.cast(x_adv, tf.float32), tf.cast(x, tf.float32), eps, norm)


def perturbation_norms(x_adv, x, norm="linf") -> np.ndarray:
    """Per-example L-inf or L2 norm of ``x_adv - x`` (float64, numpy)."""
    norm = _check_norm(norm)
    d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
    if norm == "linf":
        return np.abs(d).max(axis=1) if d.shape[1] else np.zeros(len(x))
    return np.sqrt((d * d).sum(axis=1))


def _onehot(y, logits):
    return tf.one_hot(y, tf.shape(logits)[-1], dtype=logits.dtype)


def _ce_loss(logits, y):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


def _margin(logits, y):
    """``z_y - max_{k != y} z_k`` (positive when correctly classified)."""
    oh = _onehot(y, logits)
    z_y = tf.reduce_sum(logits * oh, axis=-1)
    z_other = tf.reduce_max(tf.where(oh > 0, tf.constant(-np.inf, logits.dtype), logits), axis=-1)
    return z_y - z_other


def _dlr_loss(logits, y):
    """Difference of logits ratio (Croce & Hein 2020, section 4), to be maximised.

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with ``z_pi`` the sorted logits.
    """
    top = tf.math.top_k(logits, k=3).values
    return -_margin(logits, y) / (top[:, 0] - top[:, 2] + _TINY)


def _dlr_targeted_loss(logits, y, y_target):
    """Targeted DLR loss (Croce & Hein 2020, section 4), to be maximised.

    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``.
    """
    top = tf.math.top_k(logits, k=4).values
    z_y = tf.reduce_sum(logits * _onehot(y, logits), axis=-1)
    z_t = tf.reduce_sum(logits * _onehot(y_target, logits), axis=-1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY)


def _input_gradient(call, x, objective):
    """Logits at ``x``, the per-example objective and its gradient w.r.t. ``x``.

    A model whose output does not depend differentiably on its input (for
    example a rounding layer) gets a zero gradient, not an error.
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x)
        logits = call(x)
        values = objective(logits)
        total = tf.reduce_sum(values)
    grad = tape.gradient(total, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return logits, values, tf.cast(grad, tf.float32)


def _eot_input_gradient(call, x, objective, eot_iter):
    """Expectation over Transformation (Athalye et al., ICML 2018) of :func:`_input_gradient`.

    Runs ``eot_iter`` forward and backward passes at ``x`` (a randomised
    model draws new randomness in each) and returns the mean logits, the mean
    objective and the mean gradient. The reference (autopgd_base.py, the
    ``eot_iter`` loops) averages the gradients the same way but keeps the
    logits and loss of the last pass only.
    """
    if eot_iter == 1:
        return _input_gradient(call, x, objective)

    def body(i, logits_sum, values_sum, grad_sum):
        logits, values, grad = _input_gradient(call, x, objective)
        return i + 1, logits_sum + logits, values_sum + values, grad_sum + grad

    logits0, values0, grad0 = _input_gradient(call, x, objective)
    _, logits, values, grad = tf.while_loop(
        lambda i, *_: i < eot_iter, body, (tf.constant(1), logits0, values0, grad0))
    scale = 1.0 / float(eot_iter)
    return logits * scale, values * scale, grad * scale


def _predicted(logits):
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def _rank_targets(logits, rank):
    """The class with the ``rank``-th largest logit (rank 1 is the top class)."""
    order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    return tf.cast(order[:, rank - 1], tf.int32)


# --------------------------------------------------------------------------
# APGD
# --------------------------------------------------------------------------


def _apgd_schedule(n_iter):
    """Checkpoint lengths of APGD: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    first = max(int(0.22 * n_iter), 1)
    minimum = max(int(0.06 * n_iter), 1)
    decrease = max(int(0.03 * n_iter), 1)
    return first, minimum, decrease


def _build_apgd(call, norm, loss, n_iter, rho, quirks, eot_iter=1):
    first_len, min_len, len_decr = _apgd_schedule(n_iter)

    def objective_for(y, y_target):
        if loss == "ce":
            return lambda logits: _ce_loss(logits, y)
        if loss == "dlr":
            return lambda logits: _dlr_loss(logits, y)
        return lambda logits: _dlr_targeted_loss(logits, y, y_target)

    def run(x, y, y_target, eps, seed):
        objective = objective_for(y, y_target)
        batch = tf.shape(x)[0]
        if norm == "linf":
            t = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
        else:
            t = tf.random.stateless_normal(tf.shape(x), seed)
        x_adv = tf.clip_by_value(x + eps * _normalize(t, norm), 0.0, 1.0)
        logits, loss0, grad = _eot_input_gradient(call, x_adv, objective, eot_iter)
        zero_grad = tf.reduce_sum(tf.cast(tf.reduce_all(tf.equal(_flat(grad), 0.0), axis=1), tf.int32))
        acc = tf.equal(_predicted(logits), y)
        step = tf.fill([batch], 2.0 * eps)
        prev_loss = tf.zeros_like(loss0) if quirks else loss0

        def body(i, x_adv, x_prev, grad, x_best, grad_best, loss_best, x_best_adv, acc, step,
                 prev_loss, n_incr, counter, k, loss_best_ck, reduced_ck):
            momentum = tf.where(i > 0, 0.75, 1.0)
            grad2 = x_adv - x_prev
            x_prev = x_adv
            if norm == "linf":
                direction = tf.sign(grad)
            else:
                direction = _normalize(grad, "l2")
            z = _project(x_adv + _bcast(step, x) * direction, x, eps, norm)
            x_adv = _project(x_adv + (z - x_adv) * momentum + grad2 * (1.0 - momentum), x, eps, norm)

            logits, loss_i, grad = _eot_input_gradient(call, x_adv, objective, eot_iter)
            correct = tf.equal(_predicted(logits), y)
            acc = tf.logical_and(acc, correct)
            x_best_adv = tf.where(_bcast(tf.logical_not(correct), x), x_adv, x_best_adv)

            improved = loss_i > loss_best
            x_best = tf.where(_bcast(improved, x), x_adv, x_best)
            grad_best = tf.where(_bcast(improved, x), grad, grad_best)
            loss_best = tf.where(improved, loss_i, loss_best)

            n_incr = n_incr + tf.cast(loss_i > prev_loss, tf.int32)
            prev_loss = loss_i
            counter = counter + 1

            # Checkpoint: conditions 1 and 2 of APGD (Croce & Hein 2020, section 3).
            at_check = tf.equal(counter, k)
            oscillating = tf.cast(n_incr, tf.float32) <= tf.cast(k, tf.float32) * rho
            stalled = tf.logical_and(tf.logical_not(reduced_ck), loss_best_ck >= loss_best)
            reduce = tf.logical_and(at_check, tf.logical_or(oscillating, stalled))
            step = tf.where(reduce, step / 2.0, step)
            x_adv = tf.where(_bcast(reduce, x), x_best, x_adv)
            grad = tf.where(_bcast(reduce, x), grad_best, grad)
            reduced_ck = tf.where(at_check, reduce, reduced_ck)
            loss_best_ck = tf.where(at_check, loss_best, loss_best_ck)
            n_incr = tf.where(at_check, tf.zeros_like(n_incr), n_incr)
            k = tf.where(at_check, tf.maximum(k - len_decr, min_len), k)
            counter = tf.where(at_check, 0, counter)
            return (i + 1, x_adv, x_prev, grad, x_best, grad_best, loss_best, x_best_adv, acc, step,
                    prev_loss, n_incr, counter, k, loss_best_ck, reduced_ck)

        def cond(i, *state):
            acc = state[7]
            return tf.logical_and(i < n_iter, tf.reduce_any(acc))

        state = (
            tf.constant(0), x_adv, x_adv, grad, x_adv, grad, loss0, x_adv, acc, step,
            prev_loss, tf.zeros([batch], tf.int32), tf.constant(0), tf.constant(first_len),
            loss0, tf.ones([batch], tf.bool),
        )
        out = tf.while_loop(cond, body, state)
        x_best_adv, acc = out[7], out[8]
        return x_best_adv, acc, zero_grad

    return run


def _apgd_fn(model, shape, norm, loss, n_iter, rho, quirks, eot_iter=1):
    key = ("apgd", tuple(shape[1:]), norm, loss, int(n_iter), float(rho), bool(quirks))
    if eot_iter != 1:
        key = key + (int(eot_iter),)
    return _compiled(
        model,
        key,
        lambda call: tf.function(
            _build_apgd(call, norm, loss, int(n_iter), float(rho), bool(quirks), int(eot_iter)),
            input_signature=[_image_spec(shape), _LABEL_SPEC, _LABEL_SPEC, _SCALAR_SPEC, _SEED_SPEC],
        ),
    )


def _warn_zero_gradients(count, name):
    if count:
        warnings.warn(
            f"{name}: {count} example(s) have an all-zero input gradient at the starting point; "
            "gradient-based attacks are unreliable on them (possible gradient masking)",
            RuntimeWarning,
            stacklevel=3,
        )


def _apgd_restarts(model, x, y, clean_logits, acc, adv, eps, norm, loss, n_iter, n_restarts, rho,
                   seed, stream, rank, quirks, eot_iter=1):
    """Runs APGD restarts on the examples of ``acc`` still True; updates ``acc`` and ``adv`` in place."""
    run = _apgd_fn(model, x.shape, norm, loss, n_iter, rho, quirks, eot_iter)
    zero_grad = 0
    for restart in range(n_restarts):
        idx = np.flatnonzero(acc)
        if idx.size == 0:
            break
        xs = tf.gather(x, idx)
        ys = tf.gather(y, idx)
        if loss == "dlr-targeted":
            targets = _rank_targets(tf.gather(clean_logits, idx), rank)
        else:
            targets = ys
        x_found, acc_run, zeros = run(xs, ys, targets, tf.constant(eps, tf.float32),
                                      _seed_tensor(seed, *stream, rank or 0, restart))
        zero_grad = max(zero_grad, int(zeros))
        fooled = np.logical_not(acc_run.numpy())
        acc[idx[fooled]] = False
        adv[idx[fooled]] = x_found.numpy()[fooled]
    return zero_grad


def _n_classes(logits, y=None) -> int:
    """Number of classes of the model; checks that the labels ``y`` are in range."""
    n = int(logits.shape[-1])
    if y is not None and int(tf.size(y)) and (int(tf.reduce_min(y)) < 0 or int(tf.reduce_max(y)) >= n):
        raise UserError(f"labels must be in 0..{n - 1} for a model with {n} logits")
    return n


def apgd(model_fn, x, y, eps, norm="linf", loss="ce", n_iter=100, n_restarts=1, seed=0,
         target_class_rank=None, rho=0.75, *, eot_iter=1, reference_quirks=False):
    """Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1).

    From a random start ``x + eps * t / ||t||`` (t uniform in [-1, 1]^d for
    L-inf, Gaussian for L2), ``n_iter`` steps of

        z = P(x_k + eta_k * s(grad)),  x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))

    (the first step without momentum), with s = sign for L-inf and the
    normalised gradient for L2, and P the projection onto the ball and [0, 1].
    The step size starts at ``2 * eps`` and is halved at checkpoint w_j
    (and the iterate reset to the best point so far) when (1) the loss
    increased in at most ``rho`` of the steps since the last checkpoint
    (the reference's ``<=``; the paper writes ``<``) or (2) the step was not
    halved at the last checkpoint and the best loss has not improved since.
    Checkpoints follow p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1}
    - 0.03, 0.06) (section 3), in the reference's integer form: the first
    after max(int(0.22 N), 1) iterations, each later interval shorter by
    max(int(0.03 N), 1) down to max(int(0.06 N), 1).

    Args:
      model_fn: callable mapping images in [0, 1] to logits (a keras model is
        called with ``training=False``).
      x, y: images (N, ...) in [0, 1] and integer labels (N,).
      eps: radius of the ball.
      norm: "linf" or "l2".
      loss: "ce" (cross-entropy), "dlr" (DLR, needs >= 3 classes) or
        "dlr-targeted" (targeted DLR, needs >= 4 classes and ``target_class_rank``).
      n_iter: iterations per restart.
      n_restarts: restarts, each on the examples not yet misclassified.
      seed: integer seed of the random starts.
      target_class_rank: for "dlr-targeted", the target is the class with the
        ``target_class_rank``-th largest logit at the clean point (2..C).
      rho: the oscillation threshold of condition (1).
      eot_iter: forward/backward passes per iteration, for randomised models
        (Expectation over Transformation; AutoAttack's "rand" version uses
        20). The step follows the mean gradient (as in the reference); unlike
        the reference, which reads the loss and the prediction of the last
        pass only, the best point and the misclassification test use the
        mean loss and the mean logits of all passes, and so does the clean
        prediction. 1 (the default) is the deterministic attack.
      reference_quirks: if True, the first checkpoint compares the first
        iterate's loss with 0 as the reference implementation does (it reads
        an unwritten entry of its loss history); by default it is compared with
        the loss at the starting point, as in the paper.

    Returns:
      ``x_adv`` (tf.Tensor, float32): for each example the last misclassified
      iterate found, or ``x`` itself where the attack failed or the clean point
      is already misclassified. The loop stops early once every example of the
      batch is misclassified.
    """
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    if loss not in APGD_LOSSES:
        raise unknown_choice("APGD loss", loss, APGD_LOSSES)
    n_iter = _check_positive_int("n_iter", n_iter)
    n_restarts = _check_positive_int("n_restarts", n_restarts, 0)
    seed = _check_seed(seed)
    if not (isinstance(rho, (int, float)) and 0 < rho <= 1):
        raise UserError(f"rho must be in (0, 1], got {rho!r}")
    eot_iter = _check_positive_int("eot_iter", eot_iter)
    x, y = _as_inputs(x, y)
    if int(x.shape[0]) == 0:
        return x
    clean_logits = _predict_logits(model_fn, x, passes=eot_iter)
    n_classes = _n_classes(clean_logits, y)
    rank = None
    if loss == "dlr" and n_classes < 3:
        raise UserError(f"the DLR loss needs at least 3 classes, the model has {n_classes}")
    if loss == "dlr-targeted":
        if n_classes < 4:
            raise UserError(f"the targeted DLR loss needs at least 4 classes, the model has {n_classes}")
        if target_class_rank is None:
            raise UserError("loss='dlr-targeted' needs target_class_rank (2..C)")
        rank = _check_positive_int("target_class_rank", target_class_rank, 2)
        if rank > n_classes:
            raise UserError(f"target_class_rank must be in 2..{n_classes}, got {rank}")
    acc = (_predicted(clean_logits) == y).numpy()
    adv = x.numpy().copy()
    zeros = _apgd_restarts(model_fn, x, y, clean_logits, acc, adv, eps, norm, loss, n_iter, n_restarts,
                           float(rho), seed, (1,), rank, reference_quirks, eot_iter)
    _warn_zero_gradients(zeros, f"APGD-{loss}")
    return tf.convert_to_tensor(adv)



def _check_targeted_args(norm, eps, n_iter, n_target_classes, n_restarts, seed):
    """Validates the arguments shared by the targeted attacks (APGD-T, FAB-T)."""
    return (_check_norm(norm), _check_eps(eps), _check_positive_int("n_iter", n_iter),
            _check_positive_int("n_target_classes", n_target_classes),
            _check_positive_int("n_restarts", n_restarts, 0), _check_seed(seed))

def apgd_targeted(model_fn, x, y, eps, norm="linf", n_iter=100, n_target_classes=9, seed=0, *,
                  n_restarts=1, rho=0.75, eot_iter=1, reference_quirks=False):
    """APGD-T (Croce & Hein, ICML 2020): APGD on the targeted DLR loss.

    For target ranks 2, 3, ..., ``n_target_classes + 1`` in turn, APGD on
    the targeted DLR loss runs on the examples still correctly
    classified, the target being the class with that rank among the clean
    logits. ``n_target_classes`` is capped at C - 1; the model needs at least
    4 classes. Other arguments and the return value are as in :func:`apgd`.
    """
    norm, eps, n_iter, n_target_classes, n_restarts, seed = _check_targeted_args(
        norm, eps, n_iter, n_target_classes, n_restarts, seed)
    eot_iter = _check_positive_int("eot_iter", eot_iter)
    x, y = _as_inputs(x, y)
    if int(x.shape[0]) == 0:
        return x
    clean_logits = _predict_logits(model_fn, x, passes=eot_iter)
    n_classes = _n_classes(clean_logits, y)
    if n_classes < 4:
        raise UserError(f"APGD-T (targeted DLR loss) needs at least 4 classes, the model has {n_classes}")
    acc = (_predicted(clean_logits) == y).numpy()
    adv = x.numpy().copy()
    zeros = 0
    for rank in range(2, min(n_target_classes, n_classes - 1) + 2):
        zeros = max(zeros, _apgd_restarts(model_fn, x, y, clean_logits, acc, adv, eps, norm, "dlr-targeted",
                                          n_iter, n_restarts, float(rho), seed, (2,), rank, reference_quirks,
                                          eot_iter))
    _warn_zero_gradients(zeros, "APGD-T")
    return tf.convert_to_tensor(adv)


# --------------------------------------------------------------------------
# FAB
# --------------------------------------------------------------------------

_BIG = 1e200


def _box_hyperplane_projection(t, w, b, norm):
    """Minimal-norm step onto a hyperplane within the box, as FAB's projection (Croce & Hein, ICML 2020).

    For each row solves ``min ||d||_p  s.t.  <w, t + d> = b,  0 <= t + d <= 1``
    (p = inf or 2). If no point of the box lies on the hyperplane, returns the
    box corner that moves ``<w, .>`` furthest towards ``b``.

    With r = b - <w, t> made non-negative by flipping the sign of w, the
    optimum is d_i = sign(w_i) min(lambda c_i, u_i), with u_i the room to the
    box face in direction sign(w_i), c_i = 1 (L-inf) or |w_i| (L2), and lambda
    the root of the increasing piecewise-linear g(lambda) = sum_i |w_i|
    min(lambda c_i, u_i) = r, found exactly from the sorted breakpoints.
    Computed in float64.
    """
    t = tf.cast(t, tf.float64)
    w = tf.cast(w, tf.float64)
    b = tf.cast(b, tf.float64)
    r = b - tf.reduce_sum(w * t, axis=1)
    w = tf.where((r < 0)[:, None], -w, w)
    r = tf.abs(r)
    aw = tf.abs(w)
    room = tf.maximum(tf.where(w > 0, 1.0 - t, t), 0.0)
    if norm == "linf":
        active = aw > 0
        slope = aw
        breakpoint_ = tf.where(active, room, _BIG)
    else:
        slope = aw * aw
        active = slope > 1e-300
        breakpoint_ = tf.where(active, room / tf.where(active, aw, 1.0), _BIG)
    slope = tf.where(active, slope, 0.0)
    cap = tf.where(active, aw * room, 0.0)
    order = tf.argsort(breakpoint_, axis=1, stable=True)
    bp_sorted = tf.gather(breakpoint_, order, batch_dims=1)
    cap_before = tf.cumsum(tf.gather(cap, order, batch_dims=1), axis=1, exclusive=True)
    slope_left = tf.cumsum(tf.gather(slope, order, batch_dims=1), axis=1, reverse=True)
    g = cap_before + bp_sorted * slope_left
    n_below = tf.reduce_sum(tf.cast(g < r[:, None], tf.int32), axis=1)
    dim = tf.shape(t)[1]
    feasible = n_below < dim
    j = tf.minimum(n_below, dim - 1)[:, None]
    lam = (r - tf.gather(cap_before, j, batch_dims=1)[:, 0]) / tf.maximum(
        tf.gather(slope_left, j, batch_dims=1)[:, 0], 1e-300)
    if norm == "linf":
        size = tf.minimum(lam[:, None], room)
    else:
        size = tf.minimum(lam[:, None] * aw, room)
    size = tf.where(feasible[:, None], size, room)
    d = tf.where(active, tf.sign(w) * size, 0.0)
    return tf.cast(d, tf.float32)


def _closest_linearised_boundary(call, x1, y, norm):
    """Untargeted FAB's choice (Croce & Hein 2020, eq. 7): the class boundary closest under linearisation.

    With f_k = z_k - z_y and its input gradient g_k at ``x1``, returns
    (f_j, g_j) for j = argmin_{k != y} |f_k| / ||g_k||_dual (dual of L-inf:
    L1; of L2: L2), one gradient per class (the full Jacobian).
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x1)
        logits = call(x1)
    jac = tape.batch_jacobian(logits, x1, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    n_classes = tf.shape(logits)[1]
    jac = tf.reshape(tf.cast(jac, tf.float32), [tf.shape(x1)[0], n_classes, -1])
    oh = _onehot(y, logits)
    f = logits - tf.reduce_sum(logits * oh, axis=1, keepdims=True)
    g = jac - tf.reduce_sum(jac * oh[:, :, None], axis=1, keepdims=True)
    if norm == "linf":
        dual = tf.reduce_sum(tf.abs(g), axis=2)
    else:
        dual = tf.sqrt(tf.reduce_sum(tf.square(g), axis=2))
    dist = tf.where(oh > 0, tf.constant(np.inf, tf.float32), tf.abs(f) / (dual + _TINY))
    j = tf.argmin(dist, axis=1, output_type=tf.int32)
    return tf.gather(f, j, batch_dims=1), tf.gather(g, j, batch_dims=1)


def _build_fab(call, norm, n_iter, alpha_max, eta, beta, targeted=True):
    def run(x, y, y_target, eps, seed, random_start):
        shape = tf.shape(x)
        batch = shape[0]
        x0 = _flat(x)
        if norm == "linf":
            t = tf.random.stateless_uniform(shape, seed, -1.0, 1.0)
        else:
            t = tf.random.stateless_normal(shape, seed)
        start = tf.clip_by_value(x + 0.5 * eps * _normalize(t, norm), 0.0, 1.0)
        x1 = tf.where(random_start, start, x)
        best = x
        best_norm = tf.fill([batch], tf.constant(1e10, tf.float32))

        def objective(logits):
            oh_t = _onehot(y_target, logits)
            oh_y = _onehot(y, logits)
            return tf.reduce_sum(logits * (oh_t - oh_y), axis=-1)

        def body(i, x1, best, best_norm):
            if targeted:
                _, f, g = _input_gradient(call, x1, objective)
                w = _flat(g)
            else:
                f, w = _closest_linearised_boundary(call, x1, y, norm)
            x1f = _flat(x1)
            b = -f + tf.reduce_sum(w * x1f, axis=1)
            d = _box_hyperplane_projection(tf.concat([x1f, x0], 0), tf.concat([w, w], 0),
                                           tf.concat([b, b], 0), norm)
            d1, d2 = d[:batch], d[batch:]
            a = tf.maximum(_norm(d, norm), 1e-8)
            a1, a2 = a[:batch], a[batch:]
            alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
            x_new = tf.clip_by_value((x1f + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
            x_new = tf.reshape(x_new, shape)
            is_adv = tf.not_equal(_predicted(call(x_new)), y)
            dist = _norm(x_new - x, norm)
            better = tf.logical_and(is_adv, dist < best_norm)
            best = tf.where(_bcast(better, x), x_new, best)
            best_norm = tf.where(better, dist, best_norm)
            x_new = tf.where(_bcast(is_adv, x), x + beta * (x_new - x), x_new)
            return i + 1, x_new, best, best_norm

        def cond(i, x1, best, best_norm):
            return tf.logical_and(i < n_iter, tf.reduce_any(best_norm > eps))

        _, _, best, best_norm = tf.while_loop(cond, body, (tf.constant(0), x1, best, best_norm))
        return best, best_norm

    return run


def _fab_fn(model, shape, norm, n_iter, alpha_max, eta, beta, targeted=True):
    key = ("fab", tuple(shape[1:]), norm, int(n_iter), float(alpha_max), float(eta), float(beta))
    if not targeted:
        key = key + ("untargeted",)
    return _compiled(
        model,
        key,
        lambda call: tf.function(
            _build_fab(call, norm, int(n_iter), float(alpha_max), float(eta), float(beta), bool(targeted)),
            input_signature=[_image_spec(shape), _LABEL_SPEC, _LABEL_SPEC, _SCALAR_SPEC, _SEED_SPEC,
                             tf.TensorSpec([], tf.bool)],
        ),
    )


def fab_targeted(model_fn, x, y, eps, norm="linf", n_iter=100, n_target_classes=9, n_restarts=1, seed=0, *,
                 alpha_max=0.1, eta=1.05, beta=0.9):
    """FAB-T: the targeted fast adaptive boundary attack (Croce & Hein, ICML 2020, Algorithm 1).

    For each target rank 2..``n_target_classes + 1`` (capped at C - 1) and each
    restart, on the examples still correctly classified: linearise
    f = z_t - z_y at the current iterate x_k, project both x_k and the original
    point x_0 onto {f = 0} within [0, 1]^d with minimal L-inf / L2 norm
    (steps d_k, d_0), and move to

        x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x_0 + eta d_0)),
        a = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max);

    when x_{k+1} is misclassified, keep it if it is the closest so far and step
    back to x_0 + beta (x_{k+1} - x_0). The first restart starts at x_0, later
    ones at x_0 + eps / 2 * t / ||t|| (t uniform for L-inf, Gaussian for L2).
    An example counts as broken when its closest adversarial point is within
    eps. Iterations stop early once every example has one within eps.

    Returns:
      ``x_adv`` (tf.Tensor): the closest adversarial point found where it is
      within eps, ``x`` elsewhere.
    """
    norm, eps, n_iter, n_target_classes, n_restarts, seed = _check_targeted_args(
        norm, eps, n_iter, n_target_classes, n_restarts, seed)
    x, y = _as_inputs(x, y)
    if int(x.shape[0]) == 0:
        return x
    clean_logits = _predict_logits(model_fn, x)
    n_classes = _n_classes(clean_logits, y)
    if n_classes < 2:
        raise UserError("FAB-T needs at least 2 classes")
    run = _fab_fn(model_fn, x.shape, norm, n_iter, alpha_max, eta, beta)
    acc = (_predicted(clean_logits) == y).numpy()
    adv = x.numpy().copy()
    eps_t = tf.constant(eps, tf.float32)
    for rank in range(2, min(n_target_classes, n_classes - 1) + 2):
        for restart in range(n_restarts):
            idx = np.flatnonzero(acc)
            if idx.size == 0:
                break
            xs = tf.gather(x, idx)
            ys = tf.gather(y, idx)
            targets = _rank_targets(tf.gather(clean_logits, idx), rank)
            best, best_norm = run(xs, ys, targets, eps_t, _seed_tensor(seed, 3, rank, restart),
                                  tf.constant(restart > 0))
            best = _project(best, xs, eps, norm)
            still = (_predicted(_predict_logits(model_fn, best)) == ys).numpy()
            fooled = np.logical_and(best_norm.numpy() <= eps, np.logical_not(still))
            acc[idx[fooled]] = False
            adv[idx[fooled]] = best.numpy()[fooled]
    return tf.convert_to_tensor(adv)


def fab(model_fn, x, y, eps, norm="linf", n_iter=100, n_restarts=1, seed=0, *, alpha_max=0.1, eta=1.05,
        beta=0.9):
    """FAB: the untargeted fast adaptive boundary attack (Croce & Hein, ICML 2020, Algorithm 1).

    As :func:`fab_targeted`, except that each iteration linearises every
    class boundary f_k = z_k - z_y at x_k (the whole Jacobian: C gradients)
    and projects onto the one closest in the dual norm,
    argmin_{k != y} |f_k(x_k)| / ||grad f_k(x_k)||_dual (eq. 7 of the paper;
    the reference's fab_base.py, attack_single_run, lines 166-189). Restart 0
    starts at x, later restarts at a random point at distance eps / 2
    (fab_base.py lines 130-161). AutoAttack's "plus" version runs 5 restarts.

    Returns:
      ``x_adv`` (tf.Tensor): the closest adversarial point found where it is
      within eps, ``x`` elsewhere.
    """
    norm, eps = _check_norm(norm), _check_eps(eps)
    n_iter = _check_positive_int("n_iter", n_iter)
    n_restarts = _check_positive_int("n_restarts", n_restarts, 0)
    seed = _check_seed(seed)
    x, y = _as_inputs(x, y)
    if int(x.shape[0]) == 0:
        return x
    clean_logits = _predict_logits(model_fn, x)
    if _n_classes(clean_logits, y) < 2:
        raise UserError("FAB needs at least 2 classes")
    run = _fab_fn(model_fn, x.shape, norm, n_iter, alpha_max, eta, beta, targeted=False)
    acc = (_predicted(clean_logits) == y).numpy()
    adv = x.numpy().copy()
    eps_t = tf.constant(eps, tf.float32)
    for restart in range(n_restarts):
        idx = np.flatnonzero(acc)
        if idx.size == 0:
            break
        xs = tf.gather(x, idx)
        ys = tf.gather(y, idx)
        best, best_norm = run(xs, ys, ys, eps_t, _seed_tensor(seed, 5, restart), tf.constant(restart > 0))
        best = _project(best, xs, eps, norm)
        still = (_predicted(_predict_logits(model_fn, best)) == ys).numpy()
        fooled = np.logical_and(best_norm.numpy() <= eps, np.logical_not(still))
        acc[idx[fooled]] = False
        adv[idx[fooled]] = best.numpy()[fooled]
    return tf.convert_to_tensor(adv)


# --------------------------------------------------------------------------
# Square
# --------------------------------------------------------------------------


def _square_p(i, p_init, n_queries, rescale):
    """Fraction of pixels changed at iteration ``i`` (Andriushchenko et al. 2020; the reference schedule)."""
    it = tf.cast(i, tf.float64)
    if rescale:
        it = tf.floor(it / n_queries * 10000.0)
    bounds = tf.constant([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000], tf.float64)
    halvings = tf.reduce_sum(tf.cast(it > bounds, tf.float64))
    return p_init / tf.pow(tf.constant(2.0, tf.float64), halvings)


def _harmonic2(n):
    """Table H[k] = sum_{m=1}^{k} 1 / m^2, k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1) ** 2)])


def _square_l2_pattern_np(s):
    """The s x s L2 update pattern of Square (Alg. 3): two halves of opposite sign,
    each a pyramid of nested squares with weights sum_{k >= d} 1 / (k + 1)^2 (d the
    Chebyshev distance to the half's centre), each half of unit norm, the whole of unit norm."""
    table = _harmonic2(s + 1)
    out = np.zeros((s, s))
    half = s // 2
    top_k = s // 2 + 1
    for rows, cx, sign in ((range(0, half), half // 2, 1.0), (range(half, s), half + (s - half) // 2, -1.0)):
        block = np.zeros((s, s))
        for i in rows:
            for j in range(s):
                dist = max(abs(i - cx), abs(j - s // 2))
                block[i, j] = table[top_k] - table[dist]
        n = np.sqrt((block ** 2).sum())
        if n > 0:
            out += sign * block / n
    return out / max(np.sqrt((out ** 2).sum()), _TINY)


def _square_l2_pattern(rows, cols, vh, vw, s, transpose, table):
    """The L2 pattern of size ``s`` placed at (vh, vw), per example, as (B, H, W, 1).

    ``rows``/``cols`` are (1, H, 1)/(1, 1, W) index grids; vh, vw, transpose are (B,).
    """
    i = rows - vh[:, None, None]
    j = cols - vw[:, None, None]
    inside = (i >= 0) & (i < s) & (j >= 0) & (j < s)
    tr = transpose[:, None, None]
    i, j = tf.where(tr, j, i), tf.where(tr, i, j)
    half = s // 2
    top = i < half
    cx = tf.where(top, half // 2, half + (s - half) // 2)
    dist = tf.maximum(tf.abs(i - cx), tf.abs(j - s // 2))
    dist = tf.clip_by_value(dist, 0, tf.shape(table)[0] - 1)
    value = tf.gather(table, s // 2 + 1) - tf.gather(table, dist)
    top_v = tf.where(inside & top, value, 0.0)
    bottom_v = tf.where(inside & tf.logical_not(top), value, 0.0)
    n_top = tf.sqrt(tf.reduce_sum(tf.square(top_v), axis=[1, 2], keepdims=True))
    n_bottom = tf.sqrt(tf.reduce_sum(tf.square(bottom_v), axis=[1, 2], keepdims=True))
    pattern = tf.math.divide_no_nan(top_v, n_top) - tf.math.divide_no_nan(bottom_v, n_bottom)
    total = tf.sqrt(tf.reduce_sum(tf.square(pattern), axis=[1, 2], keepdims=True))
    return tf.cast(tf.math.divide_no_nan(pattern, total), tf.float32)[..., None]


def _build_square(call, norm, n_queries, p_init, rescale, shared, quirks, image_shape):
    h, w, c = (int(v) for v in image_shape)
    side = min(h, w)
    table = tf.constant(_harmonic2(side + 2), tf.float64)
    rows = tf.range(h)[None, :, None]
    cols = tf.range(w)[None, None, :]

    def uniforms(seed, tag, n):
        return tf.random.stateless_uniform([n], tf.random.experimental.stateless_fold_in(seed, tag))

    def signs(seed, tag, shape):
        u = tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seed, tag))
        return tf.where(u < 0.5, -1.0, 1.0)

    def position(u, s, size):
        span = size - s if quirks else size - s + 1
        return tf.minimum(tf.cast(tf.floor(u * tf.cast(span, tf.float32)), tf.int32), tf.maximum(size - s, 0))

    def window(vh, vw, s):
        m = ((rows >= vh[:, None, None]) & (rows < vh[:, None, None] + s)
             & (cols >= vw[:, None, None]) & (cols < vw[:, None, None] + s))
        return tf.cast(m, tf.float32)[..., None]

    def side_length(i):
        p = _square_p(i, p_init, n_queries, rescale)
        s = tf.cast(tf.round(tf.sqrt(p * h * w)), tf.int32)
        if norm == "linf":
            s = tf.maximum(s, 1)
        else:
            s = tf.maximum(s, 3)
            s = s + 1 - tf.math.floormod(s, 2)
        return tf.minimum(s, side)

    def l2_init(batch, seed):
        s0 = side // 5
        delta = tf.zeros([batch, h, w, c])
        pat = _square_l2_pattern_np(s0)
        off_h, off_w = (h - 5 * s0) // 2, (w - 5 * s0) // 2
        n_draw = 1 if shared else batch
        k = 0
        for a in range(h // s0):
            for b in range(w // s0):
                vh, vw = off_h + a * s0, off_w + b * s0
                if vh >= h or vw >= w:
                    continue
                canvases = []
                for p in (pat, pat.T):
                    canvas = np.zeros((h, w))
                    hh, ww = min(s0, h - vh), min(s0, w - vw)
                    canvas[vh:vh + hh, vw:vw + ww] = p[:hh, :ww]
                    canvases.append(tf.constant(canvas[None, :, :, None], tf.float32))
                flip = uniforms(seed, 1000 + 2 * k, n_draw) < 0.5
                flip = tf.broadcast_to(flip, [batch])[:, None, None, None]
                sgn = signs(seed, 1001 + 2 * k, [batch, 1, 1, c])
                delta = delta + tf.where(flip, canvases[1], canvases[0]) * sgn
                k += 1
        return delta

    def run(x, y, eps, seed):
        batch = tf.shape(x)[0]
        n_draw = 1 if shared else batch
        if norm == "linf":
            x_best = tf.clip_by_value(x + eps * signs(seed, 1, [batch, 1, w, c]), 0.0, 1.0)
        else:
            x_best = tf.clip_by_value(x + eps * _normalize(l2_init(batch, seed), "l2"), 0.0, 1.0)
        margin_min = _margin(call(x_best), y)
        queries = tf.ones([batch], tf.int32)

        def body(i, x_best, margin_min, queries):
            it_seed = tf.random.experimental.stateless_fold_in(seed, i + 1)
            active = tf.where(margin_min > 0)[:, 0]
            xs = tf.gather(x, active)
            ys = tf.gather(y, active)
            xb = tf.gather(x_best, active)
            m_old = tf.gather(margin_min, active)
            s = side_length(i)

            def draw(tag):
                u = tf.broadcast_to(uniforms(it_seed, tag, n_draw), [batch])
                return tf.gather(u, active)

            vh = position(draw(1), s, h)
            vw = position(draw(2), s, w)
            mask1 = window(vh, vw, s)
            if norm == "linf":
                colour = tf.gather(tf.broadcast_to(signs(it_seed, 3, [n_draw, 1, 1, c]), [batch, 1, 1, c]), active)
                x_new = tf.clip_by_value(xb + mask1 * (2.0 * eps) * colour, xs - eps, xs + eps)
                x_new = tf.clip_by_value(x_new, 0.0, 1.0)
            else:
                vh2 = position(draw(4), s, h)
                vw2 = position(draw(5), s, w)
                mask2 = window(vh2, vw2, s)
                transpose = draw(6) < 0.5
                colour = tf.gather(signs(it_seed, 7, [batch, 1, 1, c]), active)
                delta = xb - xs
                union = tf.maximum(mask1, mask2)
                n_window1 = tf.sqrt(tf.reduce_sum(tf.square(delta * mask1), axis=[1, 2], keepdims=True))
                n_image = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=[1, 2, 3], keepdims=True))
                n_windows = tf.sqrt(tf.reduce_sum(tf.square(delta * union), axis=[1, 2], keepdims=True))
                pattern = _square_l2_pattern(rows, cols, vh, vw, s, transpose, table)
                new = pattern * colour + delta * mask1 / (_TINY + n_window1)
                n_new = tf.sqrt(tf.reduce_sum(tf.square(new), axis=[1, 2], keepdims=True))
                budget = tf.sqrt(tf.maximum(eps * eps - tf.square(n_image), 0.0) / c + tf.square(n_windows))
                new = new / (_TINY + n_new) * budget
                delta = tf.where(mask1 > 0, new, tf.where(mask2 > 0, 0.0, delta))
                x_new = tf.clip_by_value(xs + eps * _normalize(delta, "l2"), 0.0, 1.0)
            m_new = _margin(call(x_new), ys)
            improved = m_new < m_old
            xb = tf.where(_bcast(improved, xb), x_new, xb)
            m_upd = tf.where(improved, m_new, m_old)
            x_best = tf.tensor_scatter_nd_update(x_best, active[:, None], xb)
            margin_min = tf.tensor_scatter_nd_update(margin_min, active[:, None], m_upd)
            queries = tf.tensor_scatter_nd_add(queries, active[:, None], tf.ones_like(ys))
            return i + 1, x_best, margin_min, queries

        def cond(i, x_best, margin_min, queries):
            return tf.logical_and(i < n_queries, tf.reduce_any(margin_min > 0))

        _, x_best, margin_min, queries = tf.while_loop(
            cond, body, (tf.constant(0), x_best, margin_min, queries))
        return x_best, margin_min, queries

    return run


def _square_fn(model, shape, norm, n_queries, p_init, rescale, shared, quirks):
    key = ("square", tuple(shape[1:]), norm, int(n_queries), float(p_init), bool(rescale), bool(shared),
           bool(quirks))
    return _compiled(
        model,
        key,
        lambda call: tf.function(
            _build_square(call, norm, int(n_queries), float(p_init), bool(rescale), bool(shared), bool(quirks),
                          shape[1:]),
            input_signature=[_image_spec(shape), _LABEL_SPEC, _SCALAR_SPEC, _SEED_SPEC],
        ),
    )


def square(model_fn, x, y, eps, norm="linf", n_queries=5000, p_init=0.8, seed=0, *, n_restarts=1,
           rescale_schedule=False, reference_quirks=False):
    """Square Attack (Andriushchenko et al., ECCV 2020, Algorithm 1; L-inf Alg. 2, L2 Alg. 3).

    Score-based random search on the margin loss z_y - max_{k != y} z_k: no
    gradients, one model query per iteration and image. L-inf: start from
    vertical stripes x +- eps; each iteration sets a random square window of
    side round(sqrt(p * h * w)) (all channels) to x +- eps with one random sign
    per channel. L2: start from a 5 x 5 grid of +-"pyramid" patterns scaled to
    norm eps; each iteration moves the perturbation mass of a second random
    window into the first, redrawn as a two-halves pyramid (Alg. 3). A candidate
    replaces the current point when it lowers the margin. The fraction p starts
    at ``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000 (``rescale_schedule=True`` rescales these to
    ``n_queries`` out of 10000; AutoAttack does not). Each image stops once
    misclassified.

    Images must be NHWC; for L2 both sides must be >= 5 pixels.

    Args:
      reference_quirks: draw one window position per batch (and for L-inf one
        colour, for L2 one pattern orientation) and never place a window on the
        last row or column, as the reference implementation does. By default
        these are drawn per image and positions cover the whole image, as in
        the paper.

    Returns:
      ``x_adv`` (tf.Tensor): the misclassified point found, ``x`` elsewhere.
    """
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    n_queries = _check_positive_int("n_queries", n_queries)
    n_restarts = _check_positive_int("n_restarts", n_restarts, 0)
    seed = _check_seed(seed)
    if not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
        raise UserError(f"p_init must be in (0, 1], got {p_init!r}")
    x, y = _as_inputs(x, y)
    if x.shape.rank != 4:
        raise UserError(f"Square needs NHWC images, got shape {x.shape}")
    if norm == "l2" and min(int(x.shape[1]), int(x.shape[2])) < 5:
        raise UserError(f"L2 Square needs images of at least 5 x 5 pixels, got {x.shape[1]} x {x.shape[2]}")
    if int(x.shape[0]) == 0 or eps == 0.0:
        return x
    clean_logits = _predict_logits(model_fn, x)
    _n_classes(clean_logits, y)
    acc = (_predicted(clean_logits) == y).numpy()
    adv = x.numpy().copy()
    run = _square_fn(model_fn, x.shape, norm, n_queries, p_init, rescale_schedule, reference_quirks,
                     reference_quirks)
    for restart in range(n_restarts):
        idx = np.flatnonzero(acc)
        if idx.size == 0:
            break
        xs = tf.gather(x, idx)
        ys = tf.gather(y, idx)
        x_found, _, _ = run(xs, ys, tf.constant(eps, tf.float32), _seed_tensor(seed, 4, restart))
        x_found = _project(x_found, xs, eps, norm)
        fooled = (_predicted(_predict_logits(model_fn, x_found)) != ys).numpy()
        acc[idx[fooled]] = False
        adv[idx[fooled]] = x_found.numpy()[fooled]
    return tf.convert_to_tensor(adv)


# --------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------


def _standard_apgd_ce(model_fn, x, y, eps, norm, seed):
    return apgd(model_fn, x, y, eps, norm=norm, loss="ce", n_iter=100, n_restarts=1, seed=seed)


def _standard_apgd_t(model_fn, x, y, eps, norm, seed):
    return apgd_targeted(model_fn, x, y, eps, norm=norm, n_iter=100, n_target_classes=9, seed=seed)


def _standard_fab_t(model_fn, x, y, eps, norm, seed):
    return fab_targeted(model_fn, x, y, eps, norm=norm, n_iter=100, n_target_classes=9, n_restarts=1, seed=seed)


def _standard_square(model_fn, x, y, eps, norm, seed):
    return square(model_fn, x, y, eps, norm=norm, n_queries=5000, p_init=0.8, seed=seed)


def _budget(attack, **settings):
    """``fn(model_fn, x, y, eps, norm, seed)`` running ``attack`` with fixed ``settings``."""

    def run(model_fn, x, y, eps, norm, seed):
        return attack(model_fn, x, y, eps, norm=norm, seed=seed, **settings)

    run.settings = dict(settings)
    return run


# name -> fn(model_fn, x, y, eps, norm, seed) -> x_adv, with AutoAttack's "standard" settings
ATTACKS: Dict[str, Callable] = {
    "apgd-ce": _standard_apgd_ce,
    "apgd-t": _standard_apgd_t,
    "fab-t": _standard_fab_t,
    "square": _standard_square,
}

# Forward passes averaged by the EOT attacks (the reference's eot_iter of version "rand").
RAND_EOT_ITER = 20

# Every attack that can be named alone: standard's four with its budgets, then APGD on the DLR
# loss and untargeted FAB with one restart (the reference's set_version("standard") sets both
# objects to one restart, autoattack.py lines 309 and 316), then APGD-CE and APGD-DLR with
# "rand"'s EOT over 20 passes.
ALL_ATTACKS: Dict[str, Callable] = {
    **ATTACKS,
    "apgd-dlr": _budget(apgd, loss="dlr", n_iter=100, n_restarts=1),
    "fab": _budget(fab, n_iter=100, n_restarts=1),
    "apgd-ce-eot": _budget(apgd, loss="ce", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
    "apgd-dlr-eot": _budget(apgd, loss="dlr", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
}

VERSIONS: Dict[str, list] = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "fast": ["apgd-ce", "apgd-t"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "rand": ["apgd-ce", "apgd-dlr"],
}

# The budgets of each version (reference autoattack.py, set_version, lines 302-337, for L-inf
# and L2): "plus" gives APGD and untargeted FAB 5 restarts, "rand" runs APGD with 20 EOT passes.
VERSION_ATTACKS: Dict[str, Dict[str, Callable]] = {
    "standard": {name: ATTACKS[name] for name in VERSIONS["standard"]},
    "fast": {name: ATTACKS[name] for name in VERSIONS["fast"]},
    "plus": {
        "apgd-ce": _budget(apgd, loss="ce", n_iter=100, n_restarts=5),
        "apgd-dlr": _budget(apgd, loss="dlr", n_iter=100, n_restarts=5),
        "fab": _budget(fab, n_iter=100, n_restarts=5),
        "square": _budget(square, n_queries=5000, p_init=0.8, n_restarts=1),
        "apgd-t": _budget(apgd_targeted, n_iter=100, n_target_classes=9, n_restarts=1),
        "fab-t": _budget(fab_targeted, n_iter=100, n_target_classes=9, n_restarts=1),
    },
    "rand": {
        "apgd-ce": _budget(apgd, loss="ce", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
        "apgd-dlr": _budget(apgd, loss="dlr", n_iter=100, n_restarts=1, eot_iter=RAND_EOT_ITER),
    },
}

# Forward passes whose mean logits decide each verdict (clean and adversarial) of a version.
VERSION_VERDICT_PASSES = {"rand": RAND_EOT_ITER}

# Smallest number of classes each attack supports.
_MIN_CLASSES = {"apgd-ce": 2, "apgd-t": 4, "fab-t": 2, "square": 2, "apgd-dlr": 3, "fab": 2,
                "apgd-ce-eot": 2, "apgd-dlr-eot": 3}

AttackSpec = Union[None, Sequence[str], Mapping[str, Callable]]


def _resolve_attacks(version, attacks):
    if attacks is None:
        if version not in VERSIONS:
            raise unknown_choice("AutoAttack version", version, VERSIONS)
        return [(name, VERSION_ATTACKS[version][name]) for name in VERSIONS[version]]
    if isinstance(attacks, str):
        attacks = [attacks]
    if isinstance(attacks, Mapping):
        items = list(attacks.items())
        for name, fn in items:
            if not callable(fn):
                raise UserError(f"attack {name!r} is not callable")
        if not items:
            raise UserError("attacks is empty")
        return [(str(n), f) for n, f in items]
    names = list(attacks)
    if not names:
        raise UserError("attacks is empty")
    for name in names:
        if name not in ALL_ATTACKS:
            # standard's attacks first, then the others in the order of ALL_ATTACKS
            raise UserError(f"unknown attack {name!r}; allowed: {', '.join(ALL_ATTACKS)}")
    if len(set(names)) != len(names):
        raise UserError(f"attacks lists a name twice: {names}")
    return [(name, ALL_ATTACKS[name]) for name in names]


def _verdict_passes(version, attacks, plan) -> int:
    """Forward passes averaged for each verdict: 20 for "rand" and the named EOT attacks, else 1."""
    if attacks is None:
        return VERSION_VERDICT_PASSES.get(version, 1)
    passes = [getattr(fn, "settings", {}).get("eot_iter", 1) for _, fn in plan]
    return max(passes) if passes else 1


def _numpy_project(x_adv, x, eps, norm):
    x_adv = np.asarray(x_adv, np.float32)
    if norm == "linf":
        out = np.clip(x_adv, x - np.float32(eps), x + np.float32(eps))
    else:
        d = (x_adv.astype(np.float64) - x).reshape(len(x), -1)
        n = np.sqrt((d * d).sum(axis=1))
        factor = np.minimum(1.0, eps / np.maximum(n, 1e-30)) * (1.0 - 1e-7)
        factor = np.where(n <= eps, 1.0, factor)
        out = (x + (d * factor[:, None]).reshape(x.shape)).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def _check_ball(x_adv, x, eps, norm, tol=BALL_TOLERANCE):
    """Raises if any point leaves [0, 1] or the eps-ball by more than ``tol``."""
    lo, hi = float(np.min(x_adv)) if x_adv.size else 0.0, float(np.max(x_adv)) if x_adv.size else 0.0
    if lo < -tol or hi > 1 + tol or not np.all(np.isfinite(x_adv)):
        raise RuntimeError(f"adversarial examples leave [0, 1]: values in [{lo}, {hi}]")
    if len(x):
        excess = float(np.max(perturbation_norms(x_adv, x, norm))) - eps
        if excess > tol:
            raise RuntimeError(f"adversarial examples leave the {norm} ball of radius {eps} by {excess:.3g}")


def run_autoattack(model_fn, x, y, eps, norm="linf", version="standard", attacks: AttackSpec = None,
                   batch_size=500, seed=0, verbose=True, individual=False, *, verdict_passes=None,
                   flags=True, partial_path=None, strategy=None) -> dict:
    """Robust accuracy under the AutoAttack ensemble (Croce & Hein, ICML 2020).

    The clean predictions are computed first; then each attack runs in order,
    in batches of ``batch_size``, only on the examples that every earlier
    attack failed to break (as AutoAttack does). Every returned point is
    projected onto the eps-ball and [0, 1] and re-classified; at the end all of
    ``x_adv`` is checked against the ball and [0, 1] (tolerance 1e-6), and a
    RuntimeError is raised if it is violated.

    Args:
      model_fn: callable mapping float32 NHWC images in [0, 1] to logits (a
        keras model is called with ``training=False``).
      x, y: images (N, H, W, C) in [0, 1] and integer labels (N,) (or one-hot).
      eps: radius of the threat model (>= 0).
      norm: "linf" or "l2".
      version: a key of :data:`VERSIONS` ("standard": APGD-CE, APGD-T, FAB-T,
        Square; "plus": APGD-CE and APGD-DLR with 5 restarts, FAB with 5
        restarts, Square, APGD-T, FAB-T; "rand": APGD-CE and APGD-DLR with
        EOT over 20 passes; "fast": APGD-CE, APGD-T), each with the budgets of
        :data:`VERSION_ATTACKS`; ignored when ``attacks`` is given.
      attacks: names from :data:`ALL_ATTACKS` to run in this order, or a mapping
        name -> fn for custom attacks or budgets, called as
        ``fn(model_fn, x, y, eps, norm=norm, seed=seed)`` and returning x_adv
        (``functools.partial(apgd, n_iter=20)`` qualifies).
      batch_size: examples per attack call.
      seed: integer seed passed to every attack (each batch uses the same seed).
      verbose: print a summary and show a tqdm progress bar.
      individual: also run each attack alone on all clean-correct examples
        (expensive: about twice the cost of the ensemble).
      verdict_passes: forward passes whose mean logits decide whether an
        example is classified correctly (clean and after each attack). None:
        20 for version "rand" and for the EOT attacks, else 1.
      flags: compute the reference's automatic checks
        (:func:`tfrobust.integrity.autoattack_flags`) on the first batch and
        warn about each one raised.
      partial_path: a JSON-lines file recording every decided batch (which
        attack broke which example, and the perturbation norm of its
        adversarial point). An existing file written by the same call (same
        data, eps, norm, attacks, seed and batch size) is replayed and only
        the remaining batches run: a killed evaluation resumes where it
        stopped and ends with the same result. Adversarial points of replayed
        examples are not stored: ``x_adv`` holds ``x`` for them.
      strategy: a ``tf.distribute`` strategy (e.g. the ``MirroredStrategy``
        of training). Each batch is split into one shard per local replica
        device; the shards are attacked concurrently, each under its device,
        and the results gathered per example. The split changes the random
        draws of an example (they depend on its position in the shard), so
        verdicts agree with a single-device run except on borderline
        examples. Workers of a multi-worker strategy are not used (their
        local devices are).

    Returns:
      A dict with
        "clean": clean accuracy (fraction of all N examples);
        "per_attack": {name: accuracy after the ensemble has run every attack
          up to and including ``name`` in order} -- cumulative, as AutoAttack
          prints, non-increasing, as a fraction of all N examples;
        "individual": {name: accuracy of that attack run alone on the
          clean-correct examples (clean-misclassified examples count as
          wrong)} if ``individual`` else None;
        "worst_case": per-example worst case: the fraction of examples that
          are correctly classified clean and under every attack run (the
          ensemble and, if requested, every individual run); never above any
          entry of "per_attack" or "individual";
        "robust_mask": np.bool_ array (N,), True where the example survived all;
        "clean_mask": np.bool_ array (N,), True where the clean prediction is right;
        "broken_by": array (N,) of str: "clean" where the clean prediction is
          wrong, the name of the ensemble attack that broke the example, or ""
          where it survived the ensemble;
        "perturbation_norm": float64 array (N,): the norm of the adversarial
          point of the ensemble attack that broke the example (NaN elsewhere);
        "x_adv": np.ndarray like x, an adversarial point for every broken
          example (x itself elsewhere);
        "flags": the reference's checks (a list of dicts, see
          :func:`tfrobust.integrity.autoattack_flags`) or None;
        "version", "verdict_passes", "resumed" (broken examples read back
        from ``partial_path``), "seconds": wall-clock time; plus "attacks", "eps",
        "norm", "n_examples".
    """
    start = time.time()
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    batch_size = _check_positive_int("batch_size", batch_size)
    seed = _check_seed(seed)
    plan = _resolve_attacks(version, attacks)
    passes = _verdict_passes(version, attacks, plan) if verdict_passes is None else _check_positive_int(
        "verdict_passes", verdict_passes)
    x_t, y_t = _as_inputs(x, y)
    x_np = x_t.numpy()
    y_np = y_t.numpy()
    n = len(x_np)
    if n == 0:
        raise UserError("x is empty")

    from tqdm.auto import tqdm

    logits = _predict_logits(model_fn, x_t, batch_size, passes=passes)
    n_classes = _n_classes(logits, y_t)
    for name, _ in plan:
        need = _MIN_CLASSES.get(name, 2)
        if attacks is None or not isinstance(attacks, Mapping):
            if n_classes < need:
                raise UserError(
                    f"attack {name!r} needs at least {need} classes, the model has {n_classes}; "
                    f"choose attacks from {sorted(a for a, k in _MIN_CLASSES.items() if k <= n_classes)}"
                )
    flag_list = None
    if flags:
        from tfrobust.integrity import autoattack_flags

        flag_list = autoattack_flags(model_fn, x_np[:batch_size], y_np[:batch_size], eps, norm=norm,
                                     randomised_expected=passes > 1, seed=seed)
        for flag in flag_list:
            if not flag["passed"]:
                warnings.warn(f"AutoAttack check {flag['name']}: {flag['detail']}", RuntimeWarning, stacklevel=2)
    clean_mask = (_predicted(logits).numpy() == y_np)
    robust = clean_mask.copy()
    broken_by = np.where(clean_mask, "", "clean").astype(object)
    pert_norm = np.full(n, np.nan)
    x_adv = x_np.copy()
    clean = float(clean_mask.mean())
    say = tqdm.write if verbose else (lambda *_: None)
    say(f"AutoAttack ({norm}, eps={eps:g}): clean accuracy {clean:.2%} on {n} examples")
    log = _PartialLog(partial_path, _fingerprint(x_np, y_np, eps, norm, [a for a, _ in plan], version if attacks
                                                 is None else None, seed, batch_size, passes, individual))
    replayed = np.zeros(n, bool)
    devices = _replica_devices(strategy)

    def attack_examples(name, fn, idx, bar_desc):
        """Runs ``fn`` on x[idx] in batches; returns (fooled mask over idx, adversarial points, norms)."""
        fooled = np.zeros(len(idx), bool)
        points = x_np[idx].copy()
        norms = np.full(len(idx), np.nan)
        n_batches = max(1, math.ceil(len(idx) / batch_size))
        with tqdm(total=len(idx), desc=bar_desc, disable=not verbose, leave=False) as bar:
            for b in range(n_batches):
                sl = slice(b * batch_size, min((b + 1) * batch_size, len(idx)))
                xb, yb = x_np[idx[sl]], y_np[idx[sl]]
                if len(xb) == 0:
                    continue
                done = log.lookup(bar_desc, b, idx[sl])
                if done is not None:
                    fooled_idx, fooled_norms = done
                    where = np.searchsorted(idx[sl], fooled_idx)
                    fooled[sl][where] = True
                    norms[sl][where] = fooled_norms
                    replayed[fooled_idx] = True
                    bar.update(len(xb))
                    continue
                if len(devices) > 1 and len(xb) >= len(devices):
                    out = _run_sharded(fn, model_fn, xb, yb, eps, norm, seed, devices)
                else:
                    out = fn(model_fn, xb, yb, eps, norm=norm, seed=seed)
                out = np.asarray(out, np.float32).reshape(xb.shape)
                out = _numpy_project(out, xb, eps, norm)
                pred = _predicted(_predict_logits(model_fn, tf.constant(out), batch_size, passes=passes)).numpy()
                fooled[sl] = pred != yb
                points[sl] = out
                norms[sl] = np.where(fooled[sl], perturbation_norms(out, xb, norm), np.nan)
                log.record(bar_desc, b, idx[sl], idx[sl][fooled[sl]], norms[sl][fooled[sl]])
                bar.update(len(xb))
        return fooled, points, norms

    per_attack = {}
    for name, fn in plan:
        idx = np.flatnonzero(robust)
        if idx.size:
            fooled, points, norms = attack_examples(name, fn, idx, name)
            robust[idx[fooled]] = False
            x_adv[idx[fooled]] = points[fooled]
            broken_by[idx[fooled]] = name
            pert_norm[idx[fooled]] = norms[fooled]
        per_attack[name] = float(robust.mean())
        say(f"  robust accuracy after {name.upper()}: {per_attack[name]:.2%} ({time.time() - start:.1f} s)")

    indiv = None
    if individual:
        indiv = {}
        idx = np.flatnonzero(clean_mask)
        for name, fn in plan:
            alone = clean_mask.copy()
            if idx.size:
                fooled, points, _ = attack_examples(name, fn, idx, f"{name} (alone)")
                alone[idx[fooled]] = False
                newly = idx[fooled & robust[idx]]
                x_adv[newly] = points[fooled & robust[idx]]
                robust[idx[fooled]] = False
            indiv[name] = float(alone.mean())
            say(f"  robust accuracy of {name.upper()} alone: {indiv[name]:.2%}")

    if flag_list is not None and "square" not in [a for a, _ in plan]:
        flag_list[-1] = {"name": "square_not_better", "passed": True, "detail": "Square is not in the ensemble",
                         "skipped": True}
    elif flag_list is not None:
        from tfrobust.integrity import square_check

        flag_list[-1] = square_check(broken_by, n)
        if not flag_list[-1]["passed"]:
            warnings.warn(f"AutoAttack check square_not_better: {flag_list[-1]['detail']}", RuntimeWarning,
                          stacklevel=2)
    fresh = ~replayed
    _check_ball(x_adv[fresh], x_np[fresh], eps, norm)
    if np.any(pert_norm[replayed] > eps + BALL_TOLERANCE):
        raise RuntimeError(f"{partial_path} records perturbations outside the {norm} ball of radius {eps}")
    log.close()
    worst = float(robust.mean())
    say(f"  worst case over all attacks: {worst:.2%} ({time.time() - start:.1f} s)")
    return {
        "clean": clean,
        "per_attack": per_attack,
        "individual": indiv,
        "worst_case": worst,
        "robust_mask": robust,
        "clean_mask": clean_mask,
        "broken_by": broken_by.astype(str),
        "perturbation_norm": pert_norm,
        "x_adv": x_adv,
        "flags": flag_list,
        "seconds": time.time() - start,
        "attacks": [name for name, _ in plan],
        "version": version if attacks is None else "custom",
        "verdict_passes": int(passes),
        "resumed": int(replayed.sum()),
        "devices": list(devices) if len(devices) > 1 else [],
        "eps": eps,
        "norm": norm,
        "n_examples": n,
    }


def _replica_devices(strategy) -> list:
    """The local replica devices of ``strategy`` (empty for None or the default strategy)."""
    if strategy is None:
        return []
    try:
        return list(strategy.extended.worker_devices)
    except (AttributeError, NotImplementedError):
        return []


def _run_sharded(fn, model_fn, xb, yb, eps, norm, seed, devices):
    """``fn`` on one shard of the batch per device, concurrently; the points in the batch's order."""
    from concurrent.futures import ThreadPoolExecutor

    shards = [s for s in np.array_split(np.arange(len(xb)), len(devices)) if len(s)]

    def run(device, s):
        with tf.device(device):
            return np.asarray(fn(model_fn, xb[s], yb[s], eps, norm=norm, seed=seed), np.float32)

    with ThreadPoolExecutor(len(shards)) as pool:
        parts = list(pool.map(run, devices[:len(shards)], shards))
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------
# Per-example results on disk (resumable evaluation)
# --------------------------------------------------------------------------


def _fingerprint(x, y, eps, norm, names, version, seed, batch_size, passes, individual) -> dict:
    """What a partial-results file must match to be replayed: the data and every setting."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    return {"data_sha256": digest.hexdigest(), "n_examples": int(len(x)), "eps": float(eps), "norm": norm,
            "attacks": list(names), "version": version, "seed": int(seed), "batch_size": int(batch_size),
            "verdict_passes": int(passes), "individual": bool(individual)}


class _PartialLog:
    """Append-only JSON-lines record of decided batches; replays a file from an interrupted run.

    Line 1 is the fingerprint of the run; each further line is one batch:
    ``{"attack", "batch", "examples": [...], "fooled": [...], "norms": [...]}``,
    written with one ``write`` call and flushed to disk (fsync) before the next
    batch starts. A torn last line (the process was killed while writing) is
    ignored and its batch runs again.
    """

    def __init__(self, path, fingerprint):
        import json
        import os

        self.path = path
        self.done = {}
        self.file = None
        if path is None:
            return
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().split("\n")
            try:
                header = json.loads(lines[0])
            except ValueError:
                raise UserError(f"{path} is not a partial-results file of this evaluation; remove it or "
                                "choose another output") from None
            if header != fingerprint:
                changed = sorted(k for k in set(header) | set(fingerprint) if header.get(k) != fingerprint.get(k))
                raise UserError(f"{path} was written by an evaluation with different {', '.join(changed)}; "
                                "remove it to start over or rerun the same command")
            complete = []
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # torn last line
                self.done[(entry["attack"], entry["batch"])] = entry
                complete.append(line)
            # rewrite without a torn tail, atomically
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write("\n".join([lines[0]] + complete) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")
            self._write(fingerprint)

    def _write(self, obj):
        import json
        import os

        self.file.write(json.dumps(obj) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def lookup(self, attack, batch, examples):
        entry = self.done.get((attack, batch))
        if entry is None:
            return None
        if list(entry["examples"]) != [int(i) for i in examples]:
            raise UserError(f"{self.path} does not match this evaluation (batch {batch} of {attack} holds other "
                            "examples); remove it to start over")
        return np.asarray(entry["fooled"], np.int64), np.asarray(entry["norms"], np.float64)

    def record(self, attack, batch, examples, fooled, norms):
        if self.file is not None:
            self._write({"attack": attack, "batch": int(batch), "examples": [int(i) for i in examples],
                         "fooled": [int(i) for i in fooled], "norms": [float(v) for v in norms]})

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
