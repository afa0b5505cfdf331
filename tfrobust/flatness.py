"""Flatness of the (robust) loss in weight space.

Implements the scale-invariant flatness measures of Stutz, Hein and Schiele,
"Relating Adversarially Robust Generalization to Flat Minima", ICCV 2021
(arXiv:2104.04448; docs/algorithms.md, section 6). The paper's definitions, as
numbered in this package:

(F1) robust loss
     ``RLoss(w) = 1/N sum_n max_{||delta_n|| <= eps} CE(f(x_n + delta_n; w), y_n)``,
     approximated with PGD and random restarts;
(F2) average-case flatness
     ``E_nu[RLoss(w + nu)] - RLoss(w)``, ``nu`` uniform on the per-layer sphere
     ``||nu_l||_2 = xi * ||w_l||_2``;
(F3) worst-case flatness
     ``max_{nu in B_xi(w)} max_delta L(w + nu, x + delta) - RLoss(w)`` with
     ``B_xi(w) = {nu : ||nu_l||_2 <= xi * ||w_l||_2 for every layer l}``, one
     ``nu`` shared by the whole evaluation set and optimised jointly with the
     per-example ``delta``;

and the clean counterparts of (F2) and (F3) (``delta = 0``).

"Layers" are the individual trainable variables (kernels and biases
separately), excluding those of normalisation layers, as in the paper and its
reference code. Because every perturbation is relative to the norm of the
variable it perturbs, both measures are invariant to rescaling a ReLU layer
by ``k`` and the next one by ``1/k``.

All measures take a Keras model mapping images in [0, 1] to logits and always
call it with ``training=False``, so BatchNormalization uses (and never
updates) its moving statistics. Every variable of the model is saved before a
measurement and restored in a ``finally`` block, so the model is bitwise
unchanged afterwards, also when the measurement raises.

Randomness is stateless: the same ``seed`` gives the same PGD starts and the
same weight perturbations. The PGD start of example batch ``b`` and restart
``r`` depends only on ``(seed, r, b)``, so ``RLoss(w)`` and every
``RLoss(w + nu)`` are computed with common random starts (this lowers the
variance of their difference and leaves its expectation unchanged).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfrobust.attacks import NORMS, cross_entropy, pgd, project, random_start
from tfrobust.errors import UserError, unknown_choice

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_STEP_SIZE",
    "DEFAULT_STEPS",
    "REPORT_DEFAULTS",
    "STEP_FRACTION",
    "resolve_step_size",
    "perturbable_variables",
    "sample_sphere_perturbation",
    "sample_ball_perturbation",
    "project_perturbation",
    "robust_loss",
    "average_case_flatness",
    "worst_case_flatness",
    "flatness_report",
    "FlatnessMonitor",
]

DEFAULT_EPS = 8.0 / 255.0
DEFAULT_STEP_SIZE = 0.007
# step_size=None means this fraction of eps: the reference's 0.007 at 8/255.
STEP_FRACTION = DEFAULT_STEP_SIZE / DEFAULT_EPS
DEFAULT_STEPS = 20
DEFAULT_BATCH_SIZE = 128

_NORMALISATION_LAYER_NAMES = (
    "BatchNormalization",
    "SyncBatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "UnitNormalization",
    "RMSNormalization",
    "Normalization",
)

# Independent random streams (the second entry of every seed sequence).
_STREAM_PGD = 1
_STREAM_AVERAGE = 2
_STREAM_WORST_NU = 3
_STREAM_WORST_DELTA = 4
_STREAM_DIRECTION = 5


# ---------------------------------------------------------------------------
# Variables, seeds, data
# ---------------------------------------------------------------------------


def _normalisation_types():
    return tuple(getattr(keras.layers, n) for n in _NORMALISATION_LAYER_NAMES if hasattr(keras.layers, n))


def _sublayers(model):
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=True, recursive=True))
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
    return found


def perturbable_variables(model) -> list:
    """The variables that the flatness measures perturb.

    Every trainable variable of ``model`` (kernels and biases, each its own
    "layer" ``w_l``) except the variables of normalisation layers
    (BatchNormalization, LayerNormalization, GroupNormalization,
    UnitNormalization, RMSNormalization and keras' ``Normalization``), as in
    Stutz et al., ICCV 2021 and its reference code. The order is that of
    ``model.trainable_variables``.
    """
    norm_types = _normalisation_types()
    excluded = set()
    for layer in _sublayers(model):
        if isinstance(layer, norm_types):
            for v in layer.variables:
                excluded.add(id(v))
    return [v for v in model.trainable_variables if id(v) not in excluded]


def _seed(*parts) -> tf.Tensor:
    """A stateless-RNG seed (int32, shape [2]) derived from integers."""
    words = [int(p) & 0xFFFFFFFF for p in parts]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return tf.constant((state % np.uint32(2**31 - 1)).astype(np.int32))


def _as_labels(y) -> tf.Tensor:
    y = np.asarray(y.numpy() if isinstance(y, tf.Tensor) else y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = np.argmax(y, axis=1)
    y = y.reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise UserError("labels must be integer class indices or one-hot vectors")
    return tf.constant(y.astype(np.int32))


def _as_data(x, y):
    x = tf.convert_to_tensor(x, tf.float32)
    y = _as_labels(y)
    n = int(x.shape[0])
    if n == 0:
        raise UserError("the evaluation set is empty")
    if int(y.shape[0]) != n:
        raise UserError(f"x has {n} examples but y has {int(y.shape[0])} labels")
    return x, y


def _batches(n: int, batch_size: int):
    if batch_size is None or int(batch_size) < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    return [(i, min(i + int(batch_size), n)) for i in range(0, n, int(batch_size))]


def _ensure_built(model, x):
    if not getattr(model, "built", True) or not model.trainable_variables:
        model(x[:1], training=False)


def _prepare(model, x):
    _ensure_built(model, x)
    variables = perturbable_variables(model)
    if not variables:
        raise UserError("the model has no trainable variables outside normalisation layers")
    return variables


def resolve_step_size(eps: float, step_size: Optional[float] = None) -> float:
    """``step_size`` if given, else the reference's ratio ``0.007 / (8/255)`` times ``eps`` (0.007 at eps = 8/255)."""
    if step_size is not None:
        return float(step_size)
    if float(eps) == DEFAULT_EPS:
        return DEFAULT_STEP_SIZE
    return STEP_FRACTION * float(eps)


def _check_attack(eps, step_size, steps, restarts, norm):
    if norm not in NORMS:
        raise unknown_choice("norm", norm, NORMS)
    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    if step_size < 0:
        raise UserError(f"step_size must be >= 0, got {step_size}")
    if int(steps) < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    if int(restarts) < 1:
        raise UserError(f"restarts must be >= 1, got {restarts}")


@contextlib.contextmanager
def _weights_preserved(model):
    """Saves every variable of ``model`` and restores it on exit, also after an exception."""
    saved = [(v, tf.identity(v.value)) for v in model.variables]
    try:
        yield
    finally:
        for v, value in saved:
            v.assign(value)


def _assign_offset(variables, base, offsets, scale=None):
    for v, w, d in zip(variables, base, offsets):
        if scale is None:
            v.assign(w + tf.cast(d, w.dtype))
        else:
            v.assign(w + tf.cast(scale, w.dtype) * tf.cast(d, w.dtype))


def _progress(total, desc, enabled):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------
# Perturbation sampling and projection
# ---------------------------------------------------------------------------


def _compiled(fn, signature):
    """``tf.function`` with a batch-size-agnostic signature, traced once per measurement.

    ``fn`` is wrapped in a ``functools.partial`` so that TensorFlow's
    frequent-retracing heuristic, which groups functions by their code object,
    counts every measurement's single trace separately.
    """
    return tf.function(functools.partial(fn), input_signature=signature)


def _batch_spec(x):
    return tf.TensorSpec([None] + list(x.shape[1:]), x.dtype)


def _l2(t):
    return tf.sqrt(tf.reduce_sum(tf.square(tf.cast(t, tf.float32))))


def sample_sphere_perturbation(weights: Sequence, xi: float, seed=0, sample: int = 0) -> List[tf.Tensor]:
    """Samples ``nu`` uniformly on the per-layer sphere ``||nu_l||_2 = xi * ||w_l||_2``.

    Stutz et al., ICCV 2021, (F2): the direction of every
    layer is a standard Gaussian normalised to unit L2 norm (uniform on the
    sphere), drawn independently of the weights' scale, then scaled to
    ``xi * ||w_l||_2``. Layers with ``w_l = 0`` get ``nu_l = 0``.

    Args:
      weights: the values ``w_l`` (tensors or arrays), one per layer.
      xi: the relative radius.
      seed, sample: the draw is a deterministic function of ``(seed, sample)``.

    Returns:
      One tensor per layer, with the shape and dtype of ``w_l``.
    """
    out = []
    for i, w in enumerate(weights):
        w = tf.convert_to_tensor(w)
        g = tf.random.stateless_normal(tf.shape(w), _seed(seed, _STREAM_AVERAGE, sample, i), dtype=tf.float32)
        scale = tf.cast(xi, tf.float32) * _l2(w) / tf.maximum(_l2(g), 1e-30)
        out.append(tf.cast(g * scale, w.dtype))
    return out


def sample_ball_perturbation(weights: Sequence, xi: float, seed=0, attempt: int = 0) -> List[tf.Tensor]:
    """The start of the worst-case weight attack.

    Per layer, a uniform direction (normalised Gaussian) with radius drawn
    uniformly from ``[0, xi * ||w_l||_2]`` (the reference's "uniform norm"
    initialisation; Stutz et al., ICCV 2021, (F3)). Deterministic in
    ``(seed, attempt)``.
    """
    out = []
    for i, w in enumerate(weights):
        w = tf.convert_to_tensor(w)
        s = _seed(seed, _STREAM_WORST_NU, attempt, i)
        g = tf.random.stateless_normal(tf.shape(w), s, dtype=tf.float32)
        u = tf.random.stateless_uniform([], s + 1, 0.0, 1.0, dtype=tf.float32)
        scale = u * tf.cast(xi, tf.float32) * _l2(w) / tf.maximum(_l2(g), 1e-30)
        out.append(tf.cast(g * scale, w.dtype))
    return out


def _project_layer(nu, radius):
    n = _l2(nu)
    factor = tf.minimum(1.0, radius / tf.maximum(n, 1e-30))
    return tf.cast(tf.cast(nu, tf.float32) * factor, nu.dtype)


def project_perturbation(perturbation: Sequence, weights: Sequence, xi: float) -> List[tf.Tensor]:
    """Projects every ``nu_l`` onto the L2 ball of radius ``xi * ||w_l||_2`` (Stutz et al., ICCV 2021, (F3))."""
    out = []
    for nu, w in zip(perturbation, weights):
        nu = tf.convert_to_tensor(nu)
        out.append(_project_layer(nu, tf.cast(xi, tf.float32) * _l2(w)))
    return out


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


class _LossEvaluator:
    """Per-example (robust) cross-entropy of a model at its current weights.

    ``robust=True``: for each restart ``r``, PGD from a uniform random start
    with seed ``(seed, r, batch)``; the per-example maximum over restarts of
    CE at the adversarial point (Stutz et al., ICCV 2021, (F1)).
    ``robust=False``: CE at the clean input.
    """

    def __init__(self, model, eps, step_size, steps, restarts, norm, batch_size, seed, robust=True, jit=True):
        self.model = model
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.norm = norm
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.robust = robust
        self.jit = jit
        self._adv = None
        self._clean = None

    def _compile(self, x):
        if self._adv is not None:
            return
        if not self.jit:
            self._adv, self._clean = self._adversarial_ce, self._clean_ce
            return
        xs = _batch_spec(x)
        ys = tf.TensorSpec([None], tf.int32)
        self._adv = _compiled(self._adversarial_ce, [xs, ys, tf.TensorSpec([2], tf.int32)])
        self._clean = _compiled(self._clean_ce, [xs, ys])

    def _model_fn(self, t):
        return self.model(t, training=False)

    def _adversarial_ce(self, x, y, seed):
        x_adv = pgd(self._model_fn, x, y, self.eps, self.step_size, self.steps, norm=self.norm, loss="ce",
                    random_start_kind="uniform", seed=seed)
        return cross_entropy(self._model_fn(x_adv), y)

    def _clean_ce(self, x, y):
        return cross_entropy(self._model_fn(x), y)

    def per_example(self, x, y) -> np.ndarray:
        self._compile(x)
        n = int(x.shape[0])
        out = []
        for b, (lo, hi) in enumerate(_batches(n, self.batch_size)):
            xb, yb = x[lo:hi], y[lo:hi]
            if not self.robust:
                out.append(self._clean(xb, yb).numpy())
                continue
            worst = None
            for r in range(self.restarts):
                ce = self._adv(xb, yb, _seed(self.seed, _STREAM_PGD, r, b)).numpy()
                worst = ce if worst is None else np.maximum(worst, ce)
            out.append(worst)
        return np.concatenate(out).astype(np.float64)

    def mean(self, x, y) -> float:
        return float(np.mean(self.per_example(x, y)))


def _custom_mean(loss_fn, model, x, y, batch_size) -> float:
    n = int(x.shape[0])
    total = 0.0
    for lo, hi in _batches(n, batch_size):
        total += float(loss_fn(model, x[lo:hi], y[lo:hi])) * (hi - lo)
    return total / n


def robust_loss(
    model,
    x,
    y,
    eps: float = DEFAULT_EPS,
    step_size: Optional[float] = None,
    steps: int = DEFAULT_STEPS,
    restarts: int = 1,
    norm: str = "linf",
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    jit: bool = True,
) -> float:
    """The robust loss ``RLoss(w)`` (Stutz et al., ICCV 2021, (F1)).

    The mean over examples of the worst per-example cross-entropy over
    ``restarts`` runs of PGD (uniform random start, ``steps`` signed-gradient
    steps of ``step_size`` for L-inf, projection onto the eps-ball and [0, 1]).
    ``step_size=None`` takes the reference's ratio to eps
    (:func:`resolve_step_size`: 0.007 at eps = 8/255). The model is called
    with ``training=False``.

    The reference evaluates with PGD-20, step 0.007, eps 8/255 and 10
    restarts on the first 1000 test examples; ``restarts`` defaults to 1 here
    because every flatness measure evaluates the robust loss many times. Pass
    ``restarts=10`` to reproduce the reference's RLoss. The reference computes
    CE as ``-log(softmax + 1e-12)``; here it is computed from the logits.
    """
    step_size = resolve_step_size(eps, step_size)
    _check_attack(eps, step_size, steps, restarts, norm)
    x, y = _as_data(x, y)
    _ensure_built(model, x)
    with _weights_preserved(model):
        return _LossEvaluator(model, eps, step_size, steps, restarts, norm, batch_size, seed, True, jit).mean(x, y)


# ---------------------------------------------------------------------------
# Average-case flatness
# ---------------------------------------------------------------------------



def _with_settings(result, n, seed, variables, loss_fn, clean, eps, norm, step_size, steps, restarts, perturbations):
    """Adds what a measure was computed with (and optionally its perturbations) to its result."""
    result.update({
        "examples": n,
        "seed": int(seed),
        "variables": [getattr(v, "path", getattr(v, "name", "")) for v in variables],
    })
    if loss_fn is None:
        result.update({"eps": 0.0 if clean else float(eps), "norm": norm, "clean": bool(clean)})
        if not clean:
            result.update({"step_size": float(step_size), "steps": int(steps), "restarts": int(restarts)})
    if perturbations is not None:
        result["perturbations"] = perturbations
    return result

def average_case_flatness(
    model,
    x,
    y,
    xi: float = 0.5,
    samples: int = 10,
    eps: float = DEFAULT_EPS,
    step_size: Optional[float] = None,
    steps: int = DEFAULT_STEPS,
    restarts: int = 1,
    clean: bool = False,
    norm: str = "linf",
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss_fn: Optional[Callable] = None,
    reference_loss: Optional[float] = None,
    return_perturbations: bool = False,
    progress: bool = True,
    jit: bool = True,
) -> Dict:
    """Average-case flatness ``E_nu[L(w + nu)] - L(w)`` (Stutz et al., ICCV 2021, (F2)).

    ``nu`` is drawn uniformly on the per-layer sphere ``||nu_l||_2 = xi *
    ||w_l||_2`` (:func:`sample_sphere_perturbation`); for every sample a fresh
    PGD attack is run on the perturbed model. ``L`` is the robust loss
    ``RLoss`` (F1) by default, the clean cross-entropy when ``clean=True``
    (``delta = 0``; the reference then uses 50 samples), or, in general, any
    ``loss_fn(model, x_batch, y_batch) -> scalar`` that returns the batch mean
    of a loss at the model's current weights (it is called per batch and
    averaged with batch-size weights).

    Reference defaults: xi = 0.5, 10 samples, PGD-20 with step 0.007 at eps
    8/255, 1000 test examples (``step_size=None``: :func:`resolve_step_size`).
    ``restarts`` applies to ``L(w)`` and to every ``L(w + nu)`` alike (see
    :func:`robust_loss`).

    Returns a dict with ``flatness``, ``loss`` (``L(w)``), ``perturbed_loss``
    (the mean over samples), ``perturbed_losses``, ``std_error`` (of the
    mean), the settings, the perturbed ``variables`` (paths) and, with
    ``return_perturbations=True``, ``perturbations`` (one list of arrays per
    sample). The model's variables are restored bitwise.
    """
    step_size = resolve_step_size(eps, step_size)
    _check_attack(eps, step_size, steps, restarts, norm)
    if xi < 0:
        raise UserError(f"xi must be >= 0, got {xi}")
    if int(samples) < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    x, y = _as_data(x, y)
    variables = _prepare(model, x)
    n = int(x.shape[0])
    perturbations = []
    with _weights_preserved(model):
        base = [tf.identity(v.value) for v in variables]
        if loss_fn is not None:
            def measure():
                return _custom_mean(loss_fn, model, x, y, batch_size)
        else:
            evaluator = _LossEvaluator(model, eps, step_size, steps, restarts, norm, batch_size, seed, not clean, jit)

            def measure():
                return evaluator.mean(x, y)

        loss = float(reference_loss) if reference_loss is not None else measure()
        losses = []
        bar = _progress(int(samples), "average-case flatness", progress)
        try:
            for i in range(int(samples)):
                nu = sample_sphere_perturbation(base, xi, seed, i)
                _assign_offset(variables, base, nu)
                losses.append(measure())
                if return_perturbations:
                    perturbations.append([t.numpy() for t in nu])
                bar.update(1)
        finally:
            bar.close()
    losses_arr = np.asarray(losses, np.float64)
    result = {
        "measure": "average_case",
        "robust": loss_fn is None and not clean,
        "flatness": float(np.mean(losses_arr) - loss),
        "loss": loss,
        "perturbed_loss": float(np.mean(losses_arr)),
        "perturbed_losses": [float(v) for v in losses_arr],
        "std_error": float(np.std(losses_arr, ddof=1) / math.sqrt(len(losses_arr))) if len(losses_arr) > 1 else 0.0,
        "xi": float(xi),
        "samples": int(samples),
    }
    return _with_settings(result, n, seed, variables, loss_fn, clean, eps, norm, step_size, steps, restarts,
                          perturbations if return_perturbations else None)


# ---------------------------------------------------------------------------
# Worst-case flatness
# ---------------------------------------------------------------------------


def _normalised_input_step(grad, norm):
    if norm == "linf":
        return tf.sign(grad)
    flat = tf.reshape(grad, [tf.shape(grad)[0], -1])
    n = tf.norm(flat, axis=1)
    n = tf.reshape(n, [-1] + [1] * (len(grad.shape) - 1))
    return grad / tf.maximum(n, 1e-12)


class _JointAttack:
    """One pass step of the worst-case attack on a batch (Stutz et al., ICCV 2021, (F3)).

    At the current ``(nu, x')`` it computes the gradients of the batch-mean
    CE, then moves ``x' <- Proj(x' + step_size * sign(g_x))`` (skipped for the
    clean measure) and ``nu_l <- Proj_{xi ||w_l||}(nu_l + weight_step *
    ||w_l|| * g_l / ||g_l||)``.
    """

    def __init__(self, model, variables, eps, step_size, weight_step, norm, robust, jit, loss_fn=None):
        self.model = model
        self.variables = variables
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.weight_step = float(weight_step)
        self.norm = norm
        self.robust = robust
        self.loss_fn = loss_fn
        self.jit = jit and loss_fn is None
        self._step_compiled = None
        self._final_compiled = None

    def _compile(self, x, base):
        if self._step_compiled is not None:
            return
        if not self.jit:
            self._step_compiled, self._final_compiled = self._step_fn, self._final_fn
            return
        xs = _batch_spec(x)
        ys = tf.TensorSpec([None], tf.int32)
        ws = [tf.TensorSpec(w.shape, w.dtype) for w in base]
        scalars = [tf.TensorSpec([], tf.float32) for _ in base]
        self._step_compiled = _compiled(self._step_fn, [xs, ys, xs, ws, ws, scalars, scalars])
        self._final_compiled = _compiled(self._final_fn, [xs, ys, ws, ws])

    def step(self, x, y, x_adv, base, nus, radii, norms):
        self._compile(x, base)
        return self._step_compiled(x, y, x_adv, base, list(nus), radii, norms)

    def _assign(self, base, nus):
        for v, w, nu in zip(self.variables, base, nus):
            v.assign(w + nu)

    def _step_fn(self, x, y, x_adv, base, nus, radii, norms):
        self._assign(base, nus)
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            if self.loss_fn is not None:
                value = tf.cast(self.loss_fn(self.model, x_adv, y), tf.float32)
            else:
                value = tf.reduce_mean(cross_entropy(self.model(x_adv, training=False), y))
        grad_x, grad_w = tape.gradient(value, [x_adv, self.variables])
        if self.robust and grad_x is not None:
            x_new = x_adv + self.step_size * _normalised_input_step(tf.cast(grad_x, tf.float32), self.norm)
            x_new = project(tf.stop_gradient(x_new), x, self.eps, self.norm)
        else:
            x_new = x_adv
        new = []
        for nu, g, radius, w_norm in zip(nus, grad_w, radii, norms):
            if g is None:
                new.append(nu)
                continue
            g = tf.cast(tf.convert_to_tensor(g), tf.float32)
            g_norm = _l2(g)
            step = tf.where(g_norm > 0, self.weight_step * w_norm * g / tf.maximum(g_norm, 1e-30), tf.zeros_like(g))
            moved = tf.cast(nu, tf.float32) + step
            new.append(tf.cast(_project_layer(moved, radius), nu.dtype))
        return x_new, new, value

    def _final_fn(self, x_adv, y, base, nus):
        self._assign(base, nus)
        return cross_entropy(self.model(x_adv, training=False), y)

    def final_sum(self, x_adv, y, base, nus):
        if self.loss_fn is not None:
            self._assign(base, nus)
            return float(self.loss_fn(self.model, x_adv, y)) * int(x_adv.shape[0])
        self._compile(x_adv, base)
        return float(tf.reduce_sum(tf.cast(self._final_compiled(x_adv, y, base, list(nus)), tf.float64)).numpy())


def worst_case_flatness(
    model,
    x,
    y,
    xi: float = 0.00075,
    attempts: int = 10,
    passes: int = 20,
    eps: float = DEFAULT_EPS,
    step_size: Optional[float] = None,
    weight_step: float = 0.01,
    steps: int = DEFAULT_STEPS,
    restarts: int = 1,
    clean: bool = False,
    norm: str = "linf",
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    loss_fn: Optional[Callable] = None,
    reference_loss: Optional[float] = None,
    return_perturbations: bool = False,
    progress: bool = True,
    jit: bool = True,
) -> Dict:
    """Worst-case flatness ``max_{nu in B_xi(w)} max_delta L(w + nu) - RLoss(w)`` (Stutz et al., ICCV 2021, (F3)).

    One weight perturbation ``nu`` is shared by the whole set and optimised
    jointly with the per-example input perturbations ``delta``: ``passes``
    passes over the set, and on every batch one step on both (see
    :class:`_JointAttack`): ``delta`` by ``step_size * sign(grad)`` with
    projection onto the eps-ball and [0, 1], ``nu_l`` by the per-layer
    normalised gradient ``weight_step * ||w_l|| * g_l / ||g_l||`` followed by
    projection onto ``||nu_l|| <= xi * ||w_l||``. Start: ``nu`` from
    :func:`sample_ball_perturbation`, ``delta`` uniform in the eps-ball. The
    loss of an attempt is the mean CE at the final ``(nu, delta)``; the result
    keeps the maximum over ``attempts``. ``clean=True`` fixes ``delta = 0``.
    ``loss_fn(model, x_batch, y_batch)`` replaces the batch-mean CE by any
    differentiable loss (``delta`` is then not optimised).

    ``RLoss(w)`` (the subtracted term) is computed with PGD-``steps`` as in
    :func:`robust_loss` (clean CE when ``clean=True``). ``step_size=None``:
    see :func:`resolve_step_size`.

    Reference defaults: xi = 0.00075, 10 attempts, 20 passes, step 0.007,
    weight step 0.01, eps 8/255, 1000 test examples.

    Returns a dict with ``flatness``, ``loss``, ``perturbed_loss`` (the max
    over attempts), ``perturbed_losses`` (per attempt), ``best_attempt``, the
    settings and, with ``return_perturbations=True``, ``perturbations`` (the
    final ``nu`` of every attempt as lists of arrays). The model's variables
    are restored bitwise.
    """
    step_size = resolve_step_size(eps, step_size)
    _check_attack(eps, step_size, steps, restarts, norm)
    if xi < 0:
        raise UserError(f"xi must be >= 0, got {xi}")
    if int(attempts) < 1:
        raise UserError(f"attempts must be >= 1, got {attempts}")
    if int(passes) < 0:
        raise UserError(f"passes must be >= 0, got {passes}")
    if weight_step < 0:
        raise UserError(f"weight_step must be >= 0, got {weight_step}")
    x, y = _as_data(x, y)
    variables = _prepare(model, x)
    n = int(x.shape[0])
    robust = loss_fn is None and not clean
    batches = _batches(n, batch_size)
    losses, perturbations = [], []
    with _weights_preserved(model):
        base = [tf.identity(v.value) for v in variables]
        norms = [_l2(w) for w in base]
        radii = [tf.cast(xi, tf.float32) * w_norm for w_norm in norms]
        if reference_loss is not None:
            loss = float(reference_loss)
        elif loss_fn is not None:
            loss = _custom_mean(loss_fn, model, x, y, batch_size)
        else:
            evaluator = _LossEvaluator(model, eps, step_size, steps, restarts, norm, batch_size, seed, robust, jit)
            loss = evaluator.mean(x, y)
        attack = _JointAttack(model, variables, eps, step_size, weight_step, norm, robust, jit, loss_fn)
        bar = _progress(int(attempts) * int(passes), "worst-case flatness", progress)
        try:
            for a in range(int(attempts)):
                nus = sample_ball_perturbation(base, xi, seed, a)
                x_adv = []
                for b, (lo, hi) in enumerate(batches):
                    xb = x[lo:hi]
                    if robust:
                        start = random_start(xb, float(eps), norm, "uniform", _seed(seed, _STREAM_WORST_DELTA, a, b))
                        x_adv.append(project(start, xb, float(eps), norm))
                    else:
                        x_adv.append(xb)
                for _ in range(int(passes)):
                    for b, (lo, hi) in enumerate(batches):
                        x_adv[b], nus, _ = attack.step(x[lo:hi], y[lo:hi], x_adv[b], base, nus, radii, norms)
                    bar.update(1)
                total = sum(attack.final_sum(x_adv[b], y[lo:hi], base, nus) for b, (lo, hi) in enumerate(batches))
                losses.append(total / n)
                if return_perturbations:
                    perturbations.append([np.asarray(t) for t in nus])
        finally:
            bar.close()
    losses_arr = np.asarray(losses, np.float64)
    best = int(np.argmax(losses_arr))
    result = {
        "measure": "worst_case",
        "robust": robust,
        "flatness": float(losses_arr[best] - loss),
        "loss": loss,
        "perturbed_loss": float(losses_arr[best]),
        "perturbed_losses": [float(v) for v in losses_arr],
        "best_attempt": best,
        "xi": float(xi),
        "attempts": int(attempts),
        "passes": int(passes),
        "weight_step": float(weight_step),
    }
    return _with_settings(result, n, seed, variables, loss_fn, clean, eps, norm, step_size, steps, restarts,
                          perturbations if return_perturbations else None)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

REPORT_DEFAULTS = {
    "examples": 1000,
    "batch_size": DEFAULT_BATCH_SIZE,
    "step_size": None,
    "steps": DEFAULT_STEPS,
    "restarts": 1,
    "measures": ["average", "worst", "average_clean", "worst_clean"],
    "average": {"xi": 0.5, "samples": 10},
    "average_clean": {"xi": 0.5, "samples": 50},
    "worst": {"xi": 0.00075, "attempts": 10, "passes": 20, "weight_step": 0.01},
    "worst_clean": {"xi": 0.00075, "attempts": 10, "passes": 20, "weight_step": 0.01},
}
_COMMON_KEYS = ("batch_size", "step_size", "steps", "restarts")
_MEASURE_KEYS = {
    "average": ("xi", "samples") + _COMMON_KEYS,
    "average_clean": ("xi", "samples", "batch_size"),
    "worst": ("xi", "attempts", "passes", "weight_step") + _COMMON_KEYS,
    "worst_clean": ("xi", "attempts", "passes", "weight_step", "batch_size"),
}


def _merge_settings(settings: Optional[Dict], eps: float) -> Dict:
    merged = {k: (dict(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v))
              for k, v in REPORT_DEFAULTS.items()}
    for key, value in (settings or {}).items():
        if key not in merged:
            raise unknown_choice("flatness setting", key, merged.keys())
        if key in _MEASURE_KEYS:
            if not isinstance(value, dict):
                raise UserError(f"flatness setting {key!r} must be a mapping")
            for sub in value:
                if sub not in _MEASURE_KEYS[key]:
                    raise unknown_choice(f"{key} flatness setting", sub, _MEASURE_KEYS[key])
            merged[key].update(value)
        elif key == "measures":
            value = [value] if isinstance(value, str) else list(value)
            for m in value:
                if m not in _MEASURE_KEYS:
                    raise unknown_choice("flatness measure", m, _MEASURE_KEYS)
            merged[key] = value
        else:
            merged[key] = value
    merged["step_size"] = resolve_step_size(eps, merged["step_size"])
    for measure in _MEASURE_KEYS:
        for k in _COMMON_KEYS:
            if k in _MEASURE_KEYS[measure]:
                merged[measure].setdefault(k, merged[k])
        if "step_size" in merged[measure]:
            merged[measure]["step_size"] = resolve_step_size(eps, merged[measure]["step_size"])
    return merged


def flatness_report(model, x, y, eps: float, norm: str = "linf", settings: Optional[Dict] = None, seed: int = 0,
                    progress: bool = True) -> Dict:
    """All four flatness measures of Stutz et al., ICCV 2021 ((F2) and (F3), robust and clean) with their settings.

    Evaluated on the first ``settings["examples"]`` (default 1000, as in the
    paper) examples of ``(x, y)``. ``settings`` overrides
    :data:`REPORT_DEFAULTS`: top-level ``examples``, ``batch_size``,
    ``step_size`` (None: :func:`resolve_step_size`), ``steps``,
    ``restarts``, ``measures`` (a subset of
    ``average``, ``worst``, ``average_clean``, ``worst_clean``) and one
    mapping per measure (e.g. ``{"average": {"xi": 0.25, "samples": 5}}``).
    ``RLoss(w)`` and the clean loss at ``w`` are computed once and shared by
    the measures. The result is JSON-serialisable: ``{"eps", "norm", "seed",
    "examples", "settings", "robust_loss", "clean_loss", "seconds",
    "<measure>": {... as returned by the measure ...}}``.
    """
    if norm not in NORMS:
        raise unknown_choice("norm", norm, NORMS)
    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    merged = _merge_settings(settings, eps)
    x, y = _as_data(x, y)
    examples = merged["examples"]
    if examples is not None:
        if int(examples) < 1:
            raise UserError(f"examples must be >= 1, got {examples}")
        x, y = x[: int(examples)], y[: int(examples)]
    n = int(x.shape[0])
    report = {"eps": float(eps), "norm": norm, "seed": int(seed), "examples": n, "settings": merged, "seconds": {}}
    measures = merged["measures"]
    robust_measures = [m for m in measures if not m.endswith("_clean")]
    clean_measures = [m for m in measures if m.endswith("_clean")]
    start = time.time()
    rloss = {}
    for m in robust_measures:
        key = (merged[m]["steps"], merged[m]["step_size"], merged[m]["restarts"], merged[m]["batch_size"])
        if key not in rloss:
            rloss[key] = robust_loss(model, x, y, eps, merged[m]["step_size"], merged[m]["steps"],
                                     merged[m]["restarts"], norm, merged[m]["batch_size"], seed)
    clean_loss = None
    if clean_measures or not robust_measures:
        _ensure_built(model, x)
        with _weights_preserved(model):
            clean_loss = _LossEvaluator(model, 0.0, 0.0, 0, 1, norm, merged["batch_size"], seed, False).mean(x, y)
    report["seconds"]["reference_losses"] = time.time() - start
    report["robust_loss"] = next(iter(rloss.values())) if rloss else None
    report["clean_loss"] = clean_loss
    for m in measures:
        s = merged[m]
        start = time.time()
        if m == "average":
            key = (s["steps"], s["step_size"], s["restarts"], s["batch_size"])
            res = average_case_flatness(model, x, y, xi=s["xi"], samples=s["samples"], eps=eps,
                                        step_size=s["step_size"], steps=s["steps"], restarts=s["restarts"],
                                        norm=norm, seed=seed, batch_size=s["batch_size"],
                                        reference_loss=rloss[key], progress=progress)
        elif m == "average_clean":
            res = average_case_flatness(model, x, y, xi=s["xi"], samples=s["samples"], clean=True, norm=norm,
                                        seed=seed, batch_size=s["batch_size"], reference_loss=clean_loss,
                                        progress=progress)
        elif m == "worst":
            key = (s["steps"], s["step_size"], s["restarts"], s["batch_size"])
            res = worst_case_flatness(model, x, y, xi=s["xi"], attempts=s["attempts"], passes=s["passes"], eps=eps,
                                      step_size=s["step_size"], weight_step=s["weight_step"], steps=s["steps"],
                                      restarts=s["restarts"], norm=norm, seed=seed, batch_size=s["batch_size"],
                                      reference_loss=rloss[key], progress=progress)
        else:
            res = worst_case_flatness(model, x, y, xi=s["xi"], attempts=s["attempts"], passes=s["passes"],
                                      weight_step=s["weight_step"], clean=True, norm=norm, seed=seed,
                                      batch_size=s["batch_size"], reference_loss=clean_loss, progress=progress)
        report["seconds"][m] = time.time() - start
        report[m] = res
    return report


# ---------------------------------------------------------------------------
# Keras callback
# ---------------------------------------------------------------------------


class FlatnessMonitor(keras.callbacks.Callback):
    """Measures average-case robust flatness (Stutz et al., ICCV 2021, (F2)) during ``fit``.

    Every ``every`` epochs (after epochs ``every - 1``, ``2 * every - 1``,
    ...), on the held-out ``(x, y)`` (keep it small: a few hundred examples),
    it computes :func:`average_case_flatness` and

    * adds ``logs[key]`` (default ``"val_robust_flatness"``) and
      ``logs[key + "_rloss"]`` (``RLoss(w)``), so they appear in the
      ``History`` returned by ``fit`` and, when a ``keras.callbacks.TensorBoard``
      is listed *after* this callback, in its ``validation`` run as
      ``epoch_robust_flatness`` (Keras strips ``val_`` and adds ``epoch_``);
    * if ``log_dir`` is given, also writes the scalars
      ``epoch_robust_flatness`` and ``epoch_robust_loss`` with ``tf.summary``
      to ``log_dir/flatness`` (step = epoch), independent of callback order.

    Epochs without a measurement have no entry, so ``History`` lists are
    shorter than the number of epochs when ``every > 1``. The model's
    weights are restored bitwise after every measurement.
    """

    def __init__(self, x, y, every: int = 1, eps: float = DEFAULT_EPS, xi: float = 0.5, samples: int = 10,
                 step_size: Optional[float] = None, steps: int = DEFAULT_STEPS, restarts: int = 1,
                 norm: str = "linf", batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                 log_dir: Optional[str] = None, key: str = "val_robust_flatness", progress: bool = False):
        super().__init__()
        if int(every) < 1:
            raise UserError(f"every must be >= 1, got {every}")
        step_size = resolve_step_size(eps, step_size)
        _check_attack(eps, step_size, steps, restarts, norm)
        self.x, self.y = _as_data(x, y)
        self.every = int(every)
        self.settings = dict(eps=eps, xi=xi, samples=samples, step_size=step_size, steps=steps, restarts=restarts,
                             norm=norm, batch_size=batch_size, seed=seed)
        self.log_dir = log_dir
        self.key = key
        self.progress = progress
        self.results = []
        self._writer = None

    def _summary_writer(self):
        if self._writer is None and self.log_dir:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "flatness"))
        return self._writer

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every != 0:
            return
        res = average_case_flatness(self.model, self.x, self.y, progress=self.progress, **self.settings)
        res = {k: v for k, v in res.items() if k != "perturbations"}
        res["epoch"] = int(epoch)
        self.results.append(res)
        if logs is not None:
            logs[self.key] = res["flatness"]
            logs[self.key + "_rloss"] = res["loss"]
        writer = self._summary_writer()
        if writer is not None:
            with writer.as_default():
                tf.summary.scalar("epoch_robust_flatness", res["flatness"], step=int(epoch))
                tf.summary.scalar("epoch_robust_loss", res["loss"], step=int(epoch))
            writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
