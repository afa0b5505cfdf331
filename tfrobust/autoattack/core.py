"""The shared core of the AutoAttack package: checks, model calls, losses, projections and restarts.

Public API of this module (used by the attack modules, by
:mod:`tfrobust.integrity` and by tests; the projection onto the ball, the
per-example norms, the cross-entropy and the margin are those of
:mod:`tfrobust.attacks`):

* Argument checks: :func:`check_norm`, :func:`check_eps`,
  :func:`check_positive_int`, :func:`check_seed`, :func:`check_targeted_args`,
  and :func:`as_inputs` (float32 images in [0, 1] and int32 labels, or a
  :class:`~tfrobust.errors.UserError`).
* Model calls: :func:`call_model` (``training=False`` for a keras model),
  :func:`model_caller` (holds the model weakly), :func:`compiled` (a
  ``tf.function`` built once per model and static key, cached weakly per
  model), :func:`mean_logits` and :func:`predict_logits` (in batches, over
  EOT passes), the ``tf.TensorSpec`` helpers :func:`image_spec`,
  :data:`LABEL_SPEC`, :data:`SCALAR_SPEC`, :data:`SEED_SPEC`.
* Balls and losses: :func:`flatten_examples`, :func:`normalize`,
  :func:`project` (checked), :func:`project_numpy`, :func:`perturbation_norms`,
  :func:`check_ball`, :func:`sphere_start` (the random start of APGD and
  FAB), :func:`onehot`, :func:`dlr_loss`, :func:`dlr_targeted_loss`,
  :func:`input_gradient`, :func:`eot_input_gradient`, :func:`predicted`,
  :func:`rank_targets`, :func:`n_classes`, :func:`warn_zero_gradients`.
* Restarts: :class:`Survivors` (built by :func:`survivors_of`) holds the examples an attack has not broken
  yet and runs the restart loop shared by APGD, FAB and Square.

Seeds of the random draws come from :func:`tfrobust.seeds.attack_seed`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Mapping

import numpy as np
import tensorflow as tf

from tfrobust import attacks
from tfrobust.attacks import margin, per_example, per_example_norm
from tfrobust.errors import UserError, check_int, check_number, unknown_choice

NORMS = ("linf", "l2")

# Tolerance of the final check that every returned point lies in the ball.
BALL_TOLERANCE = 1e-6

TINY = 1e-12


def check_norm(norm) -> str:
    """``norm`` lower-cased if it is "linf" or "l2", else a UserError."""
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise unknown_choice("norm", norm, NORMS)
    return norm.lower()


def check_eps(eps) -> float:
    """``eps`` as a float, or a UserError unless it is a single finite number >= 0 (as everywhere in tfrobust)."""
    return check_number("eps", eps)


check_positive_int = check_int


def check_seed(seed) -> int:
    """An integer seed in [0, 2**62); None draws one from the operating system."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    return int(seed) % (2**62)


def as_inputs(x, y):
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


# --------------------------------------------------------------------------
# Model calls and the per-model cache of compiled functions
# --------------------------------------------------------------------------


def call_model(model, x):
    """Logits (float32) of ``model`` at ``x``: a keras layer is called with ``training=False``; a dict or
    one-element list output is unwrapped."""
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


def model_caller(model):
    """``x -> logits`` holding ``model`` weakly when possible (no cache cycles)."""
    try:
        ref = weakref.ref(model)
    except TypeError:
        return lambda x: call_model(model, x)

    def call(x):
        m = ref()
        if m is None:  # pragma: no cover
            raise RuntimeError("the model was garbage-collected while an attack was using it")
        return call_model(m, x)

    return call


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled(model, key, build):
    """The compiled function ``build(call)`` for ``model`` and the static ``key``, cached."""
    try:
        table = _COMPILED.get(model)
        if table is None:
            table = {}
            _COMPILED[model] = table
    except TypeError:
        return build(model_caller(model))
    fn = table.get(key)
    if fn is None:
        fn = build(model_caller(model))
        table[key] = fn
    return fn


def image_spec(shape):
    """The float32 ``TensorSpec`` of a batch of any size of images shaped like ``shape[1:]``."""
    return tf.TensorSpec([None] + list(shape[1:]), tf.float32)


LABEL_SPEC = tf.TensorSpec([None], tf.int32)
SCALAR_SPEC = tf.TensorSpec([], tf.float32)
SEED_SPEC = tf.TensorSpec([2], tf.int64)


def mean_logits(call, passes):
    """``x -> `` the mean of ``passes`` forward passes (one pass: the call itself)."""
    if passes == 1:
        return call

    def mean(x):
        def body(i, total):
            return i + 1, total + call(x)

        _, total = tf.while_loop(lambda i, _: i < passes, body, (tf.constant(1), call(x)))
        return total / float(passes)

    return mean


def predict_logits(model, x, batch_size=None, passes=1):
    """Logits of ``model`` at ``x`` (eager tensor), in batches of ``batch_size``.

    With ``passes`` > 1, the mean logits of that many forward passes: the
    prediction of a randomised model in expectation.
    """
    key = ("logits", tuple(x.shape[1:])) if passes == 1 else ("logits", tuple(x.shape[1:]), int(passes))
    fn = compiled(
        model,
        key,
        lambda call: tf.function(mean_logits(call, int(passes)), input_signature=[image_spec(x.shape)]),
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


def flatten_examples(t):
    """``t`` (N, ...) as (N, d)."""
    return tf.reshape(t, [tf.shape(t)[0], -1])


def normalize(t, norm):
    """``t / (||t|| + 1e-12)`` per example (L-inf or L2)."""
    return t / per_example(per_example_norm(t, norm) + TINY, t)


def project(x_adv, x, eps, norm="linf"):
    """Projects ``x_adv`` onto the eps-ball (L-inf or L2) around ``x``, then onto [0, 1]."""
    norm = check_norm(norm)
    eps = check_eps(eps)
    return attacks.project(tf.cast(x_adv, tf.float32), tf.cast(x, tf.float32), eps, norm)


def perturbation_norms(x_adv, x, norm="linf") -> np.ndarray:
    """Per-example L-inf or L2 norm of ``x_adv - x`` (float64, numpy)."""
    norm = check_norm(norm)
    d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
    if norm == "linf":
        return np.abs(d).max(axis=1) if d.shape[1] else np.zeros(len(x))
    return np.sqrt((d * d).sum(axis=1))


def onehot(y, logits):
    """One-hot rows of ``y`` with the width and dtype of ``logits``."""
    return tf.one_hot(y, tf.shape(logits)[-1], dtype=logits.dtype)


def dlr_loss(logits, y):
    """Difference of logits ratio (Croce & Hein 2020, section 4), to be maximised.

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with ``z_pi`` the sorted logits.
    """
    top = tf.math.top_k(logits, k=3).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + TINY)


def dlr_targeted_loss(logits, y, y_target):
    """Targeted DLR loss (Croce & Hein 2020, section 4), to be maximised.

    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``.
    """
    top = tf.math.top_k(logits, k=4).values
    z_y = tf.reduce_sum(logits * onehot(y, logits), axis=-1)
    z_t = tf.reduce_sum(logits * onehot(y_target, logits), axis=-1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + TINY)


def input_gradient(call, x, objective):
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


def eot_input_gradient(call, x, objective, eot_iter):
    """Expectation over Transformation (Athalye et al., ICML 2018) of :func:`input_gradient`.

    Runs ``eot_iter`` forward and backward passes at ``x`` (a randomised
    model draws new randomness in each) and returns the mean logits, the mean
    objective and the mean gradient. The reference (autopgd_base.py, the
    ``eot_iter`` loops) averages the gradients the same way but keeps the
    logits and loss of the last pass only.
    """
    if eot_iter == 1:
        return input_gradient(call, x, objective)

    def body(i, logits_sum, values_sum, grad_sum):
        logits, values, grad = input_gradient(call, x, objective)
        return i + 1, logits_sum + logits, values_sum + values, grad_sum + grad

    logits0, values0, grad0 = input_gradient(call, x, objective)
    _, logits, values, grad = tf.while_loop(
        lambda i, *_: i < eot_iter, body, (tf.constant(1), logits0, values0, grad0))
    scale = 1.0 / float(eot_iter)
    return logits * scale, values * scale, grad * scale


def predicted(logits):
    """The predicted class (argmax of the logits), int32."""
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def rank_targets(logits, rank):
    """The class with the ``rank``-th largest logit (rank 1 is the top class)."""
    order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    return tf.cast(order[:, rank - 1], tf.int32)


def check_targeted_args(norm, eps, n_iter, n_target_classes, n_restarts, seed):
    """Validates the arguments shared by the targeted attacks (APGD-T, FAB-T)."""
    return (check_norm(norm), check_eps(eps), check_positive_int("n_iter", n_iter),
            check_positive_int("n_target_classes", n_target_classes),
            check_positive_int("n_restarts", n_restarts, 0), check_seed(seed))


def n_classes(logits, y=None) -> int:
    """Number of classes of the model; checks that the labels ``y`` are in range."""
    n = int(logits.shape[-1])
    if y is not None and int(tf.size(y)) and (int(tf.reduce_min(y)) < 0 or int(tf.reduce_max(y)) >= n):
        raise UserError(f"labels must be in 0..{n - 1} for a model with {n} logits")
    return n


def warn_zero_gradients(count, name):
    """Warns that ``count`` examples had an all-zero input gradient (possible gradient masking)."""
    if count:
        warnings.warn(
            f"{name}: {count} example(s) have an all-zero input gradient at the starting point; "
            "gradient-based attacks are unreliable on them (possible gradient masking)",
            RuntimeWarning,
            stacklevel=3,
        )


def sphere_start(x, radius, norm, seed):
    """``clip(x + radius * t / ||t||, 0, 1)``: t uniform in [-1, 1]^d (L-inf) or Gaussian (L2), drawn from ``seed``.

    The random start of APGD (radius eps) and of FAB's later restarts (radius eps / 2).
    """
    if norm == "linf":
        t = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
    else:
        t = tf.random.stateless_normal(tf.shape(x), seed)
    return tf.clip_by_value(x + radius * normalize(t, norm), 0.0, 1.0)


def project_numpy(x_adv, x, eps, norm):
    """Numpy projection onto the ball and [0, 1]; an L2 point outside is pulled just inside (factor 1 - 1e-7)."""
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


def check_ball(x_adv, x, eps, norm, tol=BALL_TOLERANCE):
    """Raises if any point leaves [0, 1] or the eps-ball by more than ``tol``."""
    lo, hi = float(np.min(x_adv)) if x_adv.size else 0.0, float(np.max(x_adv)) if x_adv.size else 0.0
    if lo < -tol or hi > 1 + tol or not np.all(np.isfinite(x_adv)):
        raise RuntimeError(f"adversarial examples leave [0, 1]: values in [{lo}, {hi}]")
    if len(x):
        excess = float(np.max(perturbation_norms(x_adv, x, norm))) - eps
        if excess > tol:
            raise RuntimeError(f"adversarial examples leave the {norm} ball of radius {eps} by {excess:.3g}")


def survivors_of(model_fn, x, y, passes=1):
    """Checked inputs (:func:`as_inputs`) and their :class:`Survivors`; ``(x, None)`` for an empty batch."""
    x, y = as_inputs(x, y)
    if int(x.shape[0]) == 0:
        return x, None
    return x, Survivors(model_fn, x, y, passes=passes)


class Survivors:
    """The examples of a batch that an attack has not broken yet, and the adversarial points found so far.

    Built from checked inputs (:func:`as_inputs`): ``clean_logits`` (the mean
    of ``passes`` forward passes), ``classes``, ``robust`` (numpy bool, True
    where the example is still correctly classified) and ``adv`` (numpy, ``x``
    until a point is found).
    """

    def __init__(self, model_fn, x, y, passes=1):
        self.x, self.y = x, y
        self.clean_logits = predict_logits(model_fn, x, passes=passes)
        self.classes = n_classes(self.clean_logits, y)
        self.robust = (predicted(self.clean_logits) == y).numpy()
        self.adv = x.numpy().copy()

    def restarts(self, n_restarts, attempt):
        """Runs ``attempt(idx, xs, ys, restart) -> (points, fooled)`` up to ``n_restarts`` times.

        Each attempt sees the examples still robust (indices ``idx``, images
        ``xs``, labels ``ys``) and returns numpy adversarial points and a
        fooled mask for them; fooled examples are recorded and leave the set.
        Stops early once every example is broken.
        """
        for restart in range(n_restarts):
            idx = np.flatnonzero(self.robust)
            if idx.size == 0:
                break
            points, fooled = attempt(idx, tf.gather(self.x, idx), tf.gather(self.y, idx), restart)
            self.robust[idx[fooled]] = False
            self.adv[idx[fooled]] = points[fooled]

    def result(self):
        """The adversarial points as a tensor (``x`` where none was found)."""
        return tf.convert_to_tensor(self.adv)


__all__ = [
    "NORMS", "BALL_TOLERANCE", "TINY", "LABEL_SPEC", "SCALAR_SPEC", "SEED_SPEC",
    "check_norm", "check_eps", "check_positive_int", "check_seed", "check_targeted_args", "as_inputs",
    "call_model", "model_caller", "compiled", "image_spec", "mean_logits", "predict_logits",
    "flatten_examples", "normalize", "project", "project_numpy", "perturbation_norms", "check_ball", "sphere_start",
    "onehot", "dlr_loss", "dlr_targeted_loss", "input_gradient", "eot_input_gradient", "predicted", "rank_targets",
    "n_classes", "warn_zero_gradients", "survivors_of", "Survivors",
]
