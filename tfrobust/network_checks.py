"""What a network, its labels and its inputs must be, checked before anything is traced.

tfrobust trains and attacks networks with one input (a batch of images
``(N, H, W, C)`` or of feature vectors ``(N, F)``, values in [0, 1]) and one
output (logits ``(N, classes)``), on integer class labels ``(N,)``. Anything
else is refused here with a one-line :class:`~tfrobust.errors.UserError` that
says what is supported, instead of a Keras error deep inside a traced step.

Free of TensorFlow imports: the checks read shapes and numpy arrays only.
"""

from __future__ import annotations

import numpy as np

from tfrobust.errors import UserError

SUPPORTED_IO = ("one input (images (N, H, W, C) or feature vectors (N, F)) and one output "
                "(logits of shape (N, classes))")

# The attacks whose perturbations are drawn as image patches: they need (N, H, W, C) inputs.
IMAGE_ONLY_ATTACKS = ("square",)


def _count(value) -> int:
    if isinstance(value, dict):
        return len(value)
    if isinstance(value, (list, tuple)):
        return len(value)
    return 1


def _io(network, which: str):
    try:
        return getattr(network, which, None)
    except (AttributeError, ValueError):  # a subclassed network that was never called has neither
        return None


def check_network_io(network) -> None:
    """Refuses a Keras network with more than one input or output, or an output that is not (N, classes).

    A network whose inputs and outputs are not known yet (a subclassed model
    never called) passes; its first call is checked where the data is
    (:func:`tfrobust.evaluation.check_model_and_data`).
    """
    inputs, outputs = _io(network, "inputs"), _io(network, "outputs")
    if inputs is None or outputs is None:
        return
    n_in, n_out = _count(inputs), _count(outputs)
    if n_in != 1 or n_out != 1:
        name = getattr(network, "name", "the network")
        raise UserError(f"network {name!r} has {n_in} input{'s' * (n_in != 1)} and {n_out} output"
                        f"{'s' * (n_out != 1)}; tfrobust supports {SUPPORTED_IO}")
    output = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    shape = getattr(output, "shape", None)
    if shape is not None and len(tuple(shape)) != 2:
        raise UserError(f"network {getattr(network, 'name', '')!r} outputs shape {tuple(shape)}; tfrobust "
                        f"supports {SUPPORTED_IO}")


def check_labels(y, num_classes=None) -> np.ndarray:
    """``y`` as int32 class indices of shape (N,), or a one-line UserError.

    One-hot (or probability) labels of shape (N, K) are refused with the fix
    (``y.argmax(axis=-1)``); a (N, 1) column is taken as (N,); whole-number
    floats are taken as integers.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        raise UserError(f"labels of shape {y.shape} look one-hot; tfrobust takes integer class labels of shape "
                        "(N,): pass y.argmax(axis=-1)")
    if y.ndim != 1:
        raise UserError(f"labels must be integer class indices of shape (N,), got shape {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind != "f" or (y.size and not np.all(np.isfinite(y) & (np.mod(y, 1) == 0))):
            raise UserError(f"labels must be integer class indices of shape (N,), got {y.dtype} values")
    if y.size and y.min() < 0:
        raise UserError(f"labels must be class indices >= 0, got {y.min():g}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise UserError(f"the network outputs {num_classes} classes but the labels go up to {int(y.max())}")
    return y.astype(np.int32)


def check_unit_range(x, what: str = "x") -> None:
    """Refuses inputs outside [0, 1] (the attacks clip to [0, 1]), naming the range found and the fix."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise UserError(f"{what} holds {x.dtype} values; tfrobust takes numbers in [0, 1]")
    if not x.size:
        return
    low, high = float(np.min(x)), float(np.max(x))
    if np.isnan(low) or np.isnan(high):
        raise UserError(f"{what} holds NaN values; tfrobust takes numbers in [0, 1]")
    if low < 0 or high > 1:
        fix = ("divide images stored as 0..255 by 255" if high <= 255 and low >= 0
               else "rescale every feature to [0, 1], e.g. (x - min) / (max - min) per feature")
        raise UserError(f"{what} holds values in [{low:g}, {high:g}], outside [0, 1], the range the attacks "
                        f"clip to; {fix}")


def input_kind(x) -> str:
    """``"images"`` for (N, H, W, C), ``"features"`` for (N, F); a UserError for any other shape."""
    shape = tuple(np.shape(x))
    if len(shape) == 4:
        return "images"
    if len(shape) == 2:
        return "features"
    raise UserError(f"x must be images of shape (N, H, W, C) or feature vectors of shape (N, F), got shape {shape}")


def check_attacks_for(kind: str, attacks, ensembles=None) -> None:
    """Refuses the attacks that need images when the inputs are feature vectors.

    ``ensembles`` maps an ensemble's name (``standard``) to its components;
    an ensemble that holds an image-only attack is named with it.
    """
    if kind == "images":
        return
    ensembles = ensembles or {}
    needing = []
    for a in attacks:
        inside = [c for c in ensembles.get(a, ()) if c in IMAGE_ONLY_ATTACKS]
        needing += [f"{c} (in {a})" for c in inside] if inside else ([a] if a in IMAGE_ONLY_ATTACKS else [])
    if needing:
        raise UserError(f"{', '.join(needing)} needs images (N, H, W, C); on feature vectors (N, F) every other "
                        "attack runs, e.g. fgsm, pgd<N>_ce, pgd<N>_cw, apgd_ce, apgd_dlr, apgd_t, fab, fab_t, fast")


__all__ = ["SUPPORTED_IO", "IMAGE_ONLY_ATTACKS", "check_network_io", "check_labels", "check_unit_range",
           "input_kind", "check_attacks_for"]
