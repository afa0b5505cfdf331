"""The published architectures' names: ``--arch`` parsing, default normalisation, and every
parameter of a network in its published (PyTorch state dict) name and shape.

No TensorFlow here: the parameter counts of full-size networks come from these shapes alone.

A network is listed as :class:`Entry` rows in the order the Keras builders create the layers
(convolutions, BatchNormalizations and the final dense layer each in their own order), which is
how :mod:`tfrobust.zoo.convert` pairs the published names with the layers of a built network.
"""

from __future__ import annotations

import collections
import dataclasses
import re

from tfrobust.errors import UserError

# Published per-channel statistics (CIFAR-10 and CIFAR-100 as in DeepMind's and RobustBench's
# code; ImageNet as torchvision's). Each family says which it uses by default.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATA = {"cifar10": (10, CIFAR10_MEAN, CIFAR10_STD), "cifar100": (100, CIFAR100_MEAN, CIFAR100_STD),
        "imagenet": (1000, IMAGENET_MEAN, IMAGENET_STD)}

# family -> (help, whether it normalises by default, its --arch pattern)
FAMILIES = {
    "dm_wide_resnet": ("DeepMind's SiLU WideResNet (RobustBench DMWideResNet), e.g. dm_wide_resnet-70-16", True),
    "dm_preact_resnet": ("DeepMind's SiLU PreActResNet-18 (RobustBench DMPreActResNet)", True),
    "wide_resnet": ("Zagoruyko's ReLU WideResNet as released with TRADES, MART, AWP, e.g. wide_resnet-34-10", False),
    "preact_resnet": ("the ReLU PreActResNet-18 of Rice et al. and AWP", True),
    "resnet": ("torchvision's ResNet-50/101/152 and WideResNet-50-2/101-2 (ImageNet)", True),
}
ARCH_HELP = ("dm_wide_resnet-D-W, wide_resnet-D-W, preact_resnet-18, dm_preact_resnet-18, resnet-50 (101, 152), "
             "wide_resnet-50-2 (101-2)")
# torchvision's bottleneck ResNets: depth -> blocks per stage
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# Entries a released state dict may hold that no network uses (TRADES' WideResNet keeps an unused
# copy of its first block group as sub_block1; BatchNorm counts its batches).
IGNORED = (re.compile(r"(^|\.)num_batches_tracked$"), re.compile(r"^sub_block1\."))


@dataclasses.dataclass(frozen=True)
class Arch:
    family: str
    depth: int
    width: int

    @property
    def name(self) -> str:
        if self.family == "resnet":
            return f"resnet-{self.depth}" if self.width == 1 else f"wide_resnet-{self.depth}-{self.width}"
        if self.family in ("preact_resnet", "dm_preact_resnet"):
            return f"{self.family}-{self.depth}"
        return f"{self.family}-{self.depth}-{self.width}"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One layer: ``kind`` conv (``shape`` OIHW), bn (``shape`` (C,)) or dense (``shape`` (out, in)), at ``prefix``."""
    kind: str
    prefix: str
    shape: tuple


def parse_arch(name: str) -> Arch:
    """``dm_wide_resnet-28-10`` -> Arch; a one-line UserError for anything else."""
    text = str(name).strip()
    family, _, rest = text.partition("-")
    numbers = rest.split("-") if rest else []
    if family not in FAMILIES or not all(n.isdigit() for n in numbers):
        raise UserError(f"unknown --arch {text!r}; allowed: {ARCH_HELP}")
    if family in ("preact_resnet", "dm_preact_resnet"):
        if numbers != ["18"]:
            raise UserError(f"--arch {text!r}: {family} exists as {family}-18 only")
        return Arch(family, 18, 0)
    if family == "resnet" or (family == "wide_resnet" and numbers[:1] in (["50"], ["101"])):
        return _torchvision_resnet(text, family, numbers)
    if len(numbers) != 2:
        raise UserError(f"--arch {text!r}: give depth and width, e.g. {family}-28-10")
    depth, width = int(numbers[0]), int(numbers[1])
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise UserError(f"--arch {text!r}: depth must be 6n+4 (10, 16, 22, 28, 34, ...) and width >= 1")
    return Arch(family, depth, width)


def _torchvision_resnet(text: str, family: str, numbers: list) -> Arch:
    if family == "resnet" and len(numbers) == 1 and int(numbers[0]) in RESNET_BLOCKS:
        return Arch("resnet", int(numbers[0]), 1)
    if family == "wide_resnet" and numbers in (["50", "2"], ["101", "2"]):
        return Arch("resnet", int(numbers[0]), 2)
    raise UserError(f"--arch {text!r}: torchvision's ResNets are resnet-50, resnet-101, resnet-152, wide_resnet-50-2 "
                    "and wide_resnet-101-2")


def data_defaults(arch: Arch, data: str):
    """``(classes, mean, std)`` of ``data`` for ``arch``; mean and std are None when it does not normalise."""
    if data not in DATA:
        raise UserError(f"unknown --data {data!r}; allowed: {', '.join(DATA)}")
    classes, mean, std = DATA[data]
    if not FAMILIES[arch.family][1]:
        return classes, None, None
    return classes, mean, std


def entries(arch: Arch, num_classes: int, channels: int = 3) -> list:
    """Every layer of ``arch`` with its published name, in the Keras builders' creation order."""
    if arch.family == "dm_wide_resnet":
        return _dm_wide_resnet(arch, num_classes, channels)
    if arch.family == "wide_resnet":
        return _wide_resnet(arch, num_classes, channels)
    if arch.family == "preact_resnet":
        return _preact_resnet(num_classes, channels)
    if arch.family == "resnet":
        return _torchvision_resnet_entries(arch, num_classes, channels)
    return _dm_preact_resnet(num_classes, channels)


def _conv(prefix, c_in, c_out, k):
    return Entry("conv", prefix, (c_out, c_in, k, k))


def _dm_wide_resnet(arch, num_classes, channels):
    out, c_in = [_conv("init_conv", channels, 16, 3)], 16
    for g, c_out in enumerate((16 * arch.width, 32 * arch.width, 64 * arch.width)):
        for i in range((arch.depth - 4) // 6):
            p = f"layer.{g}.block.{i}."
            out += [Entry("bn", p + "batchnorm_0", (c_in,)), _conv(p + "conv_0", c_in, c_out, 3),
                    Entry("bn", p + "batchnorm_1", (c_out,)), _conv(p + "conv_1", c_out, c_out, 3)]
            if c_in != c_out:
                out.append(_conv(p + "shortcut", c_in, c_out, 1))
            c_in = c_out
    return out + [Entry("bn", "batchnorm", (c_in,)), Entry("dense", "logits", (num_classes, c_in))]


def _preact_blocks(groups, c_in, names):
    """The ReLU pre-activation blocks: ``groups`` of (prefix of block i, filters, stride, count)."""
    out = []
    for prefix, c_out, stride, count in groups:
        for i in range(count):
            p = prefix.format(i=i)
            out.append(Entry("bn", p + "bn1", (c_in,)))
            if c_in != c_out or (stride != 1 and i == 0):
                out.append(_conv(p + names["shortcut"], c_in, c_out, 1))
            out += [_conv(p + "conv1", c_in, c_out, 3), Entry("bn", p + "bn2", (c_out,)),
                    _conv(p + "conv2", c_out, c_out, 3)]
            c_in = c_out
    return out, c_in


def _wide_resnet(arch, num_classes, channels):
    n, w = (arch.depth - 4) // 6, arch.width
    groups = [("block1.layer.{i}.", 16 * w, 1, n), ("block2.layer.{i}.", 32 * w, 2, n), ("block3.layer.{i}.", 64 * w, 2, n)]
    blocks, c = _preact_blocks(groups, 16, {"shortcut": "convShortcut"})
    return [_conv("conv1", channels, 16, 3)] + blocks + [Entry("bn", "bn1", (c,)), Entry("dense", "fc", (num_classes, c))]


def _preact_resnet(num_classes, channels):
    groups = [(f"layer{g + 1}.{{i}}.", 64 * 2**g, 1 if g == 0 else 2, 2) for g in range(4)]
    blocks, c = _preact_blocks(groups, 64, {"shortcut": "shortcut.0"})
    return [_conv("conv1", channels, 64, 3)] + blocks + [Entry("bn", "bn", (c,)), Entry("dense", "linear", (num_classes, c))]


def _dm_preact_resnet(num_classes, channels):
    out, c_in = [_conv("conv_2d", channels, 64, 3)], 64
    for g in range(4):
        c_out = 64 * 2**g
        for i in range(2):
            p, stride = f"layer_{g}.{i}.", (2 if g and not i else 1)
            out += [Entry("bn", p + "batchnorm_0", (c_in,)), _conv(p + "conv_2d_1", c_in, c_out, 3),
                    Entry("bn", p + "batchnorm_1", (c_out,)), _conv(p + "conv_2d_2", c_out, c_out, 3)]
            if stride != 1 or c_in != c_out:
                out.append(_conv(p + "shortcut", c_in, c_out, 3))
            c_in = c_out
    return out + [Entry("bn", "batchnorm", (c_in,)), Entry("dense", "logits", (num_classes, c_in))]


def _torchvision_resnet_entries(arch, num_classes, channels):
    out, c_in = [_conv("conv1", channels, 64, 7), Entry("bn", "bn1", (64,))], 64
    for stage, count in enumerate(RESNET_BLOCKS[arch.depth]):
        planes = 64 * 2**stage
        width, c_out = planes * arch.width, planes * 4
        for i in range(count):
            p = f"layer{stage + 1}.{i}."
            out += [_conv(p + "conv1", c_in, width, 1), Entry("bn", p + "bn1", (width,)),
                    _conv(p + "conv2", width, width, 3), Entry("bn", p + "bn2", (width,)),
                    _conv(p + "conv3", width, c_out, 1), Entry("bn", p + "bn3", (c_out,))]
            if i == 0:
                out += [_conv(p + "downsample.0", c_in, c_out, 1), Entry("bn", p + "downsample.1", (c_out,))]
            c_in = c_out
    return out + [Entry("dense", "fc", (num_classes, c_in))]


def state_dict_shapes(arch: Arch, num_classes: int, channels: int = 3) -> "collections.OrderedDict":
    """Published parameter and buffer name -> shape (PyTorch layout), ``num_batches_tracked`` left out."""
    shapes = collections.OrderedDict()
    for e in entries(arch, num_classes, channels):
        if e.kind == "conv":
            shapes[e.prefix + ".weight"] = e.shape
        elif e.kind == "bn":
            for key in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{e.prefix}.{key}"] = e.shape
        else:
            shapes[e.prefix + ".weight"] = e.shape
            shapes[e.prefix + ".bias"] = e.shape[:1]
    return shapes


def parameter_count(arch: Arch, num_classes: int, channels: int = 3) -> int:
    """What PyTorch's ``parameters()`` counts (the published sizes): no BatchNorm running statistics."""
    total = 0
    for name, shape in state_dict_shapes(arch, num_classes, channels).items():
        if not name.endswith(("running_mean", "running_var")):
            count = 1
            for d in shape:
                count *= d
            total += count
    return total


def ignored(name: str) -> bool:
    return any(p.search(name) for p in IGNORED)


__all__ = ["Arch", "Entry", "FAMILIES", "ARCH_HELP", "DATA", "RESNET_BLOCKS", "parse_arch", "data_defaults", "entries",
           "state_dict_shapes", "parameter_count", "ignored", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD"]
