"""Average-case (F2) and worst-case (F3) flatness of Stutz et al. (ICCV 2021), robust and clean.

  - :func:`average_case_flatness`: ``E_nu[L(w + nu)] - L(w)``, ``nu`` on the
    per-layer sphere of radius ``xi ||w_l||``.
  - :func:`worst_case_flatness`: ``max_{nu in B_xi(w)} max_delta L(w + nu) -
    RLoss(w)``, one ``nu`` for the whole set optimised jointly with the
    per-example ``delta`` (:class:`JointWeightInputAttack`).

Weight-space sampling, projection and the restore of the weights come from
:mod:`tfrobust.weight_space`; the losses from :mod:`tfrobust.flatness.loss`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf

from tfrobust import seeds
from tfrobust import weight_space as ws
from tfrobust.attacks import cross_entropy, project, random_start
from tfrobust.flatness.loss import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPS,
    DEFAULT_STEPS,
    RobustLossEvaluator,
    batch_bounds,
    batch_mean_of,
    batch_spec,
    check_attack_settings,
    compiled,
    evaluation_data,
    progress_bar,
    resolve_step_size,
)
from tfrobust.flatness.settings import check_average_case, check_worst_case

__all__ = ["average_case_flatness", "worst_case_flatness", "JointWeightInputAttack"]


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


# ---------------------------------------------------------------------------
# Average case
# ---------------------------------------------------------------------------


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
    ||w_l||_2`` (:func:`tfrobust.weight_space.sample_sphere_perturbation`);
    for every sample a fresh PGD attack is run on the perturbed model. ``L``
    is the robust loss ``RLoss`` (F1) by default, the clean cross-entropy when
    ``clean=True`` (``delta = 0``; the reference then uses 50 samples), or, in
    general, any ``loss_fn(model, x_batch, y_batch) -> scalar`` that returns
    the batch mean of a loss at the model's current weights (it is called per
    batch and averaged with batch-size weights).

    Reference defaults: xi = 0.5, 10 samples, PGD-20 with step 0.007 at eps
    8/255, 1000 test examples (``step_size=None``:
    :func:`tfrobust.flatness.resolve_step_size`). ``restarts`` applies to
    ``L(w)`` and to every ``L(w + nu)`` alike (see
    :func:`tfrobust.flatness.robust_loss`). ``reference_loss`` skips the
    computation of ``L(w)`` and uses the value given.

    Returns a dict with ``flatness``, ``loss`` (``L(w)``), ``perturbed_loss``
    (the mean over samples), ``perturbed_losses``, ``std_error`` (of the
    mean), the settings, the perturbed ``variables`` (paths) and, with
    ``return_perturbations=True``, ``perturbations`` (one list of arrays per
    sample). The model's variables are restored bitwise.
    """
    step_size = resolve_step_size(eps, step_size)
    check_attack_settings(eps, step_size, steps, restarts, norm)
    check_average_case(xi, samples)
    x, y = evaluation_data(x, y)
    variables = ws.built_perturbable_variables(model, x)
    n = int(x.shape[0])
    perturbations = []
    with ws.weights_preserved(model):
        base = ws.snapshot(variables)
        if loss_fn is not None:
            def measure():
                return batch_mean_of(loss_fn, model, x, y, batch_size)
        else:
            evaluator = RobustLossEvaluator(model, eps, step_size, steps, restarts, norm, batch_size, seed, not clean,
                                            jit)

            def measure():
                return evaluator.mean(x, y)

        loss = float(reference_loss) if reference_loss is not None else measure()
        losses = []
        bar = progress_bar(int(samples), "average-case flatness", progress)
        try:
            for i in range(int(samples)):
                nu = ws.sample_sphere_perturbation(base, xi, seed, i)
                ws.assign_offset(variables, base, nu)
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
# Worst case
# ---------------------------------------------------------------------------


def _normalised_input_step(grad, norm):
    if norm == "linf":
        return tf.sign(grad)
    flat = tf.reshape(grad, [tf.shape(grad)[0], -1])
    n = tf.norm(flat, axis=1)
    n = tf.reshape(n, [-1] + [1] * (len(grad.shape) - 1))
    return grad / tf.maximum(n, 1e-12)


class JointWeightInputAttack:
    """One step of the worst-case attack on a batch (Stutz et al., ICCV 2021, (F3)).

    At the current ``(nu, x')`` it computes the gradients of the batch-mean
    CE (or of ``loss_fn(model, x', y)``), then moves ``x' <- Proj(x' +
    step_size * sign(g_x))`` (skipped for the clean measure and for
    ``loss_fn``) and ``nu_l <- Proj_{xi ||w_l||}(nu_l + weight_step * ||w_l|| *
    g_l / ||g_l||)`` (:func:`tfrobust.weight_space.relative_gradient_step`,
    :func:`tfrobust.weight_space.project_layer`). The variables are left at
    ``w + nu``; the caller restores them.
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
        xs = batch_spec(x)
        ys = tf.TensorSpec([None], tf.int32)
        wspec = [tf.TensorSpec(w.shape, w.dtype) for w in base]
        scalars = [tf.TensorSpec([], tf.float32) for _ in base]
        self._step_compiled = compiled(self._step_fn, [xs, ys, xs, wspec, wspec, scalars, scalars])
        self._final_compiled = compiled(self._final_fn, [xs, ys, wspec, wspec])

    def step(self, x, y, x_adv, base, nus, radii, norms):
        """Returns the moved ``(x', nu, loss)`` of one batch; ``radii`` are ``xi ||w_l||``, ``norms`` ``||w_l||``."""
        self._compile(x, base)
        return self._step_compiled(x, y, x_adv, base, list(nus), radii, norms)

    def _step_fn(self, x, y, x_adv, base, nus, radii, norms):
        ws.assign_offset(self.variables, base, nus)
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
            moved = tf.cast(nu, tf.float32) + ws.relative_gradient_step(g, w_norm, self.weight_step)
            new.append(tf.cast(ws.project_layer(moved, radius), nu.dtype))
        return x_new, new, value

    def _final_fn(self, x_adv, y, base, nus):
        ws.assign_offset(self.variables, base, nus)
        return cross_entropy(self.model(x_adv, training=False), y)

    def final_sum(self, x_adv, y, base, nus):
        """The summed loss of the batch at ``(w + nu, x')``."""
        if self.loss_fn is not None:
            ws.assign_offset(self.variables, base, nus)
            return float(self.loss_fn(self.model, x_adv, y)) * int(x_adv.shape[0])
        self._compile(x_adv, base)
        return float(tf.reduce_sum(tf.cast(self._final_compiled(x_adv, y, base, list(nus)), tf.float64)).numpy())


def _unperturbed_loss(model, x, y, reference_loss, loss_fn, eps, step_size, steps, restarts, norm, batch_size, seed,
                      robust, jit) -> float:
    """``RLoss(w)``, the term worst-case flatness subtracts: given, the custom loss, or PGD's (clean CE)."""
    if reference_loss is not None:
        return float(reference_loss)
    if loss_fn is not None:
        return batch_mean_of(loss_fn, model, x, y, batch_size)
    evaluator = RobustLossEvaluator(model, eps, step_size, steps, restarts, norm, batch_size, seed, robust, jit)
    return evaluator.mean(x, y)


def _attempt_starts(x, batches, eps, norm, seed, attempt, robust) -> list:
    """Each batch's start of ``delta`` for one worst-case attempt: uniform in the eps-ball, or ``x`` (clean)."""
    starts = []
    for b, (lo, hi) in enumerate(batches):
        xb = x[lo:hi]
        if robust:
            start_seed = seeds.flatness_seed(seed, seeds.STREAM_WORST_DELTA, attempt, b)
            start = random_start(xb, float(eps), norm, "uniform", start_seed)
            starts.append(project(start, xb, float(eps), norm))
        else:
            starts.append(xb)
    return starts


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
    :class:`JointWeightInputAttack`): ``delta`` by ``step_size * sign(grad)``
    with projection onto the eps-ball and [0, 1], ``nu_l`` by the per-layer
    normalised gradient ``weight_step * ||w_l|| * g_l / ||g_l||`` followed by
    projection onto ``||nu_l|| <= xi * ||w_l||``. Start: ``nu`` from
    :func:`tfrobust.weight_space.sample_ball_perturbation`, ``delta`` uniform
    in the eps-ball. The loss of an attempt is the mean CE at the final
    ``(nu, delta)``; the result keeps the maximum over ``attempts``.
    ``clean=True`` fixes ``delta = 0``. ``loss_fn(model, x_batch, y_batch)``
    replaces the batch-mean CE by any differentiable loss (``delta`` is then
    not optimised).

    ``RLoss(w)`` (the subtracted term) is computed with PGD-``steps`` as in
    :func:`tfrobust.flatness.robust_loss` (clean CE when ``clean=True``);
    ``reference_loss`` uses the value given instead. ``step_size=None``: see
    :func:`tfrobust.flatness.resolve_step_size`.

    Reference defaults: xi = 0.00075, 10 attempts, 20 passes, step 0.007,
    weight step 0.01, eps 8/255, 1000 test examples.

    Returns a dict with ``flatness``, ``loss``, ``perturbed_loss`` (the max
    over attempts), ``perturbed_losses`` (per attempt), ``best_attempt``, the
    settings and, with ``return_perturbations=True``, ``perturbations`` (the
    final ``nu`` of every attempt as lists of arrays). The model's variables
    are restored bitwise.
    """
    step_size = resolve_step_size(eps, step_size)
    check_attack_settings(eps, step_size, steps, restarts, norm)
    check_worst_case(xi, attempts, passes, weight_step)
    x, y = evaluation_data(x, y)
    variables = ws.built_perturbable_variables(model, x)
    n = int(x.shape[0])
    robust = loss_fn is None and not clean
    batches = batch_bounds(n, batch_size)
    losses, perturbations = [], []
    with ws.weights_preserved(model):
        base = ws.snapshot(variables)
        norms = [ws.l2_norm(w) for w in base]
        radii = [tf.cast(xi, tf.float32) * w_norm for w_norm in norms]
        loss = _unperturbed_loss(model, x, y, reference_loss, loss_fn, eps, step_size, steps, restarts, norm,
                                 batch_size, seed, robust, jit)
        attack = JointWeightInputAttack(model, variables, eps, step_size, weight_step, norm, robust, jit, loss_fn)
        bar = progress_bar(int(attempts) * int(passes), "worst-case flatness", progress)
        try:
            for a in range(int(attempts)):
                nus = ws.sample_ball_perturbation(base, xi, seed, a)
                x_adv = _attempt_starts(x, batches, eps, norm, seed, a, robust)
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
