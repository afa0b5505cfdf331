"""AutoAttack's own checks of an evaluation (the reference's automatic flags) as pass/fail results.

The flags of the reference implementation (fra31/auto-attack, autoattack/checks.py
and flags_doc.md) and one of tfrobust's own (eps rounded from k/255):
:func:`autoattack_flags` runs them on a batch, :func:`square_check` on an
ensemble's ``broken_by`` array. Each result is a ``{"name", "passed", "detail",
"skipped"}`` dict (:func:`check_result`).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf

from tfrobust import seeds
from tfrobust.autoattack import core

# Square may break at most this fraction of the examples every gradient attack missed (the
# reference's alpha = 0.002, checks.py check_square_sr) ...
GRADIENT_FREE_MAX_FRACTION = 0.002
# ... or a single example: on probe sets of a few hundred examples 0.2% is less than one, and
# one example is within the noise of Square's random search against finite-step gradient attacks.
GRADIENT_FREE_ALLOWED_EXAMPLES = 1


def check_result(name, passed, detail, skipped=False) -> dict:
    """One check's result: ``{"name", "passed", "detail", "skipped"}``."""
    return {"name": name, "passed": bool(passed), "detail": detail, "skipped": bool(skipped)}


FLAG_NAMES = ("deterministic_forward", "logits_not_probabilities", "dlr_gradient_nonzero", "eps_not_rounded",
              "square_not_better")
RANDOMISED_PASSES = 5
RANDOMISED_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5
EPS_ROUNDING_DECIMALS = (3, 4, 5, 6)


def randomised_forward(model_fn, x, y, passes=RANDOMISED_PASSES, tolerance=RANDOMISED_TOLERANCE) -> dict:
    """Flags a forward pass that is not deterministic (checks.py ``check_randomized``, lines 18-41).

    Runs ``passes`` forward passes on ``x``; the flag is raised when the number
    of correct predictions differs between passes, or when two passes' outputs,
    each scaled to unit L2 norm per example, differ by more than ``tolerance``
    in L2 norm for some example (the reference's n = 5 and alpha = 1e-4).
    """
    x_t, y_t = core.as_inputs(x, y)
    outputs = [core.call_model(model_fn, x_t).numpy().astype(np.float64) for _ in range(passes)]
    correct = {int((o.argmax(1) == y_t.numpy()).sum()) for o in outputs}
    unit = [o / (np.sqrt((o * o).sum(1, keepdims=True)) + 1e-10) for o in outputs]
    spread = max((float(np.sqrt(((a - b) ** 2).sum(1)).max()) for i, a in enumerate(unit) for b in unit[i + 1:]),
                 default=0.0)
    return {"randomised": len(correct) > 1 or spread > tolerance, "max_difference": spread,
            "correct_counts": sorted(correct), "passes": passes}


def looks_like_probabilities(outputs, tolerance=PROBABILITY_TOLERANCE) -> bool:
    """True when every output row is non-negative and sums to 1 (checks.py ``check_range_output``, lines 44-57)."""
    out = np.asarray(outputs, np.float64)
    return bool(out.size and out.max() < 1 + tolerance and out.min() > -tolerance
                and np.all(np.abs(out.sum(-1) - 1.0) < tolerance))


def dlr_zero_gradients(model_fn, x, y, eps, norm="linf", seed=0) -> Optional[int]:
    """Examples whose DLR-loss input gradient is all zero at APGD's random start.

    The reference checks the gradient at APGD's starting point when it runs
    the DLR or targeted DLR loss (autopgd_base.py lines 285-287, checks.py
    ``check_zero_gradients``). As there, only the correctly classified
    examples count (APGD attacks no other): the DLR loss is constant, with a
    zero gradient, wherever the true class has the third largest logit.
    The start is drawn as APGD draws it (uniform in the L-inf ball, or a
    Gaussian direction scaled to eps for L2). None when the model has fewer
    than 3 classes (no DLR loss).
    """
    norm = core.check_norm(norm)
    x_t, y_t = core.as_inputs(x, y)
    call = lambda t: core.call_model(model_fn, t)  # noqa: E731
    logits = call(x_t)
    if int(logits.shape[-1]) < 3:
        return None
    correct = np.flatnonzero(core.predicted(logits).numpy() == y_t.numpy())
    if correct.size == 0:
        return 0
    x_t, y_t = tf.gather(x_t, correct), tf.gather(y_t, correct)
    start = core.sphere_start(x_t, float(eps), norm, seeds.attack_seed(core.check_seed(seed), seeds.APGD, 0, 0))
    _, _, grad = core.input_gradient(call, start, lambda logits: core.dlr_loss(logits, y_t))
    return int(np.sum(np.all(core.flatten_examples(grad).numpy() == 0.0, axis=1)))


def rounded_k_over_255(eps) -> Optional[int]:
    """k when ``eps`` looks like k/255 rounded (0.031 or 0.0314 for 8/255), else None.

    That is: ``eps`` equals k/255 (k = 1..255) rounded to 3-6 decimals, is not
    k/255 itself (float32 k/255 counts as exact), and its last decimal is not
    5 (0.075 or 0.125 are common choices of their own; values with at most 2
    decimals, such as 0.03 or 0.1, are not flagged either).
    """
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        return None
    for k in range(1, 256):
        if abs(eps - k / 255.0) <= 1e-7 * k / 255.0:
            return None  # k/255 itself (also in float32)
    for d in EPS_ROUNDING_DECIMALS:
        digits = round(eps * 10 ** d)
        if abs(eps * 10 ** d - digits) > 1e-6:
            continue  # eps has more than d decimals
        if digits % 10 in (0, 5):
            return None  # d decimals were not needed, or a round value such as 0.075
        for k in range(1, 256):
            if round(k / 255.0, d) * 10 ** d == digits or round(k / 255.0 * 10 ** d) == digits:
                return k
        return None
    return None


def autoattack_flags(model_fn, x, y, eps, norm="linf", *, randomised_expected=False, seed=0,
                     robust_by_attack=None, n_examples=None) -> list:
    """The reference AutoAttack's automatic checks, as pass/fail results (flags_doc.md).

    1. ``deterministic_forward``: two forward passes agree (:func:`randomised_forward`);
       a randomised model needs version "rand" (with ``randomised_expected``,
       i.e. under EOT, randomness is reported but does not fail, as the
       reference skips the check for "rand").
    2. ``logits_not_probabilities``: the outputs are not rows of probabilities
       (:func:`looks_like_probabilities`): attacks need logits.
    3. ``dlr_gradient_nonzero``: no correctly classified example has an
       all-zero DLR gradient at APGD's start (:func:`dlr_zero_gradients`):
       else use black-box attacks or BPDA.
    4. ``eps_not_rounded``: eps is not a rounded k/255 such as 0.031 for
       8/255 (an error of 1.2% in the threat model, frequent in published
       numbers; :func:`rounded_k_over_255`); not in the reference.
    5. ``square_not_better``: given ``robust_by_attack`` (the ensemble's
       ``broken_by`` array), Square broke at most 0.2% of the examples (or one
       example) that the gradient attacks before it missed (checks.py
       ``check_square_sr``, lines 73-86, threshold alpha = 0.002); skipped
       without it.

    Checks 1-3 run on (x, y) (AutoAttack uses its first batch).

    Returns:
      A list of ``{"name", "passed", "detail", "skipped"}`` dicts in this order.
    """
    out = []
    probe = randomised_forward(model_fn, x, y)
    if not probe["randomised"]:
        out.append(check_result("deterministic_forward", True,
                                f"{probe['passes']} forward passes agree "
                                f"(max difference {probe['max_difference']:.1e})"))
    elif randomised_expected:
        out.append(check_result("deterministic_forward", True,
                                f"the forward pass is randomised (max difference {probe['max_difference']:.2g} between "
                                f"{probe['passes']} passes), evaluated with EOT"))
    else:
        out.append(check_result("deterministic_forward", False,
                                "the forward pass is randomised "
                                f"(correct predictions per pass {probe['correct_counts']}, "
                                f"max difference {probe['max_difference']:.2g} between {probe['passes']} passes): "
                                "use --attacks rand (APGD with EOT)"))
    x_t, _ = core.as_inputs(x, y)
    outputs = core.call_model(model_fn, x_t).numpy()
    if looks_like_probabilities(outputs):
        out.append(check_result("logits_not_probabilities", False,
                                "the model outputs probabilities (rows non-negative, summing to 1): attack the logits "
                                "(remove the final softmax)"))
    else:
        out.append(check_result("logits_not_probabilities", True, "the outputs are not probability rows"))
    zero = dlr_zero_gradients(model_fn, x, y, eps, norm=norm, seed=seed)
    if zero is None:
        out.append(check_result("dlr_gradient_nonzero", True, "no DLR loss with fewer than 3 classes", skipped=True))
    elif zero:
        out.append(check_result("dlr_gradient_nonzero", False,
                                f"{zero} of {len(x)} example(s) have an all-zero DLR-loss gradient at APGD's start: "
                                "gradient attacks are unreliable there (use Square, or BPDA for non-differentiable "
                                "layers)"))
    else:
        out.append(check_result("dlr_gradient_nonzero", True, f"no zero DLR-loss gradient on {len(x)} examples"))
    k = rounded_k_over_255(eps)
    if k is None:
        out.append(check_result("eps_not_rounded", True, f"eps={float(eps):g} is not a rounded k/255"))
    else:
        out.append(check_result("eps_not_rounded", False,
                                f"eps={float(eps):g} looks like {k}/255 = {k / 255:.7f} rounded "
                                f"({abs(float(eps) - k / 255) / (k / 255):.1%} off): pass eps={k}/255 exactly if that "
                                "is the threat model"))
    out.append(square_check(robust_by_attack, n_examples))
    return out


def square_check(broken_by=None, n_examples=None) -> dict:
    """Check 5 of :func:`autoattack_flags` from an ensemble's ``broken_by`` array."""
    if broken_by is None:
        return check_result("square_not_better", True, "needs the ensemble's result", skipped=True)
    broken_by = np.asarray(broken_by)
    n = int(n_examples or len(broken_by))
    only = int(np.sum(broken_by == "square"))
    allowed = max(GRADIENT_FREE_MAX_FRACTION * n, GRADIENT_FREE_ALLOWED_EXAMPLES)
    if only <= allowed + 1e-12:
        return check_result("square_not_better", True, f"Square broke {only} example(s) the gradient attacks before it "
                            f"missed (allowed: {GRADIENT_FREE_MAX_FRACTION:.1%} or 1 example)")
    return check_result("square_not_better", False,
                        f"Square broke {only} example(s) ({only / n:.2%}) that the gradient attacks before it missed: "
                        "possible gradient masking; run Square with more queries or an adaptive attack")


__all__ = ["FLAG_NAMES", "GRADIENT_FREE_MAX_FRACTION", "GRADIENT_FREE_ALLOWED_EXAMPLES", "RANDOMISED_PASSES",
           "RANDOMISED_TOLERANCE", "PROBABILITY_TOLERANCE", "EPS_ROUNDING_DECIMALS", "check_result",
           "randomised_forward", "looks_like_probabilities", "dlr_zero_gradients", "rounded_k_over_255",
           "autoattack_flags", "square_check"]
