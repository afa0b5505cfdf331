"""Loading a model to evaluate: a tfrobust run directory, a SavedModel or a .keras file.

Every form gives a ``model_fn`` that maps float32 NHWC images in [0, 1] to
float32 logits; a run directory and a .keras file also give the Keras
network (needed where weights are perturbed, e.g. flatness).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Optional

import tensorflow as tf
import yaml

from tfrobust import rundir, user_code
from tfrobust.errors import UserError


@dataclasses.dataclass
class LoadedModel:
    path: str
    model_fn: Callable
    network: Optional[object] = None  # a keras.Model when available
    run_config: Optional[dict] = None  # the run's config.yaml, for run directories

    def checksum(self) -> str:
        """The sha256 of the network's weights; for a SavedModel, of its files (graph and variables)."""
        if self.network is not None:
            return rundir.weights_checksum(self.network.weights)
        digest = hashlib.sha256()
        for base, dirs, names in sorted(os.walk(self.path)):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(base, name)
                digest.update(os.path.relpath(path, self.path).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
        return digest.hexdigest()


def _keras(path: str):
    import keras

    try:
        return keras.saving.load_model(path)
    except Exception as e:  # a corrupt or foreign file raises many kinds (ValueError, OSError, zipfile errors)
        reason = _first_line(e)
        if "Could not locate class" in reason:
            reason = (reason.split(". ")[0] + ": import the module that defines it first (--plugin MODULE on the "
                      "command line)")
        raise UserError(f"{path} cannot be loaded as a Keras model: {reason}") from None


def _network(model):
    """The network a loaded model is evaluated as: a saved RobustModel's evaluated network (averaged, if any)."""
    evaluated = getattr(model, "evaluated_network", None)
    return evaluated() if callable(evaluated) else model


def _first_line(e: Exception) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def load(path: str, which: str = "last") -> LoadedModel:
    """Loads ``path``; for a run directory ``which`` is "last" or "best"."""
    if not os.path.exists(path):
        raise UserError(f"model not found: {path}")
    if os.path.isfile(path):
        if not path.endswith(".keras"):
            raise UserError(f"{path} is a file but not a .keras model; pass a run directory, a SavedModel directory or a .keras file")
        network = _network(_keras(path))
        return LoadedModel(path, lambda x: tf.cast(network(x, training=False), tf.float32), network)
    config_path = os.path.join(path, "config.yaml")
    if os.path.exists(config_path):
        with open(config_path) as f:
            run_config = yaml.safe_load(f)
        name = "best.keras" if which == "best" else "model.keras"
        keras_path = os.path.join(path, name)
        if not os.path.exists(keras_path):
            raise UserError(f"run directory {path} has no {name}: the run has not finished; rerun its training command to resume it")
        recorded = (rundir.finished(path).get("networks") or {}).get(name)
        if recorded and rundir.sha256_of(keras_path) != recorded:
            raise UserError(f"{keras_path} differs from the network recorded in {rundir.FINISHED} (its sha256 changed "
                            f"since the run finished); to evaluate the file as it is, pass --model {keras_path}")
        user_code.import_recorded(path)
        network = _network(_keras(keras_path))
        return LoadedModel(path, lambda x: tf.cast(network(x, training=False), tf.float32), network, run_config)
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        try:
            loaded = tf.saved_model.load(path)
        except Exception as e:  # a corrupt SavedModel raises many kinds
            raise UserError(f"{path} cannot be loaded as a SavedModel: {_first_line(e)}") from None
        if "serve" in getattr(loaded, "signatures", {}) or hasattr(loaded, "serve"):
            serve = loaded.serve if hasattr(loaded, "serve") else loaded.signatures["serve"]
        elif "serving_default" in loaded.signatures:
            serve = loaded.signatures["serving_default"]
        else:
            raise UserError(f"SavedModel {path} has no serve or serving_default endpoint")

        def model_fn(x, serve=serve, loaded=loaded):
            # ``loaded`` is kept alive here: its variables die with it.
            out = serve(x)
            if isinstance(out, dict):
                out = next(iter(out.values()))
            return tf.cast(out, tf.float32)

        return LoadedModel(path, model_fn, None)
    raise UserError(f"{path} is neither a tfrobust run directory, a SavedModel nor a .keras file")


def check_compatible(loaded: LoadedModel, x, y) -> None:
    """Refuses, with a one-line UserError, a model that cannot classify these images and labels."""
    import numpy as np

    if len(x) == 0:
        raise UserError("the data has no test examples")
    try:
        out = loaded.model_fn(tf.constant(x[:1]))
    except Exception as e:  # a shape mismatch surfaces as several exception types
        raise UserError(
            f"model {loaded.path} does not accept images of shape {tuple(x.shape[1:])} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if len(out.shape) != 2 or int(out.shape[-1]) <= int(np.max(y)):
        raise UserError(
            f"model {loaded.path} outputs shape {tuple(out.shape)}, but the data has labels up to {int(np.max(y))}"
        )


def evaluation_settings(loaded: LoadedModel, data=None, eps=None, norm=None, data_dir=None) -> dict:
    """Data set and threat model: command line first, then the run's config, then defaults.

    The default eps is :func:`tfrobust.config.default_eps` of the data, the
    rule training uses; ``eps_source`` says where eps came from.
    """
    from tfrobust.config import default_eps

    cfg = loaded.run_config or {}
    data = data or cfg.get("data", {}).get("name") or "fashion_mnist"
    data_dir = data_dir or cfg.get("data", {}).get("data_dir")
    source = "--eps"
    if eps is None:
        eps, source = cfg.get("attack", {}).get("eps"), "the run's attack.eps"
    if eps is None:
        eps, source = default_eps(data), f"the default for {data} (0.1 for mnist and fashion_mnist, 8/255 otherwise)"
    norm = norm or cfg.get("attack", {}).get("norm") or "linf"
    return {"data": data, "data_dir": data_dir, "eps": float(eps), "norm": norm, "eps_source": source}


__all__ = ["LoadedModel", "load", "check_compatible", "evaluation_settings"]
