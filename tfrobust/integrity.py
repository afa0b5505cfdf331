"""Checks that flag unreliable robustness evaluations (gradient masking and friends).

An evaluation can report high robust accuracy because the attacks failed, not
because the model is robust: gradients that are zero, noisy or uninformative
(quantisation, randomness, saturated softmax) make gradient attacks stall.
Athalye, Carlini and Wagner ("Obfuscated gradients give a false sense of
security", ICML 2018) and Carlini et al. ("On evaluating adversarial
robustness", 2019) list the symptoms tested here, and Croce and Hein (ICML
2020, AutoAttack) warn when Square Attack beats the gradient attacks
(docs/algorithms.md, section 7):

1. ``robust_le_clean``: no attack raises accuracy above clean accuracy.
2. ``eps0_equals_clean``: an attack with eps = 0 gives exactly the clean
   accuracy (a difference means randomness or a broken attack).
3. ``large_eps_near_zero``: with a very large eps (L-inf 1.0 or L2 sqrt(d):
   every image in [0, 1]^d is reachable) accuracy is at most 10%.
4. ``more_steps_not_better``: more PGD steps never raise accuracy by more than
   one example (random starts and step sizes differ between runs, so one
   example of noise is allowed).
5. ``gradient_free_not_better``: a gradient-free attack (Square) breaks at most
   0.2% of the examples that every gradient attack failed on (AutoAttack's
   threshold), or one example; more is flagged as possible gradient masking.

:func:`run_integrity_probes` measures the inputs with a small budget and
:func:`integrity_checks` turns them into pass/fail results::

    checks = integrity_checks(run_integrity_probes(model_fn, x, y, eps))

AutoAttack's own flags (:func:`~tfrobust.autoattack.checks.autoattack_flags`)
live in :mod:`tfrobust.autoattack.checks`; their names are importable from here too.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Optional

import numpy as np
import tensorflow as tf

from tfrobust import seeds
from tfrobust.attacks import attack_batches, pgd
from tfrobust.autoattack import core
from tfrobust.autoattack.apgd import apgd
from tfrobust.autoattack.checks import (  # noqa: F401 - AutoAttack's flags are also read from here
    FLAG_NAMES, GRADIENT_FREE_ALLOWED_EXAMPLES, GRADIENT_FREE_MAX_FRACTION, autoattack_flags, check_result,
    dlr_zero_gradients, looks_like_probabilities, randomised_forward, rounded_k_over_255, square_check,
)
from tfrobust.autoattack.square import square
from tfrobust.errors import UserError

LARGE_EPS_MAX_ACCURACY = 0.1
STEPS_TOLERANCE_EXAMPLES = 1

GRADIENT_ATTACKS = ("fgsm", "pgd", "apgd", "fab", "cw")
GRADIENT_FREE_ATTACKS = ("square",)


def _skip(name, what):
    return check_result(name, True, f"skipped: no {what} in the results", skipped=True)


def _steps_key(k) -> int:
    if isinstance(k, str):
        digits = "".join(ch for ch in k if ch.isdigit())
        if not digits:
            raise UserError(f"pgd_steps keys must be step counts, got {k!r}")
        return int(digits)
    return int(k)


def _robust_le_clean(acc, clean) -> dict:
    """1. robust accuracy <= clean accuracy."""
    name = "robust_le_clean"
    attacked = {k: v for k, v in acc.items() if k != "clean"}
    if clean is None or not attacked:
        return _skip(name, "clean and attacked accuracies")
    bad = {k: v for k, v in attacked.items() if v > clean + 1e-9}
    if bad:
        detail = "; ".join(f"{k}: {v:.2%} > clean {clean:.2%}" for k, v in bad.items())
        return check_result(name, False, f"attacked accuracy above clean accuracy ({detail}): "
                                         "the attack or the model's output is unreliable")
    return check_result(name, True, f"all {len(attacked)} attacks <= clean {clean:.2%}")


def _eps0_equals_clean(results, clean, one) -> dict:
    """2. eps = 0 gives the clean accuracy."""
    name = "eps0_equals_clean"
    eps0 = results.get("eps0_accuracy")
    if clean is None or eps0 is None:
        return _skip(name, "eps0_accuracy or clean accuracy")
    if abs(eps0 - clean) <= 0.5 * one + 1e-9:
        return check_result(name, True, f"accuracy at eps=0 {eps0:.2%} equals clean {clean:.2%}")
    return check_result(name, False, f"accuracy at eps=0 {eps0:.2%} differs from clean {clean:.2%}: "
                                     "randomised model or broken attack")


def _large_eps_near_zero(results, large_eps_max_accuracy) -> dict:
    """3. a very large eps breaks (almost) everything."""
    name = "large_eps_near_zero"
    large = results.get("large_eps_accuracy")
    if large is None:
        return _skip(name, "large_eps_accuracy")
    at = results.get("large_eps")
    at = f" at eps={at:g}" if isinstance(at, (int, float)) else ""
    if large <= large_eps_max_accuracy:
        return check_result(name, True, f"accuracy{at} is {large:.2%} <= {large_eps_max_accuracy:.0%}")
    return check_result(name, False, f"accuracy{at} is {large:.2%} > {large_eps_max_accuracy:.0%}: "
                                     "the attack cannot reach points that are certainly reachable "
                                     "(possible gradient masking)")


def _more_steps_not_better(results, one, steps_tolerance_examples) -> dict:
    """4. more PGD steps never raise accuracy."""
    name = "more_steps_not_better"
    steps = results.get("pgd_steps") or {}
    if len(steps) < 2:
        return _skip(name, "pgd_steps with at least two step counts")
    series = sorted((_steps_key(k), float(v)) for k, v in steps.items())
    tol = steps_tolerance_examples * one
    bad = [(a, va, b, vb) for i, (a, va) in enumerate(series) for (b, vb) in series[i + 1:]
           if b > a and vb > va + tol + 1e-9]
    listing = ", ".join(f"{k}: {v:.2%}" for k, v in series)
    if bad:
        a, va, b, vb = bad[0]
        return check_result(name, False, f"PGD with {b} steps ({vb:.2%}) is above {a} steps ({va:.2%}) by "
                                         f"more than {steps_tolerance_examples} example(s) ({listing}): "
                                         "the attack does not converge (possible gradient masking)")
    return check_result(name, True, f"non-increasing within {steps_tolerance_examples} example(s): {listing}")


def _gradient_free_not_better(results, n, gradient_free_max_fraction) -> dict:
    """5. the gradient-free attack does not beat the gradient attacks."""
    name = "gradient_free_not_better"
    only = results.get("gradient_free_only")
    if only is None:
        return _skip(name, "gradient_free_only")
    frac = (only / n) if n else (1.0 if only > 0 else 0.0)
    who = results.get("gradient_free_attack", "the gradient-free attack")
    if frac <= gradient_free_max_fraction + 1e-12 or only <= GRADIENT_FREE_ALLOWED_EXAMPLES:
        return check_result(name, True, f"{who} broke {int(only)} example(s) that all gradient attacks missed "
                                        f"(allowed: {gradient_free_max_fraction:.1%} or "
                                        f"{GRADIENT_FREE_ALLOWED_EXAMPLES} example)")
    return check_result(name, False, f"possible gradient masking: {who} broke {int(only)} example(s) "
                                     f"({frac:.2%}) that every gradient attack missed "
                                     f"(threshold {gradient_free_max_fraction:.1%})")


def integrity_checks(results: dict, *, large_eps_max_accuracy: float = LARGE_EPS_MAX_ACCURACY,
                     steps_tolerance_examples: int = STEPS_TOLERANCE_EXAMPLES,
                     gradient_free_max_fraction: float = GRADIENT_FREE_MAX_FRACTION) -> list:
    """Runs the five integrity checks on an evaluation's results.

    Args:
      results: a dict with any of these keys (as returned by
        :func:`run_integrity_probes`; a check whose inputs are missing is
        reported with ``passed=True, skipped=True``):

        - ``"n_examples"``: number of evaluated examples (turns example counts
          into fractions; without it the tolerances of checks 2 and 4 are 0);
        - ``"accuracy"``: {attack name: accuracy at the evaluation eps}, with
          ``"clean"`` (all accuracies are fractions of all examples);
        - ``"eps0_accuracy"``: accuracy of an attack run with eps = 0;
        - ``"large_eps"``, ``"large_eps_accuracy"``: a very large eps and the
          accuracy of an attack at it;
        - ``"pgd_steps"``: {number of steps: PGD accuracy} (keys may be ints or
          strings such as "pgd-20");
        - ``"gradient_free_only"``: number of examples broken by the
          gradient-free attack but by none of the gradient attacks.
      large_eps_max_accuracy: threshold of check 3 (default 0.1).
      steps_tolerance_examples: examples of noise allowed by check 4 (default 1).
      gradient_free_max_fraction: threshold of check 5, as a fraction of all
        examples (default 0.002, AutoAttack's).

    Returns:
      A list of ``{"name", "passed", "detail", "skipped"}`` dicts, one per check,
      in the order of the module docstring.
    """
    if not isinstance(results, dict):
        raise UserError(f"integrity_checks expects a dict of results, got {type(results).__name__}")
    n = results.get("n_examples")
    n = int(n) if n else None
    one = (1.0 / n) if n else 0.0
    acc = dict(results.get("accuracy") or {})
    clean = acc.get("clean")
    return [
        _robust_le_clean(acc, clean),
        _eps0_equals_clean(results, clean, one),
        _large_eps_near_zero(results, large_eps_max_accuracy),
        _more_steps_not_better(results, one, steps_tolerance_examples),
        _gradient_free_not_better(results, n, gradient_free_max_fraction),
    ]


def from_autoattack(result: dict) -> dict:
    """Integrity inputs from a :func:`tfrobust.autoattack.run_autoattack` result.

    Gives ``accuracy`` (clean and the cumulative accuracy after each attack)
    and ``n_examples``; if Square ran after every gradient attack of the
    ensemble, also ``gradient_free_only`` (the examples Square removed).
    Merge it with :func:`run_integrity_probes` output with ``dict.update``.
    """
    per = dict(result.get("per_attack") or {})
    n = int(result.get("n_examples") or len(result.get("robust_mask", [])))
    out = {"n_examples": n, "accuracy": {"clean": float(result["clean"]), **per}}
    names = list(per)
    if "square" in names and names.index("square") == len(names) - 1 and len(names) > 1:
        before = per[names[-2]]
        out["gradient_free_only"] = int(round((before - per["square"]) * n))
        out["gradient_free_attack"] = "square"
    return out


def run_integrity_probes(model_fn, x, y, eps, norm="linf", seed=0, *, batch_size=256, steps=(10, 20, 50),
                         large_eps: Optional[float] = None, apgd_iters=100, square_queries=1000,
                         verbose=False) -> dict:
    """Measures the inputs of :func:`integrity_checks` on (x, y).

    Budget per example (d = number of input features):

    - clean predictions;
    - PGD (cross-entropy, uniform random start, step 2.5 eps / k; Madry et al.
      2018) with k = 10, 20 and 50 steps at ``eps`` (80 gradient steps);
    - PGD-10 at eps = 0;
    - PGD-20 at ``large_eps`` (default 1.0 for L-inf, sqrt(d) for L2: both
      reach every image in [0, 1]^d);
    - APGD-CE with ``apgd_iters`` iterations at ``eps``;
    - Square (margin loss, ``square_queries`` queries) at ``eps``, only on the
      clean-correct examples that every gradient attack above failed on.

    That is about 210 gradient evaluations per example plus the Square queries
    on the survivors: a few times the cost of PGD-50. Use a few hundred
    examples.

    Args:
      model_fn: callable mapping float32 NHWC images in [0, 1] to logits (a
        keras model is called with ``training=False``).
      x, y: images in [0, 1] and integer labels.
      eps, norm: the threat model of the evaluation ("linf" or "l2").
      seed: integer seed of every random start and of Square.
      batch_size: examples per call.
      steps: the PGD step counts compared by the step check.
      large_eps: the radius of the large-eps probe (None: see above).
      apgd_iters, square_queries: budgets of APGD-CE and Square.
      verbose: show a progress bar.

    Returns:
      ``{"n_examples", "eps", "norm", "accuracy": {"clean", "pgd-10", "pgd-20",
      "pgd-50", "apgd-ce"}, "eps0_accuracy", "large_eps", "large_eps_accuracy",
      "pgd_steps": {10: .., 20: .., 50: ..}, "gradient_free_attack": "square",
      "gradient_free_only", "gradient_free_tested" (examples Square ran on),
      "zero_gradient_examples" (examples whose cross-entropy input gradient at
      the clean point is exactly zero), "budget", "seconds"}``.
    """
    start = time.time()
    x_t, x_np, y_np, eps, norm, seed, batch_size, steps, large_eps = _probe_arguments(
        x, y, eps, norm, seed, batch_size, steps, large_eps)
    call = lambda t: core.call_model(model_fn, t)  # noqa: E731

    from tqdm.auto import tqdm

    bar = tqdm(total=len(steps) + 4, desc="integrity probes", disable=not verbose, leave=False)
    logits = core.predict_logits(model_fn, x_t, batch_size)
    clean_correct = core.predicted(logits).numpy() == y_np
    bar.update(1)

    def correct_under(radius, k, purpose):
        ok = _pgd_correct(call, x_np, y_np, radius, k, norm, batch_size, seed, purpose)
        bar.update(1)
        return ok

    accuracy, pgd_steps = {"clean": float(clean_correct.mean())}, {}
    gradient_robust = clean_correct.copy()
    for j, k in enumerate(steps):
        ok = correct_under(eps, k, seeds.PROBE_STEPS + j)
        pgd_steps[k] = accuracy[f"pgd-{k}"] = float(ok.mean())
        gradient_robust &= ok
    eps0 = correct_under(0.0, 10, seeds.PROBE_EPS0)
    large = correct_under(large_eps, 20, seeds.PROBE_LARGE_EPS)

    zero_grad = _zero_gradient_count(call, x_np, y_np, batch_size)
    apgd_ok = ~_fooled_by(model_fn, lambda fn, xb, yb: apgd(
        fn, xb, yb, eps, norm=norm, loss="ce", n_iter=apgd_iters, seed=seed), x_np, y_np, batch_size)
    accuracy["apgd-ce"] = float(apgd_ok.mean())
    gradient_robust &= apgd_ok
    bar.update(1)

    idx = np.flatnonzero(gradient_robust)
    square_fooled = 0
    if idx.size and eps > 0 and square_queries:
        square_fooled = int(np.sum(_fooled_by(model_fn, lambda fn, xb, yb: square(
            fn, xb, yb, eps, norm=norm, n_queries=square_queries, seed=seed), x_np[idx], y_np[idx], batch_size)))
    bar.update(1)
    bar.close()

    return {
        "n_examples": len(x_np),
        "eps": eps,
        "norm": norm,
        "accuracy": accuracy,
        "eps0_accuracy": float(eps0.mean()),
        "large_eps": large_eps,
        "large_eps_accuracy": float(large.mean()),
        "pgd_steps": pgd_steps,
        "gradient_free_attack": "square",
        "gradient_free_only": square_fooled,
        "gradient_free_tested": int(idx.size),
        "zero_gradient_examples": zero_grad,
        "budget": {"pgd_steps": list(steps), "pgd_step_size": "2.5 * eps / steps", "eps0_steps": 10,
                   "large_eps_steps": 20, "apgd_iters": int(apgd_iters), "square_queries": int(square_queries)},
        "seconds": time.time() - start,
    }


def _probe_arguments(x, y, eps, norm, seed, batch_size, steps, large_eps) -> tuple:
    """The arguments of :func:`run_integrity_probes`, checked: ``(x_t, x_np, y_np, eps, norm, seed,
    batch_size, steps, large_eps)``."""
    norm = core.check_norm(norm)
    eps = core.check_eps(eps)
    seed = core.check_seed(seed)
    batch_size = core.check_positive_int("batch_size", batch_size)
    steps = sorted({core.check_positive_int("steps", int(k)) for k in steps})
    x_t, y_t = core.as_inputs(x, y)
    x_np, y_np = x_t.numpy(), y_t.numpy()
    if len(x_np) == 0:
        raise UserError("x is empty")
    if large_eps is None:
        large_eps = 1.0 if norm == "linf" else math.sqrt(int(np.prod(x_np.shape[1:])))
    return x_t, x_np, y_np, eps, norm, seed, batch_size, steps, core.check_eps(large_eps)


def _pgd_correct(call, x, y, radius, k, norm, batch_size, seed, purpose):
    """Per-example correctness under PGD-k (step 2.5 radius / k) at ``radius``, one seed per batch."""
    step = 2.5 * radius / k

    def correct(_, x_adv, xb, yb):
        return core.predicted(call(x_adv)) == yb

    return attack_batches(
        call, x, y, lambda fn, xb, yb, sd: pgd(fn, xb, yb, radius, step, k, norm=norm, loss="ce", seed=sd),
        batch_size=batch_size, measure=correct, seeds=lambda b, _: seeds.batch_seed(seed % (2**31 - 1), b, purpose))


def _zero_gradient_count(call, x, y, batch_size) -> int:
    """Examples whose cross-entropy input gradient at the clean point is exactly zero."""
    def zero_gradient(_, x_adv, xb, yb):
        _, _, g = core.input_gradient(call, xb, lambda logits: tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=yb, logits=logits))
        return tf.reduce_all(tf.equal(core.flatten_examples(g), 0.0), axis=1)

    return int(np.sum(attack_batches(call, x, y, lambda fn, xb, yb, _: xb, batch_size=batch_size,
                                     measure=zero_gradient, seeds=lambda b, r: 0)))


def _fooled_by(model_fn, attack, xs, ys, batch_size):
    """Per-example success of an AutoAttack component (eager, in batches of ``batch_size``)."""
    def measure(_, x_adv, xb, yb):
        return core.predicted(core.predict_logits(model_fn, x_adv)) != yb

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*zero input gradient", category=RuntimeWarning)
        return attack_batches(model_fn, xs, ys, lambda fn, xb, yb, _: attack(fn, xb, yb),
                              batch_size=batch_size, measure=measure, jit=False, seeds=lambda b, r: None)


__all__ = [
    "LARGE_EPS_MAX_ACCURACY",
    "STEPS_TOLERANCE_EXAMPLES",
    "GRADIENT_FREE_MAX_FRACTION",
    "GRADIENT_FREE_ALLOWED_EXAMPLES",
    "GRADIENT_ATTACKS",
    "GRADIENT_FREE_ATTACKS",
    "integrity_checks",
    "from_autoattack",
    "run_integrity_probes",
]
