"""Weight space: which variables a method moves, how a move is drawn, bounded, applied and undone.

The methods of tfrobust that perturb a network's weights rather than its
inputs choose the variables they perturb and draw their perturbations here:
the flatness measures and loss landscapes of Stutz, Hein and Schiele (ICCV
2021), adversarial weight perturbation (AWP; Wu, Xia and Wang, NeurIPS 2020)
and randomized adversarial training (RAT; Jin et al., CVPR 2023). The flatness
measures, the landscapes and the train step (:mod:`tfrobust.trainer`) also
apply and restore their perturbations with this module. The mathematics that
is particular to one paper (AWP's ascent step, RAT's Taylor terms) stays in
:mod:`tfrobust.defenses.awp` and :mod:`tfrobust.defenses.rat`.

Which variables (one selection rule per paper, named after the rule):
  - :func:`variables_outside_normalisation` (Stutz et al.; flatness and
    landscapes): every trainable variable, kernels and biases separately,
    except those of normalisation layers. Also available as
    :func:`perturbable_variables`; :func:`built_perturbable_variables` builds
    the model first (:func:`ensure_built`) and refuses a model with none.
  - :func:`conv_and_dense_kernels` (AWP): variables of rank >= 2.
  - :func:`conv_kernels` (RAT): variables of rank >= 3.

Drawing perturbations (all stateless: a draw is a function of its seed,
:func:`tfrobust.seeds.flatness_seed` with one of its ``STREAM_*`` streams):
  - :func:`sample_sphere_perturbation`, :func:`sample_ball_perturbation`:
    relative (scale-invariant) perturbations, ``||nu_l|| = xi ||w_l||`` and
    ``||nu_l|| <= xi ||w_l||``.
  - :func:`gaussian_noise`: RAT's absolute noise ``u_l ~ N(0, sigma^2)``.
  - :func:`gaussian_direction` and :func:`rescale_direction`: the landscapes'
    directions, rescaled so that ``max|d_l| = 0.5 max|w_l|``.
  - :func:`relative_gradient_step`: the worst-case flatness attack's
    normalised step ``step * ||w_l|| * g_l / ||g_l||``.

Bounding: :func:`project_perturbation` (per layer onto
``||nu_l|| <= xi ||w_l||``), :func:`project_layer`, :func:`l2_norm`.

Applying and undoing: :func:`snapshot` and :func:`restore` (exact copies of
variable values), :func:`assign_offset` (``v <- w + s * d``) and
:func:`weights_preserved` (a context manager that restores every variable of a
model bitwise on exit, also after an exception, for eager measurements).
:func:`snapshot`, :func:`restore` and :func:`assign_offset` also work inside
``tf.function`` (a train step).
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfrobust.errors import UserError
from tfrobust.seeds import STREAM_AVERAGE, STREAM_DIRECTION, STREAM_WORST_NU, flatness_seed

__all__ = [
    "NORMALISATION_LAYER_NAMES",
    "output_dense_layer",
    "DIRECTION_SCALE",
    "variables_outside_normalisation",
    "perturbable_variables",
    "ensure_built",
    "built_perturbable_variables",
    "conv_and_dense_kernels",
    "conv_kernels",
    "l2_norm",
    "sample_sphere_perturbation",
    "sample_ball_perturbation",
    "gaussian_noise",
    "gaussian_direction",
    "rescale_direction",
    "relative_gradient_step",
    "project_layer",
    "project_perturbation",
    "snapshot",
    "restore",
    "assign_offset",
    "weights_preserved",
]

# Keras layer classes whose variables the flatness measures never perturb.
NORMALISATION_LAYER_NAMES = (
    "BatchNormalization",
    "SyncBatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "UnitNormalization",
    "RMSNormalization",
    "Normalization",
)

# Landscape directions: max|d_l| = DIRECTION_SCALE * max|w_l| (Stutz et al., ICCV 2021).
DIRECTION_SCALE = 0.5


# ---------------------------------------------------------------------------
# Which variables
# ---------------------------------------------------------------------------


def _normalisation_types():
    return tuple(getattr(keras.layers, n) for n in NORMALISATION_LAYER_NAMES if hasattr(keras.layers, n))


def _sublayers(model):
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=True, recursive=True))
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
    return found


def variables_outside_normalisation(model) -> list:
    """The variables that the flatness measures and landscapes perturb (Stutz et al., ICCV 2021).

    Every trainable variable of ``model`` (kernels and biases, each its own
    "layer" ``w_l``) except the variables of normalisation layers
    (:data:`NORMALISATION_LAYER_NAMES`: BatchNormalization, LayerNormalization,
    GroupNormalization, UnitNormalization, RMSNormalization and keras'
    ``Normalization``), as in the paper's reference code. The order is that of
    ``model.trainable_variables``.
    """
    norm_types = _normalisation_types()
    excluded = set()
    for layer in _sublayers(model):
        if isinstance(layer, norm_types):
            for v in layer.variables:
                excluded.add(id(v))
    return [v for v in model.trainable_variables if id(v) not in excluded]


# The flatness measures' name for the rule above (tfrobust.flatness.perturbable_variables).
perturbable_variables = variables_outside_normalisation


def ensure_built(model, x) -> None:
    """Builds ``model`` by calling it on ``x[:1]`` (``training=False``) if it has no variables yet.

    Refuses a :class:`~tfrobust.trainer.RobustModel` with weight averaging:
    its inference calls use the averaged network while its trainable (and so
    perturbed) variables are the live network's; pass ``model.network``.
    """
    if getattr(model, "averaged_network", None) is not None:
        raise UserError(
            "this RobustModel averages its weights, so its inference network is not the one whose weights are "
            "perturbed: pass model.network (the live network)"
        )
    if not getattr(model, "built", True) or not model.trainable_variables:
        model(x[:1], training=False)


def built_perturbable_variables(model, x) -> list:
    """:func:`variables_outside_normalisation` of ``model``, after :func:`ensure_built`.

    Raises ``UserError`` when the model has no such variable.
    """
    ensure_built(model, x)
    variables = variables_outside_normalisation(model)
    if not variables:
        raise UserError("the model has no trainable variables outside normalisation layers")
    return variables


def conv_and_dense_kernels(variables) -> list:
    """The variables AWP perturbs (Wu et al., NeurIPS 2020): rank >= 2, the kernels of convolution and dense layers.

    Biases and normalisation parameters (rank 1) are never perturbed, as in the
    reference code. The order of ``variables`` is kept.
    """
    return [v for v in variables if len(v.shape) >= 2]


def conv_kernels(variables) -> list:
    """The variables RAT randomises (Jin et al., CVPR 2023): rank >= 3, the convolution kernels.

    Dense kernels, biases and normalisation parameters keep their values, as in
    the reference code. The order of ``variables`` is kept.
    """
    return [v for v in variables if len(v.shape) >= 3]


def _output_layer(network):
    """The layer whose output is ``network``'s output, entering nested models; None for a subclassed network."""
    layers = getattr(network, "layers", None)
    if isinstance(network, keras.Sequential) and layers:
        last = layers[-1]
    else:
        outputs = getattr(network, "outputs", None) if isinstance(network, keras.Model) else None
        if not outputs or len(outputs) != 1:
            return None
        history = getattr(outputs[0], "_keras_history", None)  # (layer, node, tensor) that made the output
        last = getattr(history, "operation", None)
        if last is None:
            return None
    if isinstance(last, keras.Model):
        return _output_layer(last) or last
    return last


def output_dense_layer(network, classes: int, purpose: str):
    """The Dense layer that computes ``network``'s logits (``W``, ``b`` of ``f(x) = h W + b``), nested models included.

    For a functional or Sequential network (also a backbone nested in a
    wrapper model), the layer that produces the output, followed back through
    nested models. For a subclassed network, whose graph is not recorded, the
    one Dense layer among all nested layers with ``classes`` units.

    Raises:
      UserError: (one line, naming ``purpose``) the output does not come from
        a Dense layer, or a subclassed network has no or several candidates.
    """
    layer = _output_layer(network)
    if isinstance(layer, keras.layers.Dense):
        return layer
    if layer is not None and not isinstance(layer, keras.Model):
        raise UserError(
            f"{purpose} needs the logits to come straight from a Dense layer; this network's output comes from "
            f"layer {layer.name!r} ({type(layer).__name__})"
        )
    inner = layer if layer is not None else network  # a subclassed network, perhaps nested in a functional one
    candidates = [l for l in _sublayers(inner) if isinstance(l, keras.layers.Dense) and l.units == int(classes)]
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(repr(l.name) for l in candidates) or "none"
    raise UserError(
        f"{purpose} needs the Dense layer that computes the logits; in this subclassed network the Dense layers with "
        f"{classes} units are: {found} (build the network with the functional API, or keep exactly one)"
    )


# ---------------------------------------------------------------------------
# Drawing perturbations
# ---------------------------------------------------------------------------


def l2_norm(t) -> tf.Tensor:
    """``||t||_2`` over all entries, in float32."""
    return tf.sqrt(tf.reduce_sum(tf.square(tf.cast(t, tf.float32))))


def sample_sphere_perturbation(weights: Sequence, xi: float, seed=0, sample: int = 0) -> List[tf.Tensor]:
    """Samples ``nu`` uniformly on the per-layer sphere ``||nu_l||_2 = xi * ||w_l||_2``.

    Stutz et al., ICCV 2021, (F2): the direction of every layer is a standard
    Gaussian normalised to unit L2 norm (uniform on the sphere), drawn
    independently of the weights' scale, then scaled to ``xi * ||w_l||_2``.
    Layers with ``w_l = 0`` get ``nu_l = 0``.

    Args:
      weights: the values ``w_l`` (tensors or arrays), one per layer.
      xi: the relative radius.
      seed, sample: the draw is a deterministic function of ``(seed, sample)``
        (stream :data:`tfrobust.seeds.STREAM_AVERAGE`).

    Returns:
      One tensor per layer, with the shape and dtype of ``w_l``.
    """
    out = []
    for i, w in enumerate(weights):
        w = tf.convert_to_tensor(w)
        g = tf.random.stateless_normal(tf.shape(w), flatness_seed(seed, STREAM_AVERAGE, sample, i), dtype=tf.float32)
        scale = tf.cast(xi, tf.float32) * l2_norm(w) / tf.maximum(l2_norm(g), 1e-30)
        out.append(tf.cast(g * scale, w.dtype))
    return out


def sample_ball_perturbation(weights: Sequence, xi: float, seed=0, attempt: int = 0) -> List[tf.Tensor]:
    """The start of the worst-case weight attack (Stutz et al., ICCV 2021, (F3)).

    Per layer, a uniform direction (normalised Gaussian) with radius drawn
    uniformly from ``[0, xi * ||w_l||_2]`` (the reference's "uniform norm"
    initialisation). Deterministic in ``(seed, attempt)`` (stream
    :data:`tfrobust.seeds.STREAM_WORST_NU`).
    """
    out = []
    for i, w in enumerate(weights):
        w = tf.convert_to_tensor(w)
        s = flatness_seed(seed, STREAM_WORST_NU, attempt, i)
        g = tf.random.stateless_normal(tf.shape(w), s, dtype=tf.float32)
        u = tf.random.stateless_uniform([], s + 1, 0.0, 1.0, dtype=tf.float32)
        scale = u * tf.cast(xi, tf.float32) * l2_norm(w) / tf.maximum(l2_norm(g), 1e-30)
        out.append(tf.cast(g * scale, w.dtype))
    return out


def gaussian_noise(variables, sigma, seed) -> List[tf.Tensor]:
    """RAT's weight noise (Jin et al., CVPR 2023): ``u_l ~ N(0, sigma^2)`` for every variable, absolute scale.

    ``seed`` is a shape-[2] integer tensor (stateless sampling, usable inside
    ``tf.function``); each variable gets its own stream split from it. The
    noise has the shape and dtype of each variable.
    """
    import tensorflow_probability as tfp

    normal = tfp.distributions.Normal(loc=0.0, scale=tf.cast(sigma, tf.float32))
    seeds = tfp.random.split_seed(tf.cast(seed, tf.int32), n=max(len(variables), 1))
    return [tf.cast(normal.sample(v.shape, seed=seeds[i]), v.dtype) for i, v in enumerate(variables)]


def gaussian_direction(weights: Sequence, seed: int = 0) -> List[np.ndarray]:
    """A standard Gaussian direction, one array of float32 per layer shaped like ``w_l`` (not yet rescaled).

    Deterministic in ``seed`` (stream :data:`tfrobust.seeds.STREAM_DIRECTION`) and independent
    of the weights' values; :func:`rescale_direction` makes it scale-invariant.
    """
    return [tf.random.stateless_normal(np.shape(w), flatness_seed(seed, STREAM_DIRECTION, i),
                                       dtype=tf.float32).numpy()
            for i, w in enumerate(weights)]


def rescale_direction(direction: Sequence, weights: Sequence, scale: float = DIRECTION_SCALE) -> List[np.ndarray]:
    """Rescales every ``d_l`` so that ``max|d_l| = scale * max|w_l|`` (Stutz et al., ICCV 2021, landscapes).

    A layer with ``d_l = 0`` or ``w_l = 0`` gets ``d_l = 0``. The result has
    the dtype of ``w_l``.
    """
    out = []
    for d, w in zip(direction, weights):
        d = np.asarray(d)
        w = np.asarray(w)
        d_max = float(np.max(np.abs(d))) if d.size else 0.0
        w_max = float(np.max(np.abs(w))) if w.size else 0.0
        if d_max == 0.0 or w_max == 0.0:
            out.append(np.zeros_like(w))
        else:
            out.append((d.astype(np.float64) * (scale * w_max / d_max)).astype(w.dtype))
    return out


def relative_gradient_step(gradient, weight_norm, step) -> tf.Tensor:
    """``step * ||w_l|| * g_l / ||g_l||`` in float32, zero where ``g_l = 0`` (worst-case flatness, (F3)).

    The scale-invariant ascent step of the worst-case weight attack of Stutz et
    al. (ICCV 2021): its size is relative to the layer's norm ``weight_norm``.
    AWP's one-step version, with the reference's ``1e-20`` in the denominator,
    is :func:`tfrobust.defenses.awp.adversarial_weight_perturbation`.
    """
    g = tf.cast(tf.convert_to_tensor(gradient), tf.float32)
    g_norm = l2_norm(g)
    return tf.where(g_norm > 0, step * weight_norm * g / tf.maximum(g_norm, 1e-30), tf.zeros_like(g))


# ---------------------------------------------------------------------------
# Bounding
# ---------------------------------------------------------------------------


def project_layer(nu, radius) -> tf.Tensor:
    """``nu`` scaled onto the L2 ball of radius ``radius`` (unchanged inside it), in ``nu``'s dtype."""
    n = l2_norm(nu)
    factor = tf.minimum(1.0, radius / tf.maximum(n, 1e-30))
    return tf.cast(tf.cast(nu, tf.float32) * factor, nu.dtype)


def project_perturbation(perturbation: Sequence, weights: Sequence, xi: float) -> List[tf.Tensor]:
    """Projects every ``nu_l`` onto the L2 ball of radius ``xi * ||w_l||_2`` (Stutz et al., ICCV 2021, (F3))."""
    out = []
    for nu, w in zip(perturbation, weights):
        nu = tf.convert_to_tensor(nu)
        out.append(project_layer(nu, tf.cast(xi, tf.float32) * l2_norm(w)))
    return out


# ---------------------------------------------------------------------------
# Applying and undoing
# ---------------------------------------------------------------------------


def snapshot(variables) -> List[tf.Tensor]:
    """Exact copies of the current values of ``variables`` (for :func:`restore`)."""
    return [tf.identity(v.value) for v in variables]


def restore(variables, values) -> None:
    """Assigns ``values`` (from :func:`snapshot`) back to ``variables``, bitwise."""
    for v, value in zip(variables, values):
        v.assign(value)


def assign_offset(variables, base, offsets, scale: Optional[float] = None) -> None:
    """Sets every variable to ``w_l + d_l`` (or ``w_l + scale * d_l``), with ``base`` the unperturbed values ``w_l``.

    ``d_l`` and ``scale`` are cast to the dtype of ``w_l``. Assigning from a
    :func:`snapshot` rather than adding to the variable keeps repeated
    perturbations from accumulating rounding errors.
    """
    for v, w, d in zip(variables, base, offsets):
        if scale is None:
            v.assign(w + tf.cast(d, w.dtype))
        else:
            v.assign(w + tf.cast(scale, w.dtype) * tf.cast(d, w.dtype))


@contextlib.contextmanager
def weights_preserved(model):
    """Saves every variable of ``model`` (trainable or not) and restores it bitwise on exit, also after an exception."""
    variables = list(model.variables)
    saved = snapshot(variables)
    try:
        yield
    finally:
        restore(variables, saved)
