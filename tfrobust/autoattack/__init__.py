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
  computed by :func:`tfrobust.autoattack.checks.autoattack_flags` and returned as
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

Layout: one module per attack over a shared core --
:mod:`~tfrobust.autoattack.apgd` (APGD-CE, APGD-DLR, APGD-T, EOT),
:mod:`~tfrobust.autoattack.fab` (FAB, FAB-T), :mod:`~tfrobust.autoattack.square`,
:mod:`~tfrobust.autoattack.ensemble` (versions, budgets, :func:`run_autoattack`),
:mod:`~tfrobust.autoattack.batches` (one attack over the examples in batches),
:mod:`~tfrobust.autoattack.sharding` (batches on the replica devices),
:mod:`~tfrobust.autoattack.resume` (the resumable partial results),
:mod:`~tfrobust.autoattack.checks` (the reference's automatic flags) and
:mod:`~tfrobust.autoattack.core` (argument checks, model calls and the cache
of compiled functions, DLR losses, EOT gradients, the restart loop). The projection onto the ball, per-example
norms, cross-entropy and margin are those of :mod:`tfrobust.attacks`; seeds
come from :mod:`tfrobust.seeds`. Every public name is importable from
``tfrobust.autoattack``. The package attributes ``apgd``, ``fab`` and ``square``
are the attack functions, not the modules of the same names (import those
as ``from tfrobust.autoattack.fab import ...`` or with
``importlib.import_module``).
"""

from __future__ import annotations

from tfrobust.autoattack.apgd import APGD_LOSSES, apgd, apgd_targeted
from tfrobust.autoattack.core import (  # noqa: F401 - public names of the package
    BALL_TOLERANCE, NORMS, dlr_loss, input_gradient, perturbation_norms, project,
)
from tfrobust.autoattack.ensemble import (  # noqa: F401
    ALL_ATTACKS, ATTACKS, RAND_EOT_ITER, VERSION_ATTACKS, VERSION_VERDICT_PASSES, VERSIONS, AttackSpec, run_autoattack,
)
from tfrobust.autoattack.fab import box_hyperplane_projection, fab, fab_targeted
from tfrobust.autoattack.square import square

# The names these helpers had in the single-module autoattack of earlier releases.
_box_hyperplane_projection = box_hyperplane_projection
_input_gradient = input_gradient
_dlr_loss = dlr_loss

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
