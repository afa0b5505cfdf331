"""The attacks that ``attacks.AttackRunner`` runs batch by batch, by their rows in :mod:`tfrobust.attack_names`.

Each is called as ``function(match, model_fn, x, y, eps, norm=..., step_size=..., seed=...)``,
``match`` being the match of the attack's name against its row's pattern, and
returns the adversarial examples.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfrobust import attacks


def clean(match, model_fn, x, y, eps, *, norm, step_size, seed):
    return x


def fgsm(match, model_fn, x, y, eps, *, norm, step_size, seed):
    return attacks.fgsm(model_fn, x, y, eps, norm=norm)


def pgd(match, model_fn, x, y, eps, *, norm, step_size, seed):
    """PGD with ``match.group(1)`` steps on the loss ``match.group(2)`` ("ce" or "cw"), from a uniform start."""
    return attacks.pgd(model_fn, x, y, eps, step_size, int(match.group(1)), norm=norm, loss=match.group(2),
                       random_start_kind="uniform", seed=seed)


def _order(norm):
    return np.inf if norm == "linf" else 2


def _float32(model_fn):
    return lambda t: tf.cast(model_fn(t), tf.float32)


# cleverhans 4.0.0's attacks, with sanity_checks off: they fail inside tf.function.

def cleverhans_fgsm(match, model_fn, x, y, eps, *, norm, step_size, seed):
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method

    return fast_gradient_method(_float32(model_fn), x, eps, _order(norm), clip_min=0.0, clip_max=1.0, y=y,
                                sanity_checks=False)


def cleverhans_pgd(match, model_fn, x, y, eps, *, norm, step_size, seed):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    return projected_gradient_descent(_float32(model_fn), x, eps, step_size, int(match.group(1)), _order(norm),
                                      clip_min=0.0, clip_max=1.0, y=y, rand_init=True, sanity_checks=False)


def cleverhans_mim(match, model_fn, x, y, eps, *, norm, step_size, seed):
    from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method

    return momentum_iterative_method(_float32(model_fn), x, eps, step_size, int(match.group(1)), _order(norm),
                                     clip_min=0.0, clip_max=1.0, y=y, sanity_checks=False)


__all__ = ["clean", "fgsm", "pgd", "cleverhans_fgsm", "cleverhans_pgd", "cleverhans_mim"]
