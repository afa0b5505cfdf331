"""Input-space attacks and their losses, as pure TensorFlow functions.

Every attack takes a ``model_fn`` (any callable mapping float32 NHWC images in
[0, 1] to logits), clean inputs ``x`` and integer labels ``y``, and returns
adversarial inputs inside the eps-ball around ``x`` and inside [0, 1]. An
attack never changes a model variable: it reads the model only through
``model_fn``. All functions work eagerly and inside ``tf.function``.

:class:`AttackRunner` (and its one-call form :func:`attack_batches`) runs any
such attack over a data set in batches, compiled once per input shape, with a
seed per batch and restart from :mod:`tfrobust.seeds`, and returns a
per-example measure (correct predictions by default, or losses, or the
adversarial examples). Evaluation, the integrity probes, the TensorBoard
image grid and the robust loss of the flatness measures and landscapes
(restarts, each with its own seed, and the worst per-example loss) run their
attacks through it.
:func:`random_start` is the one random start of PGD, in training (where it
draws for the global batch and slices per replica) and in evaluation.

Threat model and defaults follow docs/algorithms.md, section 1:
PGD (Madry et al., ICLR 2018, eq. 2 and section 2.1): a random start, then
``steps`` projected steps along the sign of the gradient (L-inf) or its
normalised direction (L2).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfrobust.attack_names import MAX_STEPS
from tfrobust.errors import check_int, check_number, check_steps, unknown_choice

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw", "trades_kl")
STARTS = ("uniform", "gaussian", "none")


def cross_entropy(logits, y):
    """Per-example softmax cross-entropy ``CE(f(x), y)``."""
    logits = tf.cast(logits, tf.float32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)


def smoothed_cross_entropy(logits, y, smoothing: float):
    """Per-example label-smoothed cross-entropy ``(1 - s) CE(f(x), y) + s mean_k(-log p_k(x))``.

    The target puts ``1 - s + s/K`` on the label and ``s/K`` on every class;
    ``s = 0`` is :func:`cross_entropy`.
    """
    logits = tf.cast(logits, tf.float32)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    nll = -tf.gather(log_p, tf.cast(y, tf.int32), axis=-1, batch_dims=1)
    return (1.0 - smoothing) * nll + smoothing * (-tf.reduce_mean(log_p, axis=-1))


def margin(logits, y):
    """Per-example margin ``z_y - max_{k != y} z_k``: positive where ``y`` is predicted, negative where not."""
    logits = tf.cast(logits, tf.float32)
    onehot = tf.one_hot(tf.cast(y, tf.int32), tf.shape(logits)[-1], dtype=tf.float32)
    true = tf.reduce_sum(logits * onehot, axis=-1)
    other = tf.reduce_max(tf.where(onehot > 0, tf.constant(-float("inf"), tf.float32), logits), axis=-1)
    return true - other


def cw_margin(logits, y):
    """Per-example Carlini-Wagner margin ``max_{k != y} z_k - z_y`` (Carlini & Wagner 2017, eq. f6): ``-margin``."""
    return -margin(logits, y)


def kl_divergence(p_logits, q_logits):
    """Per-example ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` from logits.

    This is the TRADES/MART term (PyTorch ``KLDivLoss(reduction="sum")`` per
    example), computed from log-softmax so that it is exact and finite.
    """
    log_p = tf.nn.log_softmax(tf.cast(p_logits, tf.float32), axis=-1)
    log_q = tf.nn.log_softmax(tf.cast(q_logits, tf.float32), axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def kl_from_probabilities(p, q_logits):
    """Per-example ``KL(p || softmax(q_logits))`` for a target distribution ``p``.

    Terms with ``p_c = 0`` contribute zero (the convention ``0 log 0 = 0``).
    """
    p = tf.cast(p, tf.float32)
    log_q = tf.nn.log_softmax(tf.cast(q_logits, tf.float32), axis=-1)
    safe = tf.where(p > 0, p, tf.ones_like(p))
    return tf.reduce_sum(tf.where(p > 0, p * (tf.math.log(safe) - log_q), tf.zeros_like(p)), axis=-1)


def per_example_norm(t, norm="linf"):
    """Per-example L-inf or L2 norm of a batch ``t`` (N, ...), shape (N,)."""
    flat = tf.reshape(t, [tf.shape(t)[0], -1])
    if norm == "l2":
        return tf.norm(flat, axis=1)
    return tf.reduce_max(tf.abs(flat), axis=1)


def per_example(v, x):
    """Reshapes a per-example vector ``v`` (N,) to broadcast against the batch ``x`` (N, ...)."""
    return tf.reshape(v, [-1] + [1] * (len(x.shape) - 1))


def project(x_adv, x, eps, norm="linf"):
    """Projects ``x_adv`` onto the eps-ball around ``x`` and then onto [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        n = per_example(per_example_norm(delta, "l2"), delta)
        delta = delta * tf.minimum(1.0, eps / tf.maximum(n, 1e-12))
    return tf.clip_by_value(x + delta, 0.0, 1.0)


def _check(norm, loss, start, eps):
    if norm not in NORMS:
        raise unknown_choice("norm", norm, NORMS)
    if loss not in LOSSES:
        raise unknown_choice("attack loss", loss, LOSSES)
    if start not in STARTS:
        raise unknown_choice("random start", start, STARTS)
    if isinstance(eps, (int, float)):
        check_number("eps", eps)


def _random(kind, shape, seed, dtype=tf.float32):
    """Uniform [-1, 1) or standard normal noise; stateless when ``seed`` is given."""
    if seed is None:
        if kind == "uniform":
            return tf.random.uniform(shape, -1.0, 1.0, dtype=dtype)
        return tf.random.normal(shape, dtype=dtype)
    seed = tf.cast(seed, tf.int32) if not isinstance(seed, int) else tf.constant([seed, 0], tf.int32)
    if kind == "uniform":
        return tf.random.stateless_uniform(shape, seed, -1.0, 1.0, dtype=dtype)
    return tf.random.stateless_normal(shape, seed, dtype=dtype)


def _global_batch_noise(kind, shape, seed):
    """Noise of ``shape`` for this replica's slice of the global batch.

    Inside ``strategy.run`` the noise is drawn for the whole global batch from
    one seed on every replica, and each replica takes its own contiguous
    slice, so that a step on N replicas sees exactly the noise of the same
    step on one device. Elsewhere it is drawn for ``shape`` itself.
    """
    ctx = tf.distribute.get_replica_context()
    n = ctx.num_replicas_in_sync if ctx is not None else 1
    if n == 1:
        return _random(kind, shape, seed)
    local = shape[0]
    noise = _random(kind, tf.concat([[local * n], shape[1:]], axis=0), seed)
    replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return noise[replica * local : (replica + 1) * local]


def random_start(x, eps, norm="linf", kind="uniform", seed=None):
    """The starting point of PGD, the same on any number of replicas.

    ``uniform``: x + U(-eps, eps) for L-inf (Madry et al.); for L2 a point
    uniformly distributed in the L2 ball (a Gaussian direction and the radius
    eps u^(1/d)). ``gaussian``: x + 0.001 N(0, 1) (the TRADES and MART
    references). ``gaussian_unclipped``: the same, not clipped to [0, 1] (the
    reference code's start, docs/algorithms.md, section 9, item 1).
    ``none``: x. All but ``gaussian_unclipped`` are clipped to [0, 1].

    ``seed``: None (stateful random), a Python int ``s`` (noise from seed
    ``[s, 0]``, the L2 radius from ``[s, 1]``) or a shape-[2] int tensor ``t``
    (``t`` and ``t + 1``). Inside ``strategy.run`` the noise is drawn for the
    global batch and sliced per replica (a step on N replicas starts where the
    same step on one device starts).
    """
    if kind == "none":
        return x
    shape = tf.shape(x)
    if kind in ("gaussian", "gaussian_unclipped"):
        start = x + 0.001 * _global_batch_noise("normal", shape, seed)
        return start if kind == "gaussian_unclipped" else tf.clip_by_value(start, 0.0, 1.0)
    if norm == "linf":
        return tf.clip_by_value(x + eps * _global_batch_noise("uniform", shape, seed), 0.0, 1.0)
    direction = _global_batch_noise("normal", shape, seed)
    direction = direction / tf.maximum(per_example(per_example_norm(direction, "l2"), x), 1e-12)
    dims = tf.cast(tf.reduce_prod(shape[1:]), tf.float32)
    if seed is None:
        r_seed = None
    else:
        r_seed = tf.constant([seed, 1]) if isinstance(seed, int) else tf.cast(seed, tf.int32) + 1
    u = (tf.reshape(_global_batch_noise("uniform", shape[:1], r_seed), [-1]) + 1.0) / 2.0
    radius = per_example(eps * tf.pow(u, 1.0 / dims), x)
    return tf.clip_by_value(x + direction * radius, 0.0, 1.0)


def attack_loss(kind, logits, y, clean_logits=None):
    """Per-example loss that the attack maximises."""
    if kind == "ce":
        return cross_entropy(logits, y)
    if kind == "cw":
        return cw_margin(logits, y)
    return kl_divergence(tf.stop_gradient(clean_logits), logits)


def pgd(
    model_fn: Callable,
    x,
    y,
    eps,
    step_size,
    steps: int,
    norm: str = "linf",
    loss: str = "ce",
    random_start_kind: str = "uniform",
    seed=None,
    clean_logits=None,
    x_init=None,
    gradient_scale: float = 1.0,
    project_start: bool = True,
):
    """Projected gradient ascent on a per-example loss (Madry et al. 2018, eq. 2).

    Args:
      model_fn: maps images in [0, 1] to logits.
      x, y: clean images (NHWC, float32 in [0, 1]) and integer labels.
      eps: the radius of the ball (L-inf or L2).
      step_size: the step (L-inf: per pixel; L2: Euclidean length).
      steps: number of ascent steps (a Python int).
      norm: "linf" or "l2".
      loss: "ce" (cross-entropy), "cw" (CW margin) or "trades_kl"
        (``KL(p(x) || p(x'))``, TRADES eq. 5 inner problem).
      random_start_kind: "uniform", "gaussian" (0.001 N(0,1)) or "none".
      seed: None (stateful random) or an int / shape-[2] int tensor for
        stateless, reproducible noise.
      clean_logits: logits at ``x``, used by ``trades_kl`` (computed if None).
      x_init: a starting point that replaces the random start (projected
        onto the ball); the trainer passes one drawn for the global batch.
      gradient_scale: the loss is multiplied by this before differentiation
        (the step uses only the gradient's sign or direction, so the scale
        cancels); a large value keeps float16 gradients from underflowing.
        Non-finite gradient entries count as zero.
      project_start: False takes the first gradient at ``x_init`` as given,
        even outside [0, 1] (the reference code's unclipped Gaussian start);
        every step is projected either way.

    Returns:
      Adversarial images ``x'`` with ``||x' - x|| <= eps`` and ``x'`` in [0, 1].
    """
    _check(norm, loss, random_start_kind, eps)
    steps = check_steps("steps", steps, maximum=MAX_STEPS)
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y)
    eps = tf.cast(eps, tf.float32)
    step_size = tf.cast(step_size, tf.float32)
    if loss == "trades_kl" and clean_logits is None:
        clean_logits = model_fn(x)
    if x_init is None:
        x_init = random_start(x, eps, norm, random_start_kind, seed)
    x_adv = tf.convert_to_tensor(x_init, tf.float32)
    if project_start or int(steps) == 0:
        x_adv = project(x_adv, x, eps, norm)

    def step(x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            value = tf.reduce_sum(attack_loss(loss, model_fn(x_adv), y, clean_logits)) * gradient_scale
        grad = tf.cast(tape.gradient(value, x_adv, unconnected_gradients=tf.UnconnectedGradients.ZERO), tf.float32)
        if gradient_scale != 1.0:
            grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
        if norm == "linf":
            x_new = x_adv + step_size * tf.sign(grad)
        else:
            x_new = x_adv + step_size * grad / tf.maximum(per_example(per_example_norm(grad, "l2"), grad), 1e-12)
        return project(tf.stop_gradient(x_new), x, eps, norm)

    for _ in range(int(steps)):
        x_adv = step(x_adv)
    return tf.stop_gradient(x_adv)


def uniform_noise(shape, seed):
    """Noise U(-1, 1) of ``shape`` from a stateless seed, drawn for the global batch and sliced per replica."""
    return _global_batch_noise("uniform", shape, seed)


def single_step(model_fn: Callable, x, y, eps, step_size, x_init, project_to_ball: bool = True,
                gradient_scale: float = 1.0):
    """One signed gradient step on the cross-entropy from ``x_init`` (L-inf), the single-step training attacks.

    ``x' = clip(x_init + step_size * sign(grad CE(x_init)))``: with
    ``project_to_ball`` the step is projected onto the eps-ball around ``x``
    and then onto [0, 1] (FGSM, FGSM-RS; Wong et al. 2020); without, onto
    [0, 1] only (N-FGSM; de Jorge et al. 2022), so that ``x'`` may lie up to
    ``noise + step_size`` from ``x``. ``x_init`` is taken as given (the
    random starts of :func:`random_start` are already in [0, 1]).
    """
    x = tf.convert_to_tensor(x, tf.float32)
    x_init = tf.convert_to_tensor(x_init, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x_init)
        value = tf.reduce_sum(cross_entropy(model_fn(x_init), y)) * gradient_scale
    grad = tf.cast(tape.gradient(value, x_init, unconnected_gradients=tf.UnconnectedGradients.ZERO), tf.float32)
    if gradient_scale != 1.0:
        grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
    x_new = tf.stop_gradient(x_init + tf.cast(step_size, tf.float32) * tf.sign(grad))
    if project_to_ball:
        return project(x_new, x, tf.cast(eps, tf.float32), "linf")
    return tf.clip_by_value(x_new, 0.0, 1.0)


def fgsm(model_fn: Callable, x, y, eps, norm: str = "linf"):
    """Fast gradient (sign) method (Goodfellow et al., ICLR 2015, eq. 3): one step of size eps from x."""
    return pgd(model_fn, x, y, eps, eps, 1, norm=norm, loss="ce", random_start_kind="none")


def correct_predictions(model_fn, x_adv, x, y):
    """``(correct, finite)`` per example at ``x_adv``: a non-finite output never counts as correct.

    (An argmax over NaN reads as class 0.) The default measure of :class:`AttackRunner`.
    """
    logits = tf.cast(model_fn(x_adv), tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(logits), axis=-1)
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32)) & finite
    return correct, finite


class AttackRunner:
    """One attack run over data in batches, compiled once (per input shape) and reusable.

    Args:
      model_fn: maps images in [0, 1] to logits.
      attack: ``attack(model_fn, x, y, seed) -> x_adv`` on one batch; ``seed``
        is what ``seeds`` gives for the batch (a Python int or an int tensor
        of shape [2], see :mod:`tfrobust.seeds`).
      measure: ``measure(model_fn, x_adv, x, y)`` -> a per-example tensor or a
        tuple of them (default :func:`correct_predictions`); return ``x_adv``
        to get the adversarial examples themselves.
      jit: True traces ``measure(attack(...))`` into one ``tf.function``
        (``reduce_retracing``: batches of one shape share a trace); False runs
        it eagerly (for attacks that cannot be traced, such as AutoAttack's).
    """

    def __init__(self, model_fn: Callable, attack: Callable, measure: Optional[Callable] = None, jit: bool = True):
        measure = measure or correct_predictions

        def run(x, y, seed):
            return measure(model_fn, attack(model_fn, x, y, seed), x, y)

        # functools.partial: TensorFlow's retracing warning groups functions by code object, and every runner
        # traces its own closure once.
        self._run = tf.function(functools.partial(run), reduce_retracing=True) if jit else run

    def __call__(self, x, y, batch_size: int, seeds: Optional[Callable] = None, restarts: int = 1,
                 combine: Callable = None, desc: Optional[str] = None):
        """Runs the attack on ``x[i : i + batch_size]`` for each batch and restart; returns numpy arrays.

        Args:
          x, y: images in [0, 1] and integer labels (numpy arrays or tensors).
          batch_size: examples per call.
          seeds: ``seeds(batch_index, restart)`` -> the batch's seed (default:
            ``seeds.batch_seed(0, batch_index)`` for restart 0).
          restarts: runs per batch, each with its own seed; the per-example
            results are combined with ``combine`` (default ``np.maximum``:
            the worst case of a loss the attack maximises).
          desc: show a progress bar over the batches with this label.

        Returns:
          The per-example measure over all of ``x`` (a tuple where the measure returns one).
        """
        from tqdm.auto import tqdm

        from tfrobust.seeds import batch_seed

        check_int("batch_size", batch_size)
        check_int("restarts", restarts)
        seeds = seeds or (lambda b, r: batch_seed(0, b))
        combine = combine or np.maximum
        n = int(x.shape[0])
        parts = []
        starts = range(0, n, batch_size)
        for b, i in enumerate(tqdm(starts, desc=desc, disable=desc is None, leave=False)):
            xb = tf.convert_to_tensor(x[i : i + batch_size], tf.float32)
            yb = tf.convert_to_tensor(y[i : i + batch_size], tf.int32)
            best = None
            for r in range(restarts):
                out = self._run(xb, yb, seeds(b, r))
                out = tuple(t.numpy() for t in out) if isinstance(out, (tuple, list)) else (out.numpy(),)
                best = out if best is None else tuple(combine(p, q) for p, q in zip(best, out))
            parts.append(best)
        merged = tuple(np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))) if parts else ()
        return merged if len(merged) != 1 else merged[0]


def attack_batches(model_fn: Callable, x, y, attack: Callable, *, batch_size: int, seeds: Optional[Callable] = None,
                   restarts: int = 1, measure: Optional[Callable] = None, jit: bool = True, desc: Optional[str] = None):
    """``AttackRunner(model_fn, attack, measure, jit)(x, y, batch_size, seeds, restarts, desc=desc)``: see there."""
    return AttackRunner(model_fn, attack, measure, jit)(x, y, batch_size, seeds, restarts, desc=desc)


__all__ = [
    "NORMS",
    "LOSSES",
    "STARTS",
    "cross_entropy",
    "smoothed_cross_entropy",
    "margin",
    "cw_margin",
    "kl_divergence",
    "kl_from_probabilities",
    "per_example_norm",
    "per_example",
    "project",
    "random_start",
    "uniform_noise",
    "single_step",
    "attack_loss",
    "pgd",
    "fgsm",
    "correct_predictions",
    "AttackRunner",
    "attack_batches",
]
