"""Released checkpoints as flat state dicts: published PyTorch name -> numpy array in PyTorch's layout.

Formats: ``.safetensors`` (the ``safetensors`` library), PyTorch ``.pt``/``.pth``/``.bin``/``.ckpt``
(read by :mod:`tfrobust.zoo.pickles`, no PyTorch needed) and DeepMind's ``.npy`` (a pickled
``(params, state)`` pair of Haiku names, renamed here to RobustBench's ``DMWideResNet`` names).

The wrappers releases use are taken off: a dict holding ``state_dict``, ``model_state_dict`` or
``model``, and a ``module.`` (DataParallel) or ``model.`` prefix on every name.
"""

from __future__ import annotations

import os
import re

import numpy as np

from tfrobust.errors import UserError
from tfrobust.rundir import sha256_of
from tfrobust.zoo import pickles

WRAPPERS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "model.")


def sha256(path: str) -> str:
    return sha256_of(path)


def checkpoint_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext == ".npy":
        return "deepmind_npy"
    return "pytorch"


def read_state_dict(path: str) -> dict:
    """The state dict in ``path``: published name -> numpy array (PyTorch layout), wrappers and prefixes removed."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        state = _read_safetensors(path)
    elif fmt == "deepmind_npy":
        state = haiku_to_published(pickles.read_npy(path), path)
    else:
        state = _unwrap(pickles.read_torch(path), path)
    return _strip_prefixes(state)


def _read_safetensors(path: str) -> dict:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except Exception as e:  # the library raises its own error types for a damaged header
        raise UserError(f"{path} cannot be read as safetensors ({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None


def _unwrap(obj, path: str) -> dict:
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, np.ndarray) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise UserError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; expected a state dict "
                            f"(or one inside {', '.join(WRAPPERS)})")
    return dict(obj)


def _strip_prefixes(state: dict) -> dict:
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(str(k).startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


_HAIKU_BLOCK = re.compile(r"^resnet_lay_(\d+)_block_(\d+)/~/(batchnorm_\d|conv_\d|shortcut)$")


def _published_module(module: str):
    """A Haiku module path (``wide_res_net/~/resnet_lay_0_block_1/~/conv_0``) -> its DMWideResNet name, or None."""
    parts = module.split("/~/")
    local = "/~/".join(parts[1:]) if len(parts) > 1 else module
    match = _HAIKU_BLOCK.match(local)
    if match:
        return f"layer.{match.group(1)}.block.{match.group(2)}.{match.group(3)}"
    return local if local in ("init_conv", "batchnorm", "logits") else None


def haiku_to_published(content, path: str) -> dict:
    """DeepMind's ``(params, state)`` (Haiku names, HWIO kernels) as a DMWideResNet state dict."""
    if not (isinstance(content, (list, tuple)) and len(content) == 2 and all(isinstance(c, dict) for c in content)):
        raise UserError(f"{path}: expected a pickled (params, state) pair of dicts, as DeepMind's checkpoints hold")
    params, state = content
    out = {}
    for module, values in params.items():
        name = _published_module(str(module))
        if name is None or not isinstance(values, dict):
            raise UserError(f"{path}: unexpected parameter {module}")
        for key, value in values.items():
            value = np.asarray(value)
            if key == "w" and value.ndim == 4:
                out[name + ".weight"] = value.transpose(3, 2, 0, 1)
            elif key == "w" and value.ndim == 2:
                out[name + ".weight"] = value.T
            elif key in ("b", "offset"):
                out[name + ".bias"] = value.reshape(-1)
            elif key == "scale":
                out[name + ".weight"] = value.reshape(-1)
            else:
                raise UserError(f"{path}: unexpected parameter {module}/{key}")
    for module, values in state.items():
        bn, _, stat = str(module).rpartition("/~/")
        name = _published_module(bn)
        if name is None or stat not in ("mean_ema", "var_ema") or "average" not in values:
            raise UserError(f"{path}: unexpected state {module}")
        key = "running_mean" if stat == "mean_ema" else "running_var"
        out[f"{name}.{key}"] = np.asarray(values["average"]).reshape(-1)
    return out


__all__ = ["read_state_dict", "haiku_to_published", "checkpoint_format", "sha256", "WRAPPERS", "PREFIXES"]
