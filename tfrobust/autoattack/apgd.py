"""APGD (Auto-PGD) of Croce and Hein (ICML 2020): APGD-CE, APGD-DLR and APGD-T, with EOT for randomised models.

:func:`apgd` runs APGD on the cross-entropy, the difference of logits ratio
(DLR) or the targeted DLR loss; :func:`apgd_targeted` is APGD-T (the targeted
DLR loss for the classes ranked 2, 3, ... at the clean point). ``eot_iter`` > 1
averages that many forward/backward passes per iteration (Expectation over
Transformation; AutoAttack's "rand" version). See the package docstring of
:mod:`tfrobust.autoattack` for the differences from the reference.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfrobust import seeds
from tfrobust.attacks import cross_entropy, per_example, project
from tfrobust.autoattack.core import (
    LABEL_SPEC, SCALAR_SPEC, SEED_SPEC, check_eps, check_norm, check_positive_int, check_seed,
    check_targeted_args, compiled, dlr_loss, dlr_targeted_loss, eot_input_gradient, flatten_examples, image_spec,
    normalize, predicted, rank_targets, sphere_start, survivors_of, warn_zero_gradients,
)
from tfrobust.errors import UserError, unknown_choice
from tfrobust.seeds import attack_seed

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


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
            return lambda logits: cross_entropy(logits, y)
        if loss == "dlr":
            return lambda logits: dlr_loss(logits, y)
        return lambda logits: dlr_targeted_loss(logits, y, y_target)

    def run(x, y, y_target, eps, seed):
        objective = objective_for(y, y_target)
        batch = tf.shape(x)[0]
        x_adv = sphere_start(x, eps, norm, seed)
        logits, loss0, grad = eot_input_gradient(call, x_adv, objective, eot_iter)
        zero_grad = tf.reduce_sum(tf.cast(tf.reduce_all(tf.equal(flatten_examples(grad), 0.0), axis=1), tf.int32))
        acc = tf.equal(predicted(logits), y)
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
                direction = normalize(grad, "l2")
            z = project(x_adv + per_example(step, x) * direction, x, eps, norm)
            x_adv = project(x_adv + (z - x_adv) * momentum + grad2 * (1.0 - momentum), x, eps, norm)

            logits, loss_i, grad = eot_input_gradient(call, x_adv, objective, eot_iter)
            correct = tf.equal(predicted(logits), y)
            acc = tf.logical_and(acc, correct)
            x_best_adv = tf.where(per_example(tf.logical_not(correct), x), x_adv, x_best_adv)

            improved = loss_i > loss_best
            x_best = tf.where(per_example(improved, x), x_adv, x_best)
            grad_best = tf.where(per_example(improved, x), grad, grad_best)
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
            x_adv = tf.where(per_example(reduce, x), x_best, x_adv)
            grad = tf.where(per_example(reduce, x), grad_best, grad)
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
    return compiled(
        model,
        key,
        lambda call: tf.function(
            _build_apgd(call, norm, loss, int(n_iter), float(rho), bool(quirks), int(eot_iter)),
            input_signature=[image_spec(shape), LABEL_SPEC, LABEL_SPEC, SCALAR_SPEC, SEED_SPEC],
        ),
    )


def _apgd_restarts(model, survivors, eps, norm, loss, n_iter, n_restarts, rho, seed, attack, rank, quirks,
                   eot_iter=1):
    """Runs APGD restarts on the examples ``survivors`` still holds; returns the most all-zero gradients seen."""
    run = _apgd_fn(model, survivors.x.shape, norm, loss, n_iter, rho, quirks, eot_iter)
    zero_grad = 0

    def attempt(idx, xs, ys, restart):
        nonlocal zero_grad
        targets = rank_targets(tf.gather(survivors.clean_logits, idx), rank) if loss == "dlr-targeted" else ys
        x_found, acc_run, zeros = run(xs, ys, targets, tf.constant(eps, tf.float32),
                                      attack_seed(seed, attack, rank or 0, restart))
        zero_grad = max(zero_grad, int(zeros))
        return x_found.numpy(), np.logical_not(acc_run.numpy())

    survivors.restarts(n_restarts, attempt)
    return zero_grad


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
    norm = check_norm(norm)
    eps = check_eps(eps)
    if loss not in APGD_LOSSES:
        raise unknown_choice("APGD loss", loss, APGD_LOSSES)
    n_iter = check_positive_int("n_iter", n_iter)
    n_restarts = check_positive_int("n_restarts", n_restarts, 0)
    seed = check_seed(seed)
    if not (isinstance(rho, (int, float)) and 0 < rho <= 1):
        raise UserError(f"rho must be in (0, 1], got {rho!r}")
    eot_iter = check_positive_int("eot_iter", eot_iter)
    x, survivors = survivors_of(model_fn, x, y, passes=eot_iter)
    if survivors is None:
        return x
    classes = survivors.classes
    rank = None
    if loss == "dlr" and classes < 3:
        raise UserError(f"the DLR loss needs at least 3 classes, the model has {classes}")
    if loss == "dlr-targeted":
        if classes < 4:
            raise UserError(f"the targeted DLR loss needs at least 4 classes, the model has {classes}")
        if target_class_rank is None:
            raise UserError("loss='dlr-targeted' needs target_class_rank (2..C)")
        rank = check_positive_int("target_class_rank", target_class_rank, 2)
        if rank > classes:
            raise UserError(f"target_class_rank must be in 2..{classes}, got {rank}")
    zeros = _apgd_restarts(model_fn, survivors, eps, norm, loss, n_iter, n_restarts, float(rho), seed, seeds.APGD,
                           rank, reference_quirks, eot_iter)
    warn_zero_gradients(zeros, f"APGD-{loss}")
    return survivors.result()


def apgd_targeted(model_fn, x, y, eps, norm="linf", n_iter=100, n_target_classes=9, seed=0, *,
                  n_restarts=1, rho=0.75, eot_iter=1, reference_quirks=False):
    """APGD-T (Croce & Hein, ICML 2020): APGD on the targeted DLR loss.

    For target ranks 2, 3, ..., ``n_target_classes + 1`` in turn, APGD on
    the targeted DLR loss runs on the examples still correctly
    classified, the target being the class with that rank among the clean
    logits. ``n_target_classes`` is capped at C - 1; the model needs at least
    4 classes. Other arguments and the return value are as in :func:`apgd`.
    """
    norm, eps, n_iter, n_target_classes, n_restarts, seed = check_targeted_args(
        norm, eps, n_iter, n_target_classes, n_restarts, seed)
    eot_iter = check_positive_int("eot_iter", eot_iter)
    x, survivors = survivors_of(model_fn, x, y, passes=eot_iter)
    if survivors is None:
        return x
    classes = survivors.classes
    if classes < 4:
        raise UserError(f"APGD-T (targeted DLR loss) needs at least 4 classes, the model has {classes}")
    zeros = 0
    for rank in range(2, min(n_target_classes, classes - 1) + 2):
        zeros = max(zeros, _apgd_restarts(model_fn, survivors, eps, norm, "dlr-targeted", n_iter, n_restarts,
                                          float(rho), seed, seeds.APGD_TARGETED, rank, reference_quirks, eot_iter))
    warn_zero_gradients(zeros, "APGD-T")
    return survivors.result()


__all__ = ["APGD_LOSSES", "apgd", "apgd_targeted"]
