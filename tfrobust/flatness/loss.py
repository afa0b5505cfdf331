"""The robust loss ``RLoss(w)`` of Stutz et al. (ICCV 2021, (F1)) and what every measure needs to compute it.

Public, for the measures, the report, the monitor and :mod:`tfrobust.landscape`:
  - ``DEFAULT_EPS``, ``DEFAULT_STEP_SIZE``, ``DEFAULT_STEPS``,
    ``DEFAULT_BATCH_SIZE``, ``STEP_FRACTION`` and :func:`resolve_step_size`:
    the reference's attack settings.
  - :func:`check_attack_settings`, :func:`check_pgd_settings`: one-line
    ``UserError`` for a bad norm, eps, step size, step count or restart count.
  - :func:`evaluation_data`: ``(x, y)`` as float32 images and int32 class
    indices (one-hot labels accepted), checked for size.
  - :func:`batch_bounds`, :func:`batch_mean_of`, :func:`progress_bar`.
  - :class:`RobustLossEvaluator`: the per-example robust (PGD, restarts) or
    clean cross-entropy at a model's current weights, with common random
    starts.
  - :func:`robust_loss`: ``RLoss(w)``.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfrobust import seeds, weight_space
from tfrobust.attacks import NORMS, AttackRunner, cross_entropy, pgd
from tfrobust.errors import UserError, unknown_choice

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_STEP_SIZE",
    "DEFAULT_STEPS",
    "DEFAULT_BATCH_SIZE",
    "STEP_FRACTION",
    "resolve_step_size",
    "check_attack_settings",
    "check_pgd_settings",
    "evaluation_data",
    "batch_bounds",
    "batch_mean_of",
    "progress_bar",
    "compiled",
    "batch_spec",
    "RobustLossEvaluator",
    "robust_loss",
]

DEFAULT_EPS = 8.0 / 255.0
DEFAULT_STEP_SIZE = 0.007
# step_size=None means this fraction of eps: the reference's 0.007 at 8/255.
STEP_FRACTION = DEFAULT_STEP_SIZE / DEFAULT_EPS
DEFAULT_STEPS = 20
DEFAULT_BATCH_SIZE = 128


def resolve_step_size(eps: float, step_size: Optional[float] = None) -> float:
    """``step_size`` if given, else the reference's ratio ``0.007 / (8/255)`` times ``eps`` (0.007 at eps = 8/255)."""
    if step_size is not None:
        return float(step_size)
    if float(eps) == DEFAULT_EPS:
        return DEFAULT_STEP_SIZE
    return STEP_FRACTION * float(eps)


def check_attack_settings(eps, step_size, steps, restarts, norm) -> None:
    """Raises a one-line ``UserError`` for an unknown ``norm`` or a negative eps/step size/steps or restarts < 1."""
    if norm not in NORMS:
        raise unknown_choice("norm", norm, NORMS)
    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    check_pgd_settings(step_size, steps, restarts)


def check_pgd_settings(step_size, steps, restarts, where: str = "") -> None:
    """Raises a one-line ``UserError`` for a negative step size or step count or restarts < 1."""
    if step_size < 0:
        raise UserError(f"{where}step_size must be >= 0, got {step_size}")
    if int(steps) < 0:
        raise UserError(f"{where}steps must be >= 0, got {steps}")
    if int(restarts) < 1:
        raise UserError(f"{where}restarts must be >= 1, got {restarts}")


def _as_labels(y) -> tf.Tensor:
    y = np.asarray(y.numpy() if isinstance(y, tf.Tensor) else y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = np.argmax(y, axis=1)
    y = y.reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise UserError("labels must be integer class indices or one-hot vectors")
    return tf.constant(y.astype(np.int32))


def evaluation_data(x, y):
    """``(x, y)`` as a float32 image tensor and int32 class indices (one-hot ``y`` is converted).

    Raises ``UserError`` for an empty set, non-integer labels or a size mismatch.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    y = _as_labels(y)
    n = int(x.shape[0])
    if n == 0:
        raise UserError("the evaluation set is empty")
    if int(y.shape[0]) != n:
        raise UserError(f"x has {n} examples but y has {int(y.shape[0])} labels")
    return x, y


def batch_bounds(n: int, batch_size: int):
    """``[(start, stop), ...]`` of consecutive batches of at most ``batch_size`` of ``n`` examples."""
    if batch_size is None or int(batch_size) < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    return [(i, min(i + int(batch_size), n)) for i in range(0, n, int(batch_size))]


def batch_mean_of(loss_fn, model, x, y, batch_size) -> float:
    """The mean over the set of ``loss_fn(model, x_batch, y_batch)`` (a batch mean), weighted by batch size."""
    n = int(x.shape[0])
    total = 0.0
    for lo, hi in batch_bounds(n, batch_size):
        total += float(loss_fn(model, x[lo:hi], y[lo:hi])) * (hi - lo)
    return total / n


def progress_bar(total, desc, enabled):
    """A tqdm bar (disabled unless ``enabled``) that disappears when closed."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def compiled(fn, signature):
    """``tf.function`` with a batch-size-agnostic signature, traced once per measurement.

    ``fn`` is wrapped in a ``functools.partial`` so that TensorFlow's
    frequent-retracing heuristic, which groups functions by their code object,
    counts every measurement's single trace separately.
    """
    return tf.function(functools.partial(fn), input_signature=signature)


def batch_spec(x):
    """A ``tf.TensorSpec`` of ``x`` with any batch size."""
    return tf.TensorSpec([None] + list(x.shape[1:]), x.dtype)


class RobustLossEvaluator:
    """Per-example (robust) cross-entropy of a model at its current weights (Stutz et al., ICCV 2021, (F1)).

    ``robust=True``: for each restart ``r``, PGD-``steps`` from a uniform
    random start with seed ``(seed, STREAM_PGD, r, batch)``; the per-example
    maximum over restarts of CE at the adversarial point. The starts depend
    only on ``(seed, r, batch)``, so every evaluation at other weights uses
    common random starts. ``robust=False``: CE at the clean input. The model
    is called with ``training=False``. The batches and restarts run through
    one :class:`tfrobust.attacks.AttackRunner` per evaluator (``jit=True``:
    compiled).

    Args:
      model: a Keras model mapping images in [0, 1] to logits.
      eps, step_size, steps, restarts, norm: the attack (see
        :func:`check_attack_settings`).
      batch_size: examples per attack batch.
      seed: the random starts.
      robust: adversarial (True) or clean (False) cross-entropy.
      jit: compile the per-batch computation.
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
        self._runner = None

    def _compile(self):
        if self._runner is not None:
            return
        attack = self.attack if self.robust else (lambda model_fn, x, y, seed: x)
        measure = lambda model_fn, x_adv, x, y: cross_entropy(model_fn(x_adv), y)  # noqa: E731
        self._runner = AttackRunner(self._model_fn, attack, measure, jit=self.jit)

    def _model_fn(self, t):
        return self.model(t, training=False)

    def attack(self, model_fn, x, y, seed):
        """The adversarial examples of one batch: PGD-``steps`` on CE from a uniform start drawn with ``seed``.

        The only attack of the evaluator; :meth:`per_example` runs it over the
        batches and restarts with the seeds of :meth:`batch_seed`.
        """
        return pgd(model_fn, x, y, self.eps, self.step_size, self.steps, norm=self.norm, loss="ce",
                   random_start_kind="uniform", seed=seed)

    def batch_seed(self, batch: int, restart: int) -> tf.Tensor:
        """The seed of the random start of ``batch`` in ``restart``.

        :func:`tfrobust.seeds.flatness_seed` of ``(seed, STREAM_PGD, restart, batch)``.
        """
        return seeds.flatness_seed(self.seed, seeds.STREAM_PGD, restart, batch)

    def per_example(self, x, y) -> np.ndarray:
        """The loss of every example of ``(x, y)`` (float64): the worst over restarts when robust."""
        batch_bounds(int(x.shape[0]), self.batch_size)  # the one-line error for a bad batch size
        self._compile()
        restarts = self.restarts if self.robust else 1
        losses = self._runner(x, y, self.batch_size, seeds=self.batch_seed, restarts=restarts)
        return losses.astype(np.float64)

    def mean(self, x, y) -> float:
        """The mean over ``(x, y)`` of :meth:`per_example`."""
        return float(np.mean(self.per_example(x, y)))


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
    check_attack_settings(eps, step_size, steps, restarts, norm)
    x, y = evaluation_data(x, y)
    weight_space.ensure_built(model, x)
    with weight_space.weights_preserved(model):
        return RobustLossEvaluator(model, eps, step_size, steps, restarts, norm, batch_size, seed, True, jit).mean(x, y)
