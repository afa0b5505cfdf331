"""Loss landscapes in weight space, as numbers and PNG plots.

Stutz, Hein and Schiele, "Relating Adversarially Robust Generalization to Flat
Minima", ICCV 2021, loss-landscape visualisations (docs/algorithms.md, section 6):
the robust loss ``RLoss(w + s * d)`` ((F1) in :mod:`tfrobust.flatness`) along
a direction ``d`` in weight space, for ``s`` in ``[-1, 1]``, re-running PGD at
every point. The direction is random (Gaussian) or adversarial (the final
weight perturbation of the worst-case flatness attack, (F3)), and is rescaled
per layer so that ``max|d_l| = 0.5 * max|w_l|`` (scale-invariant, as the
flatness measures; :func:`tfrobust.weight_space.gaussian_direction` and
:func:`tfrobust.weight_space.rescale_direction`, re-exported here). Only the
variables of :func:`tfrobust.weight_space.variables_outside_normalisation`
move (normalisation layers stay fixed); a layer with ``w_l = 0`` gets
``d_l = 0``. The model is called with ``training=False`` and its variables are
restored bitwise after every computation.

Plots are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, so they
neither need a display nor change pyplot's global backend.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrobust import weight_space as ws
from tfrobust.errors import UserError, unknown_choice
from tfrobust.flatness import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPS,
    RobustLossEvaluator,
    check_attack_settings,
    evaluation_data,
    progress_bar,
    resolve_step_size,
    worst_case_flatness,
)
from tfrobust.weight_space import DIRECTION_SCALE, rescale_direction

__all__ = [
    "DIRECTION_SCALE",
    "random_direction",
    "adversarial_direction",
    "rescale_direction",
    "landscape_1d",
    "landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "write_landscapes",
]

DEFAULT_LANDSCAPE_STEPS = 10
KINDS = ("random", "adversarial")


def _values(model) -> List[np.ndarray]:
    return [np.asarray(v.numpy()) for v in ws.perturbable_variables(model)]


def random_direction(model, seed: int = 0) -> List[np.ndarray]:
    """A Gaussian direction, one array per perturbable variable, rescaled by :func:`rescale_direction`.

    Deterministic in ``seed`` and independent of the weights' scale before
    the rescaling (Stutz et al., ICCV 2021, random-direction landscapes).
    """
    weights = _values(model)
    if not weights:
        raise UserError("the model has no trainable variables outside normalisation layers (is it built?)")
    return rescale_direction(ws.gaussian_direction(weights, seed), weights)


def adversarial_direction(
    model,
    x,
    y,
    eps: float = DEFAULT_EPS,
    xi: float = 0.00075,
    attempts: int = 1,
    passes: int = 20,
    step_size: Optional[float] = None,
    weight_step: float = 0.01,
    clean: bool = False,
    norm: str = "linf",
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> List[np.ndarray]:
    """The worst-case flatness attack's ``nu`` (Stutz et al., ICCV 2021, (F3)), rescaled by :func:`rescale_direction`.

    Runs :func:`tfrobust.flatness.worst_case_flatness` (joint weight and input
    attack, ``attempts`` restarts, the best kept) and returns its final weight
    perturbation as a direction.
    """
    res = worst_case_flatness(model, x, y, xi=xi, attempts=attempts, passes=passes, eps=eps, step_size=step_size,
                              weight_step=weight_step, clean=clean, norm=norm, seed=seed, batch_size=batch_size,
                              return_perturbations=True, progress=progress, reference_loss=0.0)
    nu = res["perturbations"][res["best_attempt"]]
    return rescale_direction(nu, _values(model))


def _check_direction(direction, variables, name="direction"):
    if len(direction) != len(variables):
        raise UserError(f"{name} has {len(direction)} arrays but the model has {len(variables)} perturbable variables")
    for d, v in zip(direction, variables):
        if tuple(np.shape(d)) != tuple(v.shape):
            raise UserError(f"{name}: shape {tuple(np.shape(d))} does not match variable {v.path} {tuple(v.shape)}")


def _grid(points, s_min, s_max):
    if int(points) < 1:
        raise UserError(f"points must be >= 1, got {points}")
    if int(points) == 1:
        return np.asarray([0.0])
    return np.linspace(float(s_min), float(s_max), int(points))


def _prepare(model, x, y, eps, step_size, steps, restarts, norm):
    """Checked data, the perturbable variables and the resolved step size of a landscape."""
    step_size = resolve_step_size(eps, step_size)
    check_attack_settings(eps, step_size, steps, restarts, norm)
    x, y = evaluation_data(x, y)
    return x, y, ws.built_perturbable_variables(model, x), step_size


def _losses_at(model, x, y, variables, offsets, count, desc, eps, step_size, steps, restarts, norm, batch_size, seed,
               progress, jit):
    """The mean robust and clean loss at ``w + scale * d`` for every ``(d, scale)`` of ``offsets``; ``w`` restored."""
    robust_vals, clean_vals = [], []
    with ws.weights_preserved(model):
        base = ws.snapshot(variables)
        rob = RobustLossEvaluator(model, eps, step_size, steps, restarts, norm, batch_size, seed, True, jit)
        cln = RobustLossEvaluator(model, 0.0, 0.0, 0, 1, norm, batch_size, seed, False, jit)
        bar = progress_bar(count, desc, progress)
        try:
            for d, scale in offsets:
                ws.assign_offset(variables, base, d, scale=scale)
                robust_vals.append(rob.mean(x, y))
                clean_vals.append(cln.mean(x, y))
                bar.update(1)
        finally:
            bar.close()
    return robust_vals, clean_vals


def _settings(x, eps, norm, steps, step_size, restarts, seed):
    return {
        "eps": float(eps),
        "norm": norm,
        "steps": int(steps),
        "step_size": float(step_size),
        "restarts": int(restarts),
        "examples": int(x.shape[0]),
        "seed": int(seed),
    }


def landscape_1d(
    model,
    x,
    y,
    direction: Sequence,
    points: int = 51,
    eps: float = DEFAULT_EPS,
    step_size: Optional[float] = None,
    steps: int = DEFAULT_LANDSCAPE_STEPS,
    restarts: int = 1,
    norm: str = "linf",
    s_min: float = -1.0,
    s_max: float = 1.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    jit: bool = True,
) -> Dict:
    """The robust and clean loss along ``w + s * d`` (Stutz et al., ICCV 2021, 1-D landscapes).

    ``points`` values of ``s`` evenly spaced in ``[s_min, s_max]`` (default
    51 in [-1, 1]); at each, PGD-``steps`` (default 10) is re-run on the
    perturbed model with the same random starts as
    :func:`tfrobust.flatness.robust_loss` with this ``seed`` (so the value at
    ``s = 0`` equals ``robust_loss`` at ``w``). The reference uses the first
    100 test examples. ``step_size=None``: 0.007 at eps = 8/255, the same
    fraction of other eps (:func:`tfrobust.flatness.resolve_step_size`).

    Returns ``{"s", "robust_loss", "clean_loss", "eps", "norm", "steps",
    "step_size", "restarts", "examples", "seed"}`` (JSON-serialisable).
    """
    x, y, variables, step_size = _prepare(model, x, y, eps, step_size, steps, restarts, norm)
    _check_direction(direction, variables)
    s_values = _grid(points, s_min, s_max)
    d = [tf.constant(np.asarray(t)) for t in direction]
    robust_vals, clean_vals = _losses_at(
        model, x, y, variables, ((d, float(s)) for s in s_values), len(s_values), "loss landscape 1-D",
        eps, step_size, steps, restarts, norm, batch_size, seed, progress, jit)
    return {
        "s": [float(s) for s in s_values],
        "robust_loss": robust_vals,
        "clean_loss": clean_vals,
        **_settings(x, eps, norm, steps, step_size, restarts, seed),
    }


def landscape_2d(
    model,
    x,
    y,
    d1: Sequence,
    d2: Sequence,
    points: int = 21,
    eps: float = DEFAULT_EPS,
    step_size: Optional[float] = None,
    steps: int = DEFAULT_LANDSCAPE_STEPS,
    restarts: int = 1,
    norm: str = "linf",
    s_min: float = -1.0,
    s_max: float = 1.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    jit: bool = True,
) -> Dict:
    """The robust and clean loss on the grid ``w + s1 * d1 + s2 * d2`` (Stutz et al., ICCV 2021, 2-D landscapes).

    ``points`` x ``points`` grid over ``[s_min, s_max]^2`` (default 21 x 21:
    each point re-runs PGD, so the 51 points of the 1-D default would cost
    2601 attacks). ``robust_loss[i][j]`` and ``clean_loss[i][j]`` belong to
    ``(s1[i], s2[j])``.
    """
    x, y, variables, step_size = _prepare(model, x, y, eps, step_size, steps, restarts, norm)
    _check_direction(d1, variables, "d1")
    _check_direction(d2, variables, "d2")
    s_values = _grid(points, s_min, s_max)
    a = [np.asarray(t) for t in d1]
    b = [np.asarray(t) for t in d2]
    plane = (([tf.constant(s1 * p + s2 * q) for p, q in zip(a, b)], None) for s1 in s_values for s2 in s_values)
    robust_flat, clean_flat = _losses_at(model, x, y, variables, plane, len(s_values) ** 2, "loss landscape 2-D",
                                         eps, step_size, steps, restarts, norm, batch_size, seed, progress, jit)
    k = len(s_values)
    return {
        "s1": [float(s) for s in s_values],
        "s2": [float(s) for s in s_values],
        "robust_loss": [robust_flat[i * k:(i + 1) * k] for i in range(k)],
        "clean_loss": [clean_flat[i * k:(i + 1) * k] for i in range(k)],
        **_settings(x, eps, norm, steps, step_size, restarts, seed),
    }


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_landscape_1d(result: Dict, path: str, title: Optional[str] = None) -> str:
    """Writes the 1-D landscape of :func:`landscape_1d` as a PNG (robust and clean loss against ``s``)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    s = result["s"]
    label = f"robust loss (PGD-{result.get('steps', '?')}, eps={result.get('eps', 0):.4g})"
    ax.plot(s, result["robust_loss"], label=label, color="tab:red")
    ax.plot(s, result["clean_loss"], label="clean loss", color="tab:blue", linestyle="--")
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("s (weights w + s d)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "Loss landscape along a weight direction")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_landscape_2d(result: Dict, path: str, title: Optional[str] = None) -> str:
    """Writes the 2-D landscape of :func:`landscape_2d` as a PNG (filled contours of robust and clean loss)."""
    fig = _figure(11, 4.5)
    s1 = np.asarray(result["s1"])
    s2 = np.asarray(result["s2"])
    for k, (name, label) in enumerate((("robust_loss", "robust loss"), ("clean_loss", "clean loss"))):
        ax = fig.add_subplot(1, 2, k + 1)
        z = np.asarray(result[name], np.float64)
        if z.shape[0] > 1 and z.shape[1] > 1:
            cs = ax.contourf(s1, s2, z.T, levels=20, cmap="viridis")
        else:
            cs = ax.imshow(z.T, origin="lower", cmap="viridis")
        fig.colorbar(cs, ax=ax, label="cross-entropy loss")
        ax.plot([0.0], [0.0], marker="+", color="white", markersize=10, label="w")
        ax.set_xlabel("s1 (direction d1)")
        ax.set_ylabel("s2 (direction d2)")
        ax.set_title(label)
        ax.legend(loc="upper right")
    fig.suptitle(title or "Loss landscape on a weight plane")
    fig.tight_layout()
    return _save(fig, path)


def write_landscapes(
    model,
    x,
    y,
    out_dir: str,
    eps: float = DEFAULT_EPS,
    kind: Sequence[str] = ("random",),
    two_d: bool = False,
    points: int = 51,
    points_2d: int = 21,
    steps: int = DEFAULT_LANDSCAPE_STEPS,
    step_size: Optional[float] = None,
    restarts: int = 1,
    norm: str = "linf",
    examples: Optional[int] = 100,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    adversarial: Optional[Dict] = None,
    progress: bool = True,
) -> Dict[str, Dict[str, str]]:
    """Computes and writes loss landscapes: ``landscape_<name>.json`` and ``landscape_<name>.png`` in ``out_dir``.

    Uses the first ``examples`` examples (100 in the reference code of Stutz
    et al., ICCV 2021). ``kind`` is any of ``"random"`` (:func:`random_direction`
    with ``seed``) and ``"adversarial"`` (:func:`adversarial_direction`;
    ``adversarial`` passes its settings, e.g. ``{"xi": 0.00075, "attempts":
    1, "passes": 20}``). With ``two_d=True`` also a 2-D landscape per kind:
    ``random_2d`` spans two random directions (seeds ``seed`` and ``seed +
    1``), ``adversarial_2d`` the adversarial and a random direction.

    Returns ``{name: {"json": path, "png": path}}``.
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in KINDS:
            raise unknown_choice("landscape direction", k, KINDS)
    x, y = evaluation_data(x, y)
    if examples is not None:
        if int(examples) < 1:
            raise UserError(f"examples must be >= 1, got {examples}")
        x, y = x[: int(examples)], y[: int(examples)]
    ws.built_perturbable_variables(model, x)
    os.makedirs(out_dir, exist_ok=True)
    common = dict(eps=eps, step_size=step_size, steps=steps, restarts=restarts, norm=norm, seed=seed,
                  batch_size=batch_size, progress=progress)
    paths = {}

    def emit(name, result, plot, title):
        json_path = os.path.join(out_dir, f"landscape_{name}.json")
        png_path = os.path.join(out_dir, f"landscape_{name}.png")
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
        plot(result, png_path, title)
        paths[name] = {"json": json_path, "png": png_path}

    for k in kinds:
        if k == "random":
            d = random_direction(model, seed)
        else:
            settings = dict(adversarial or {})
            d = adversarial_direction(model, x, y, eps=eps, norm=norm, seed=seed, batch_size=batch_size,
                                      progress=progress, **settings)
        res = landscape_1d(model, x, y, d, points=points, **common)
        res["direction"] = k
        emit(k, res, plot_landscape_1d, f"{k} direction: loss along w + s d")
        if two_d:
            d2 = random_direction(model, seed + 1)
            res2 = landscape_2d(model, x, y, d, d2, points=points_2d, **common)
            res2["directions"] = [k, "random"]
            emit(f"{k}_2d", res2, plot_landscape_2d, f"{k} and random direction: loss on w + s1 d1 + s2 d2")
    return paths
