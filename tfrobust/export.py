"""SavedModel export of a network: one ``serve`` endpoint from ``images`` to ``logits``.

The endpoint takes a float32 batch of images in [0, 1] (named ``images``,
any batch size) and returns ``{"logits": float32 (batch, classes)}``; it is
also the SavedModel's ``serving_default``. TensorFlow Serving, ``tf.saved_model.load``
and ``tfrobust evaluate --model DIR`` read it.

At the end of a training run :func:`save_networks` writes the last and best
networks of a run directory both as ``.keras`` files and as such SavedModels.
"""

from __future__ import annotations

import errno
import os

import keras
import tensorflow as tf

from tfrobust import rundir
from tfrobust.errors import UserError

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def input_shape_of(network):
    """The input shape (without batch) of a built network, or None when it is not known."""
    inputs = getattr(network, "inputs", None)
    try:
        if inputs:
            shape = tuple(inputs[0].shape[1:])
        else:
            build = network.get_build_config() or {}
            shape = build.get("input_shape")
            shape = tuple(shape[1:]) if shape is not None else None
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    if not shape or any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)


def export_network(network, path: str, input_shape=None) -> None:
    """Writes ``network`` to ``path`` as a SavedModel whose ``serve`` endpoint maps ``images`` to ``logits``.

    ``input_shape`` (without batch) defaults to the network's own. Raises
    UserError when neither is known.
    """
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(network)
    if shape is None:
        raise UserError("export needs the network's input shape: call the model on a batch first, or pass input_shape")
    archive = keras.export.ExportArchive()
    archive.track(network)

    def serve(images):
        return {OUTPUT_NAME: tf.cast(network(images, training=False), tf.float32)}

    archive.add_endpoint(
        "serve", serve, input_signature=[tf.TensorSpec((None,) + shape, tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(path, verbose=False)


def save_networks(model, workdir: str, has_best: bool, check_best=None) -> None:
    """Saves the last (and best) network of a RobustModel into ``workdir`` as .keras and as SavedModel.

    Each file is written under a temporary name and renamed into place, so a
    failed or killed save leaves the previous complete file (or none). With
    weight averaging these are the averaged networks; the live (not averaged)
    last network is also saved, as ``model_live.keras``. ``check_best(path)``
    is called before the best checkpoint is read (it raises when the file is damaged).
    """
    network = model.evaluated_network()
    save_network(network, workdir, "model.keras", "saved_model")
    if network is not model.network:
        with rundir.atomic_path(os.path.join(workdir, "model_live.keras")) as partial:
            model.network.save(partial)
    best = os.path.join(workdir, "checkpoints", "best.weights.h5")
    if has_best and os.path.exists(best):
        if check_best is not None:
            check_best(best)
        last = [v.numpy() for v in model.weights]
        model.load_weights(best)
        try:
            save_network(model.evaluated_network(), workdir, "best.keras", "saved_model_best")
        finally:
            for v, value in zip(model.weights, last):
                v.assign(value)


def save_network(network, workdir: str, keras_name: str, export_name: str) -> None:
    """Writes ``network`` to ``workdir/keras_name`` and exports it to the directory ``workdir/export_name``.

    The free space is checked first (the .keras file and the SavedModel each
    hold the weights): a full disk is an OSError(ENOSPC) naming the directory,
    also when TensorFlow's SavedModel writer is the one that finds it.
    """
    rundir.check_free_space(os.path.join(workdir, keras_name),
                            2 * (rundir.variables_nbytes(network.weights) + rundir.FILE_OVERHEAD_BYTES))
    with rundir.atomic_path(os.path.join(workdir, keras_name)) as partial:
        network.save(partial)
    rundir.atomic_replace_dir(os.path.join(workdir, export_name), lambda path: _export_to(network, path))


def _export_to(network, path: str) -> None:
    try:
        export_network(network, path)
    except tf.errors.ResourceExhaustedError as e:  # SaveV2 on a full disk
        if "No space left" not in str(e):
            raise
        raise OSError(errno.ENOSPC, "No space left on device", os.path.dirname(os.path.abspath(path))) from None


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "input_shape_of", "export_network", "save_networks", "save_network"]
