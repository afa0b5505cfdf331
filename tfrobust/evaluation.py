"""Robust accuracy of any model that maps images in [0, 1] to logits.

``evaluate`` runs a list of named attacks over a test set in batches and
returns accuracies as fractions in [0, 1] under keys that name the attack:

- ``clean``: no attack;
- ``fgsm``: one signed-gradient step of size eps (Goodfellow et al. 2015);
- ``pgd<N>_ce`` / ``pgd<N>_cw``: N-step PGD with a uniform random start on
  cross-entropy / on the Carlini-Wagner margin (Madry et al. 2018; Carlini &
  Wagner 2017), step eps/4 unless given (2/255 at eps 8/255, ALGORITHMS.md
  section 7).

``worst_case`` is the per-example worst case over every attack that ran.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfrobust import attacks as attack_lib
from tfrobust.errors import UserError

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20_ce", "pgd20_cw")
_PGD = re.compile(r"^pgd(\d+)_(ce|cw)$")


def attack_names_help() -> str:
    return "clean, fgsm, pgd<N>_ce, pgd<N>_cw"


def parse_attacks(spec) -> list:
    """Parses ``"clean,fgsm,pgd20_ce"`` (or a list) into checked attack names."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError(f"no attack given; allowed: {attack_names_help()}")
    for name in names:
        if name not in ("clean", "fgsm") and not _PGD.match(name):
            raise UserError(f"unknown attack {name!r}; allowed: {attack_names_help()}")
    return names


def _attack_fn(name: str, model_fn: Callable, eps: float, norm: str, step_size, seed: int):
    """A compiled function (x, y) -> per-example correctness under attack ``name``."""
    match = _PGD.match(name)

    @tf.function(reduce_retracing=True)
    def run(x, y, batch_index):
        if name == "clean":
            x_adv = x
        elif name == "fgsm":
            x_adv = attack_lib.fgsm(model_fn, x, y, eps, norm=norm)
        else:
            steps, loss = int(match.group(1)), match.group(2)
            x_adv = attack_lib.pgd(
                model_fn, x, y, eps, step_size, steps, norm=norm, loss=loss,
                random_start_kind="uniform", seed=tf.stack([tf.constant(seed, tf.int32), batch_index]),
            )
        logits = tf.cast(model_fn(x_adv), tf.float32)
        return tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))

    return run


def evaluate(
    model_fn: Callable,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    norm: str = "linf",
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    step_size=None,
    batch_size: int = 256,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Accuracy under each attack, and the per-example worst case.

    Args:
      model_fn: maps float32 NHWC images in [0, 1] to logits.
      x, y: test images in [0, 1] and integer labels (numpy arrays).
      eps, norm: the threat model ("linf" or "l2").
      attacks: names, see the module doc.
      step_size: PGD step; default eps / 4.
    Returns:
      ``{"accuracy": {name: fraction}, "worst_case": fraction, "examples": n,
      "eps": eps, "norm": norm, "seconds": {name: s}, "correct": {name: bool array}}``.
    """
    from tqdm.auto import tqdm

    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    if norm not in attack_lib.NORMS:
        raise UserError(f"unknown norm {norm!r}; allowed: l2, linf")
    names = parse_attacks(attacks)
    step = eps / 4.0 if step_size is None else float(step_size)
    n = len(x)
    if n == 0:
        raise UserError("no test examples to evaluate")
    report = {"accuracy": {}, "seconds": {}, "correct": {}, "examples": int(n), "eps": float(eps), "norm": norm}
    for name in names:
        run = _attack_fn(name, model_fn, eps, norm, step, seed)
        correct = []
        start = time.time()
        batches = range(0, n, batch_size)
        for i in tqdm(batches, desc=f"{name:>10}", disable=not verbose, leave=False):
            xb = tf.convert_to_tensor(x[i : i + batch_size], tf.float32)
            yb = tf.convert_to_tensor(y[i : i + batch_size], tf.int32)
            correct.append(run(xb, yb, tf.constant(i // batch_size, tf.int32)).numpy())
        correct = np.concatenate(correct)
        report["correct"][name] = correct
        report["accuracy"][name] = float(correct.mean())
        report["seconds"][name] = round(time.time() - start, 3)
    report["worst_case"] = float(np.logical_and.reduce(list(report["correct"].values())).mean())
    return report


def format_table(report: dict) -> str:
    """A plain-text table of the accuracies in a report."""
    rows = [("attack", "accuracy", "seconds")]
    for name, acc in report["accuracy"].items():
        rows.append((name, f"{100 * acc:.2f}%", f"{report['seconds'].get(name, 0):.1f}"))
    rows.append(("worst case", f"{100 * report['worst_case']:.2f}%", ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    header = f"{report['examples']} examples, {report['norm']} eps={report['eps']:.4g}"
    return header + "\n" + "\n".join(lines)


def to_json(report: dict) -> str:
    """The report without per-example arrays, as JSON."""
    clean = {k: v for k, v in report.items() if k != "correct"}
    return json.dumps(clean, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
