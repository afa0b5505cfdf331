"""Published checkpoints into tfrobust networks, and tfrobust networks out as published state dicts.

The Keras networks are tfrobust's own builders (:func:`tfrobust.models.build_model`:
``wide_resnet_swish`` is DeepMind's WideResNet, ``wide_resnet`` Zagoruyko's, ``preact_resnet18``
Rice et al.'s; :mod:`tfrobust.zoo.dm_preact` DeepMind's PreActResNet-18, :mod:`tfrobust.zoo.resnet`
torchvision's ResNets), so an imported network
trains, evaluates and exports like one trained here, and a network trained here exports in the
published names. Layers are paired with the published names in the order the builder created
them (the numbers Keras appends to the layer names), convolutions, BatchNormalizations and the
logits layer each in their own order, as :func:`tfrobust.zoo.names.entries` lists them.

Kernels go from PyTorch's OIHW to Keras' HWIO and dense weights are transposed; BatchNorm's
weight, bias, running mean and variance become gamma, beta, moving mean and variance (epsilon
1e-5 as PyTorch's). An imported ``.keras`` file carries where it came from (checkpoint file,
SHA-256, architecture, normalisation) in a ``tfrobust_provenance.json`` entry of its zip, which
:func:`provenance` reads and ``evaluate`` puts into its report.
"""

from __future__ import annotations

import collections
import json
import os
import re
import zipfile

import numpy as np

from tfrobust.errors import UserError
from tfrobust.zoo import checkpoints, names

PROVENANCE = "tfrobust_provenance.json"
_BUILTIN = {"dm_wide_resnet": "wide_resnet_swish", "wide_resnet": "wide_resnet", "preact_resnet": "preact_resnet18"}


def build_network(arch: "names.Arch", num_classes: int, mean=None, std=None, input_shape=(32, 32, 3)):
    """The Keras network of ``arch`` (random weights), normalising with ``mean``/``std`` inside when given."""
    if arch.family == "dm_preact_resnet":
        from tfrobust.zoo.dm_preact import dm_preact_resnet18

        return dm_preact_resnet18(input_shape, num_classes, mean, std)
    if arch.family == "resnet":
        from tfrobust.zoo.resnet import torchvision_resnet

        return torchvision_resnet(arch.depth, arch.width, input_shape, num_classes, mean, std)
    from tfrobust.models import build_model

    return build_model(_BUILTIN[arch.family], input_shape, num_classes, mean, std,
                       depth=arch.depth, width=arch.width or 10)


def _creation_order(layer) -> int:
    match = re.search(r"_(\d+)$", layer.name)
    return int(match.group(1)) if match else 0


def paired_layers(network, arch: "names.Arch") -> list:
    """``(Entry, layer)`` for every published layer of ``arch`` in ``network``."""
    import keras

    kinds = {"conv": keras.layers.Conv2D, "bn": keras.layers.BatchNormalization, "dense": keras.layers.Dense}
    classes = int(network.output.shape[-1])
    expected = names.entries(arch, classes, int(network.input.shape[-1]))
    pairs = []
    for kind, cls in kinds.items():
        rows = [e for e in expected if e.kind == kind]
        layers = sorted((layer for layer in network.layers if type(layer) is cls), key=_creation_order)
        if len(rows) != len(layers):
            raise UserError(f"network {network.name} has {len(layers)} {cls.__name__} layers, {arch.name} has {len(rows)}")
        pairs += list(zip(rows, layers))
    return pairs


def check_state(state: dict, arch: "names.Arch", num_classes: int, path: str) -> None:
    """One-line UserError for a wrong class count or any missing, unexpected or mis-shaped parameter."""
    expected = names.state_dict_shapes(arch, num_classes)
    head = next(e for e in names.entries(arch, num_classes) if e.kind == "dense").prefix + ".weight"
    if head in state and np.ndim(state[head]) == 2 and state[head].shape[0] != num_classes:
        raise UserError(f"{path}: {head} has {state[head].shape[0]} classes, the data has {num_classes}")
    problems = [f"missing parameter {k} (shape {tuple(s)})" for k, s in expected.items() if k not in state]
    problems += [f"unexpected parameter {k}" for k in state if k not in expected and not names.ignored(k)]
    problems += [f"parameter {k} has shape {tuple(np.shape(state[k]))}, {arch.name} needs {tuple(s)}"
                 for k, s in expected.items() if k in state and tuple(np.shape(state[k])) != tuple(s)]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{path} does not fit {arch.name}: {problems[0]}{more}")


def load_state(network, arch: "names.Arch", state: dict) -> None:
    """Copies a checked published state dict into ``network``."""
    for entry, layer in paired_layers(network, arch):
        p = entry.prefix
        if entry.kind == "conv":
            values = [state[p + ".weight"].transpose(2, 3, 1, 0)]
        elif entry.kind == "bn":
            values = [state[f"{p}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
        else:
            values = [state[p + ".weight"].T, state[p + ".bias"]]
        layer.set_weights([np.asarray(v, np.float32) for v in values])


def state_dict(network, arch: "names.Arch" = None) -> "collections.OrderedDict":
    """``network``'s weights in ``arch``'s published names and PyTorch layout (float32, contiguous)."""
    arch = arch or arch_of(network)
    out = collections.OrderedDict()
    for entry, layer in paired_layers(network, arch):
        weights = [np.asarray(w, np.float32) for w in layer.get_weights()]
        p = entry.prefix
        if entry.kind == "conv":
            out[p + ".weight"] = weights[0].transpose(3, 2, 0, 1)
        elif entry.kind == "bn":
            for key, w in zip(("weight", "bias", "running_mean", "running_var"), weights):
                out[f"{p}.{key}"] = w
        else:
            out[p + ".weight"], out[p + ".bias"] = weights[0].T, weights[1]
    ordered = collections.OrderedDict()
    for key in names.state_dict_shapes(arch, int(network.output.shape[-1]), int(network.input.shape[-1])):
        ordered[key] = np.array(out[key], order="C")
        if key.endswith(".running_var"):  # PyTorch's BatchNorm keeps this buffer; strict loading wants it
            ordered[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return ordered


def arch_of(network) -> "names.Arch":
    """The published architecture of a network tfrobust built (from its name)."""
    name = network.name
    for pattern, family in ((r"wide_resnet_swish_(\d+)_(\d+)$", "dm_wide_resnet"), (r"wide_resnet_(\d+)_(\d+)$", "wide_resnet")):
        match = re.match(pattern, name)
        if match:
            return names.Arch(family, int(match.group(1)), int(match.group(2)))
    if name in ("preact_resnet18", "dm_preact_resnet18"):
        return names.Arch(name[:-2], 18, 0)
    match = re.match(r"(?:resnet(\d+)|wide_resnet(\d+)_(\d+))$", name)
    if match:
        return names.Arch("resnet", int(match.group(1) or match.group(2)), int(match.group(3) or 1))
    raise UserError(f"network {name!r} is none of tfrobust's wide_resnet, wide_resnet_swish, preact_resnet18 or an "
                    "imported network: it has no published names to export to")


def normalisation(network):
    """``(mean, std)`` of the network's normalisation layer, or None."""
    try:
        layer = network.get_layer("normalize")
    except ValueError:
        return None
    mean = np.asarray(layer.mean, np.float64).reshape(-1)
    std = np.sqrt(np.asarray(layer.variance, np.float64).reshape(-1))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]  # float32 as written


def import_model(checkpoint: str, arch: str, data: str = "cifar10", output: str = None, mean=None, std=None,
                 input_shape=None):
    """Builds ``arch`` for ``data``, loads ``checkpoint`` into it and, with ``output``, saves it as a ``.keras`` file.

    ``mean``/``std`` replace the architecture's default normalisation (``std`` alone: mean 0);
    ``mean=()`` turns normalisation off. ``input_shape`` defaults to the data's (32x32 or
    224x224 RGB); torchvision's ResNets take any size. Any mismatch is a one-line UserError.
    """
    spec = names.parse_arch(arch)
    num_classes, default_mean, default_std = names.data_defaults(spec, data)
    if data == "imagenet" and spec.family != "resnet":
        raise UserError(f"--data imagenet: {spec.name} is a CIFAR network; for ImageNet use resnet-50 or wide_resnet-50-2")
    input_shape = tuple(input_shape or ((224, 224, 3) if data == "imagenet" else (32, 32, 3)))
    mean, std = _normalisation_args(mean, std, default_mean, default_std)
    if output is not None:
        from tfrobust.rundir import check_new_file

        if not str(output).endswith(".keras"):
            raise UserError(f"--output {output} must end in .keras")
        check_new_file(output, "--output")
    state = checkpoints.read_state_dict(checkpoint)
    check_state(state, spec, num_classes, checkpoint)
    network = build_network(spec, num_classes, mean, std, input_shape)
    load_state(network, spec, state)
    del state  # a WRN-70-16's arrays are 1 GB: not held while the file is written
    if output is not None:
        record = {"source": os.path.abspath(checkpoint), "sha256": checkpoints.sha256(checkpoint), "arch": spec.name,
                  "format": checkpoints.checkpoint_format(checkpoint), "data": data,
                  "mean": None if mean is None else list(mean), "std": None if std is None else list(std)}
        save(network, output, record)
    return network


def _normalisation_args(mean, std, default_mean, default_std):
    if mean is None and std is None:
        return default_mean, default_std
    if mean is not None and len(mean) == 0:
        return None, None
    mean = [0.0] * len(std) if mean is None else [float(m) for m in mean]
    std = [1.0] * len(mean) if std is None else [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"--mean and --std need 3 values each (one per channel), got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise UserError(f"--std must be > 0, got {std}")
    return mean, std


def save(network, output: str, record: dict) -> None:
    """Writes ``network`` to ``output`` (a new .keras file) with ``record`` as its provenance, atomically."""
    directory, base = os.path.split(os.path.abspath(output))
    temporary = os.path.join(directory, f".{base}.{os.getpid()}.partial.keras")
    try:
        network.save(temporary)
        with zipfile.ZipFile(temporary, "a") as z:
            z.writestr(PROVENANCE, json.dumps(record, indent=2))
        if os.path.exists(output):
            raise UserError(f"output file {output} exists; choose another --output")
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def export_model(source: str, output: str, fmt: str = "pytorch", which: str = "last", arch: str = None) -> dict:
    """Writes the network of a run directory or ``.keras`` file as a published state dict.

    ``fmt`` ``pytorch`` writes ``torch.save``'s zip format (loadable with ``torch.load(...,
    weights_only=True)``), ``safetensors`` a ``.safetensors`` file. Returns what was written:
    the architecture, the tensor count and the normalisation the PyTorch network must apply
    (the state dicts of the published classes do not hold it).
    """
    from tfrobust import loading
    from tfrobust.rundir import check_new_file

    if fmt not in ("pytorch", "safetensors"):
        raise UserError(f"unknown --format {fmt!r}; allowed: pytorch, safetensors")
    check_new_file(output, "--output")
    network = loading.load(source, which).network
    if network is None:
        raise UserError(f"{source} is a SavedModel: export a run directory or a .keras file (they keep the layers)")
    spec = names.parse_arch(arch) if arch else arch_of(network)
    state = state_dict(network, spec)
    directory, base = os.path.split(os.path.abspath(output))
    temporary = os.path.join(directory, f".{base}.{os.getpid()}.partial")
    try:
        if fmt == "pytorch":
            from tfrobust.zoo.pickles import write_torch

            write_torch(state, temporary)
        else:
            from safetensors.numpy import save_file

            save_file(dict(state), temporary)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return {"arch": spec.name, "tensors": len(state), "normalisation": normalisation(network)}


def provenance(path: str):
    """The provenance recorded in an imported ``.keras`` file, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            if PROVENANCE not in z.namelist():
                return None
            return json.loads(z.read(PROVENANCE))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


__all__ = ["build_network", "paired_layers", "check_state", "load_state", "state_dict", "arch_of", "normalisation",
           "import_model", "export_model", "save", "provenance", "PROVENANCE"]
