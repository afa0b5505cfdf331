"""FAB, the fast adaptive boundary attack of Croce and Hein (ICML 2020), targeted (FAB-T) and untargeted.

Each iteration projects the current point and the original one onto the
linearised decision boundary intersected with the box [0, 1]^d
(:func:`box_hyperplane_projection`, solved exactly in float64), biased
towards the original point, with extrapolation (eta) and a backward step
(beta). See the package docstring of :mod:`tfrobust.autoattack` for the
differences from the reference.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfrobust import seeds
from tfrobust.attacks import per_example, per_example_norm, project
from tfrobust.autoattack.core import (
    LABEL_SPEC, SCALAR_SPEC, SEED_SPEC, TINY, check_eps, check_norm, check_positive_int,
    check_seed, check_targeted_args, compiled, flatten_examples, image_spec, input_gradient, onehot, predict_logits,
    predicted, rank_targets, sphere_start, survivors_of,
)
from tfrobust.errors import UserError
from tfrobust.seeds import attack_seed

_BIG = 1e200


def box_hyperplane_projection(t, w, b, norm):
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
    oh = onehot(y, logits)
    f = logits - tf.reduce_sum(logits * oh, axis=1, keepdims=True)
    g = jac - tf.reduce_sum(jac * oh[:, :, None], axis=1, keepdims=True)
    if norm == "linf":
        dual = tf.reduce_sum(tf.abs(g), axis=2)
    else:
        dual = tf.sqrt(tf.reduce_sum(tf.square(g), axis=2))
    dist = tf.where(oh > 0, tf.constant(np.inf, tf.float32), tf.abs(f) / (dual + TINY))
    j = tf.argmin(dist, axis=1, output_type=tf.int32)
    return tf.gather(f, j, batch_dims=1), tf.gather(g, j, batch_dims=1)


def _build_fab(call, norm, n_iter, alpha_max, eta, beta, targeted=True):
    def run(x, y, y_target, eps, seed, random_start):
        shape = tf.shape(x)
        batch = shape[0]
        x0 = flatten_examples(x)
        start = sphere_start(x, 0.5 * eps, norm, seed)
        x1 = tf.where(random_start, start, x)
        best = x
        best_norm = tf.fill([batch], tf.constant(1e10, tf.float32))

        def objective(logits):
            oh_t = onehot(y_target, logits)
            oh_y = onehot(y, logits)
            return tf.reduce_sum(logits * (oh_t - oh_y), axis=-1)

        def body(i, x1, best, best_norm):
            if targeted:
                _, f, g = input_gradient(call, x1, objective)
                w = flatten_examples(g)
            else:
                f, w = _closest_linearised_boundary(call, x1, y, norm)
            x1f = flatten_examples(x1)
            b = -f + tf.reduce_sum(w * x1f, axis=1)
            d = box_hyperplane_projection(tf.concat([x1f, x0], 0), tf.concat([w, w], 0),
                                          tf.concat([b, b], 0), norm)
            d1, d2 = d[:batch], d[batch:]
            a = tf.maximum(per_example_norm(d, norm), 1e-8)
            a1, a2 = a[:batch], a[batch:]
            alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
            x_new = tf.clip_by_value((x1f + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
            x_new = tf.reshape(x_new, shape)
            is_adv = tf.not_equal(predicted(call(x_new)), y)
            dist = per_example_norm(x_new - x, norm)
            better = tf.logical_and(is_adv, dist < best_norm)
            best = tf.where(per_example(better, x), x_new, best)
            best_norm = tf.where(better, dist, best_norm)
            x_new = tf.where(per_example(is_adv, x), x + beta * (x_new - x), x_new)
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
    return compiled(
        model,
        key,
        lambda call: tf.function(
            _build_fab(call, norm, int(n_iter), float(alpha_max), float(eta), float(beta), bool(targeted)),
            input_signature=[image_spec(shape), LABEL_SPEC, LABEL_SPEC, SCALAR_SPEC, SEED_SPEC,
                             tf.TensorSpec([], tf.bool)],
        ),
    )


def _fab_restarts(model_fn, survivors, run, eps, norm, n_restarts, seed_of, targets_of):
    """FAB restarts on the examples ``survivors`` still holds: broken where the closest point is within eps.

    ``seed_of(restart)`` gives the seed, ``targets_of(idx, ys)`` the target classes (the labels for untargeted FAB).
    Restart 0 starts at x, later ones at a random point at distance eps / 2.
    """
    eps_t = tf.constant(eps, tf.float32)

    def attempt(idx, xs, ys, restart):
        best, best_norm = run(xs, ys, targets_of(idx, ys), eps_t, seed_of(restart), tf.constant(restart > 0))
        best = project(best, xs, eps, norm)
        still = (predicted(predict_logits(model_fn, best)) == ys).numpy()
        return best.numpy(), np.logical_and(best_norm.numpy() <= eps, np.logical_not(still))

    survivors.restarts(n_restarts, attempt)


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
    norm, eps, n_iter, n_target_classes, n_restarts, seed = check_targeted_args(
        norm, eps, n_iter, n_target_classes, n_restarts, seed)
    x, survivors = survivors_of(model_fn, x, y)
    if survivors is None:
        return x
    if survivors.classes < 2:
        raise UserError("FAB-T needs at least 2 classes")
    run = _fab_fn(model_fn, x.shape, norm, n_iter, alpha_max, eta, beta)
    for rank in range(2, min(n_target_classes, survivors.classes - 1) + 2):
        _fab_restarts(model_fn, survivors, run, eps, norm, n_restarts,
                      lambda restart: attack_seed(seed, seeds.FAB_TARGETED, rank, restart),
                      lambda idx, ys: rank_targets(tf.gather(survivors.clean_logits, idx), rank))
    return survivors.result()


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
    norm, eps = check_norm(norm), check_eps(eps)
    n_iter = check_positive_int("n_iter", n_iter)
    n_restarts = check_positive_int("n_restarts", n_restarts, 0)
    seed = check_seed(seed)
    x, survivors = survivors_of(model_fn, x, y)
    if survivors is None:
        return x
    if survivors.classes < 2:
        raise UserError("FAB needs at least 2 classes")
    run = _fab_fn(model_fn, x.shape, norm, n_iter, alpha_max, eta, beta, targeted=False)
    _fab_restarts(model_fn, survivors, run, eps, norm, n_restarts,
                  lambda restart: attack_seed(seed, seeds.FAB, restart), lambda idx, ys: ys)
    return survivors.result()


__all__ = ["box_hyperplane_projection", "fab", "fab_targeted"]
