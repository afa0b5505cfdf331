"""Writes tests/fixtures/zoo/: published-architecture checkpoints and PyTorch's logits on fixed inputs.

Needs PyTorch (never a dependency of tfrobust or its tests):

    python scripts/write_zoo_fixtures.py [--out tests/fixtures/zoo]
    python scripts/write_zoo_fixtures.py --check-export --tfrobust .venv/bin/python
    python scripts/write_zoo_fixtures.py --big /tmp/wrn70.safetensors   # a random WRN-70-16 checkpoint

The reference networks below are written from the published architectures' descriptions, with
the published parameter names. Weights come from :func:`synthetic_state` (numpy, one seed per
parameter name), so the tests can rebuild the full-size PreActResNet-18 weights without the
45 MB file; the small WideResNets are stored in every format: PyTorch zip (wrapped and
prefixed as releases are), the legacy PyTorch format, safetensors and DeepMind's .npy.

``--check-export`` imports each fixture into tfrobust, exports it back with ``tfrobust
export-model`` and loads the result into the reference network with ``strict=True``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zlib

import numpy as np

SMALL = {"dm_wide_resnet-10-2": "dm_wide_resnet", "wide_resnet-10-2": "wide_resnet"}
FULL = {"preact_resnet-18": "preact_resnet", "dm_preact_resnet-18": "dm_preact_resnet", "resnet-50": "resnet"}
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_state(shapes: dict) -> dict:
    """Random float32 weights for every name -> shape: He-scaled kernels and non-trivial BatchNorm statistics."""
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if name.endswith("running_var") or (len(shape) == 1 and name.endswith("weight")):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("running_mean", "bias")):
            value = rng.normal(0.0, 0.2, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        out[name] = value.astype(np.float32)
    return out


def inputs(size: int = 32) -> np.ndarray:
    """Fixed images in [0, 1]: 32x32 for the CIFAR networks, 64x64 for the ImageNet ResNet (any size fits it)."""
    return np.random.default_rng(0 if size == 32 else size).uniform(0.0, 1.0, (8, size, size, 3)).astype(np.float32)


def _torch_networks():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def bn(c, momentum=0.1):
        return nn.BatchNorm2d(c, momentum=momentum)

    class DMBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.batchnorm_0, self.conv_0 = bn(c_in), nn.Conv2d(c_in, c_out, 3, stride, 0, bias=False)
            self.batchnorm_1, self.conv_1 = bn(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if c_in != c_out else None
            self.stride = stride

        def forward(self, x):
            a = F.silu(self.batchnorm_0(x))
            pad = (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)
            out = self.conv_1(F.silu(self.batchnorm_1(self.conv_0(F.pad(a, pad)))))
            return out + (self.shortcut(a) if self.shortcut is not None else x)

    class Group(nn.Module):
        """``n`` blocks held as ``attribute`` (DeepMind's ``block``, TRADES' ``layer``)."""

        def __init__(self, block, attribute, n, c_in, c_out, stride):
            super().__init__()
            self.attribute = attribute
            setattr(self, attribute, nn.Sequential(*[block(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                                     for i in range(n)]))

        def forward(self, x):
            return getattr(self, self.attribute)(x)

    class DMWideResNet(nn.Module):
        def __init__(self, depth, width, classes=10):
            super().__init__()
            n, w = (depth - 4) // 6, width
            self.init_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.layer = nn.Sequential(*[Group(DMBlock, "block", n, c_in, c_out, stride) for c_in, c_out, stride in
                                          ((16, 16 * w, 1), (16 * w, 32 * w, 2), (32 * w, 64 * w, 2))])
            self.batchnorm, self.logits = bn(64 * w), nn.Linear(64 * w, classes)
            self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
            self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

        def forward(self, x):
            out = self.layer(self.init_conv((x - self.mean) / self.std))
            return self.logits(F.avg_pool2d(F.silu(self.batchnorm(out)), 8).flatten(1))

    class Block(nn.Module):  # Zagoruyko's pre-activation block, TRADES' names
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.bn1, self.conv1 = bn(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn2, self.conv2 = bn(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if c_in != c_out else None

        def forward(self, x):
            a = F.relu(self.bn1(x))
            out = self.conv2(F.relu(self.bn2(self.conv1(a))))
            return out + (self.convShortcut(a) if self.convShortcut is not None else x)

    class WideResNet(nn.Module):
        def __init__(self, depth, width, classes=10, sub_block1=False):
            super().__init__()
            n, w = (depth - 4) // 6, width
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.block1 = Group(Block, "layer", n, 16, 16 * w, 1)
            if sub_block1:  # TRADES' released state dicts hold this unused copy; RobustBench's class does not
                self.sub_block1 = Group(Block, "layer", n, 16, 16 * w, 1)
            self.block2 = Group(Block, "layer", n, 16 * w, 32 * w, 2)
            self.block3 = Group(Block, "layer", n, 32 * w, 64 * w, 2)
            self.bn1, self.fc = bn(64 * w), nn.Linear(64 * w, classes)

        def forward(self, x):
            out = self.block3(self.block2(self.block1(self.conv1(x))))
            return self.fc(F.avg_pool2d(F.relu(self.bn1(out)), 8).flatten(1))

    class PreActBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.bn1, self.conv1 = bn(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn2, self.conv2 = bn(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

        def forward(self, x):
            a = F.relu(self.bn1(x))
            short = self.shortcut(a) if hasattr(self, "shortcut") else x
            return self.conv2(F.relu(self.bn2(self.conv1(a)))) + short

    class ResNet18(nn.Module):
        """A pre-activation ResNet-18 whose names and activation differ between the two releases."""

        def __init__(self, block, names, activation, classes=10):
            super().__init__()
            self.names, self.activation = names, activation
            setattr(self, names[0], nn.Conv2d(3, 64, 3, 1, 1, bias=False))
            c = 64
            for g in range(4):
                setattr(self, names[1].format(g=g, n=g + 1), nn.Sequential(block(c, 64 * 2**g, 1 if g == 0 else 2),
                                                                  block(64 * 2**g, 64 * 2**g, 1)))
                c = 64 * 2**g
            setattr(self, names[2], bn(512))
            setattr(self, names[3], nn.Linear(512, classes))
            self.mean, self.std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)

        def forward(self, x):
            out = getattr(self, self.names[0])((x - self.mean) / self.std)
            for g in range(4):
                out = getattr(self, self.names[1].format(g=g, n=g + 1))(out)
            out = self.activation(getattr(self, self.names[2])(out))
            return getattr(self, self.names[3])(F.avg_pool2d(out, 4).flatten(1))

    class DMPreActBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.batchnorm_0, self.conv_2d_1 = bn(c_in), nn.Conv2d(c_in, c_out, 3, stride, 0, bias=False)
            self.batchnorm_1, self.conv_2d_2 = bn(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.stride = stride
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Conv2d(c_in, c_out, 3, stride, 0, bias=False)

        def forward(self, x):
            pad = (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)
            short = self.shortcut(F.pad(x, pad)) if hasattr(self, "shortcut") else x
            out = self.conv_2d_1(F.pad(F.silu(self.batchnorm_0(x)), pad))
            return self.conv_2d_2(F.silu(self.batchnorm_1(out))) + short

    class Bottleneck(nn.Module):  # torchvision's, stride on the 3x3 convolution
        def __init__(self, c_in, width, c_out, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), bn(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), bn(width)
            self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), bn(c_out)
            if stride != 1 or c_in != c_out:
                self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
            return F.relu(out + (self.downsample(x) if hasattr(self, "downsample") else x))

    class ResNet50(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), bn(64)
            c = 64
            for stage, count in enumerate((3, 4, 6, 3)):
                planes = 64 * 2**stage
                blocks = [Bottleneck(c if i == 0 else planes * 4, planes, planes * 4, 2 if stage and not i else 1)
                          for i in range(count)]
                setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
                c = planes * 4
            self.fc = nn.Linear(2048, classes)
            self.mean, self.std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

        def forward(self, x):
            out = F.max_pool2d(F.relu(self.bn1(self.conv1((x - self.mean) / self.std))), 3, 2, 1)
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

    return {"resnet-50": ResNet50, "dm_wide_resnet-10-2": lambda: DMWideResNet(10, 2), "wide_resnet-10-2": lambda: WideResNet(10, 2),
            "wide_resnet-10-2-trades": lambda: WideResNet(10, 2, sub_block1=True),
            "dm_wide_resnet-70-16": lambda: DMWideResNet(70, 16), "dm_wide_resnet-28-10": lambda: DMWideResNet(28, 10),
            "preact_resnet-18": lambda: ResNet18(PreActBlock, ("conv1", "layer{n}", "bn", "linear"), F.relu),
            "dm_preact_resnet-18": lambda: ResNet18(DMPreActBlock, ("conv_2d", "layer_{g}", "batchnorm", "logits"), F.silu)}


def torch_network(arch: str):
    """A new PyTorch network of ``arch`` (a key of :func:`_torch_networks`), random weights, training mode."""
    return _torch_networks()[arch]()


def _reference(arch: str):
    """The PyTorch network of ``arch`` holding :func:`synthetic_state`, in inference mode."""
    import torch

    net = torch_network(arch)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: torch.from_numpy(v) for k, v in synthetic_state(shapes).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return net.eval()


def _logits(net, size: int = 32) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(inputs(size)).permute(0, 3, 1, 2)).numpy()


def _haiku(state: dict) -> tuple:
    """A DMWideResNet state dict in the Haiku names and layouts of DeepMind's .npy checkpoints."""
    params, hk_state = {}, {}
    for name, value in state.items():
        module, _, key = name.rpartition(".")
        parts = module.split(".")
        local = f"resnet_lay_{parts[1]}_block_{parts[3]}/~/{parts[4]}" if parts[0] == "layer" else module
        path = "wide_res_net/~/" + local
        if key == "weight" and value.ndim == 4:
            params.setdefault(path, {})["w"] = value.transpose(2, 3, 1, 0)
        elif key == "weight" and value.ndim == 2:
            params.setdefault(path, {})["w"] = value.T
        elif key == "bias" and module == "logits":
            params.setdefault(path, {})["b"] = value
        elif key in ("weight", "bias"):
            params.setdefault(path, {})["scale" if key == "weight" else "offset"] = value.reshape(1, 1, 1, -1)
        elif key in ("running_mean", "running_var"):
            ema = "mean_ema" if key == "running_mean" else "var_ema"
            hk_state[f"{path}/~/{ema}"] = {"average": value.reshape(1, 1, 1, -1), "counter": np.array(7, np.int32),
                                           "hidden": value.reshape(1, 1, 1, -1)}
    return params, hk_state


def write_fixtures(out: str) -> None:
    import torch
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    logits = {"inputs": inputs(), "inputs_64": inputs(64)}
    for arch in list(SMALL) + list(FULL):
        net = _reference(arch + ("-trades" if arch == "wide_resnet-10-2" else ""))
        logits[arch] = _logits(net, 64 if arch == "resnet-50" else 32)
        if arch not in SMALL:
            continue  # the tests rebuild these weights with synthetic_state
        state = {k: v.clone() for k, v in net.state_dict().items()}
        plain = {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
        save_file({k: v for k, v in plain.items() if not k.startswith("sub_block1.")}, os.path.join(out, arch + ".safetensors"))
        if arch.startswith("dm_"):
            # DataParallel's prefix inside a training checkpoint's dict
            torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 400},
                       os.path.join(out, arch + ".pt"))
            np.save(os.path.join(out, arch + ".npy"), np.array(_haiku(plain), dtype=object), allow_pickle=True)
        else:
            torch.save({"state_dict": state}, os.path.join(out, arch + ".pt"))
            torch.save(state, os.path.join(out, arch + ".legacy.pth"), _use_new_zipfile_serialization=False)
    np.savez(os.path.join(out, "logits.npz"), **logits)
    print(f"wrote {out}: " + ", ".join(sorted(os.listdir(out))))


def check_export(out: str, tfrobust_python: str) -> None:
    """Imports every fixture with tfrobust, exports it back and loads it into the reference strictly."""
    import torch
    from safetensors.numpy import save_file

    reference = np.load(os.path.join(out, "logits.npz"))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in list(SMALL) + list(FULL):
            checkpoint = os.path.join(out, arch + ".safetensors")
            if arch in FULL:
                net = _reference(arch)
                checkpoint = os.path.join(tmp, arch + ".safetensors")
                save_file({k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k}, checkpoint)
            keras_file, exported = os.path.join(tmp, arch + ".keras"), os.path.join(tmp, arch + ".pt")
            data = "imagenet" if arch == "resnet-50" else "cifar10"
            for command in (["import-model", checkpoint, "--arch", arch, "--data", data, "--output", keras_file],
                            ["export-model", keras_file, "--format", "pytorch", "--output", exported]):
                subprocess.run([tfrobust_python, "-m", "tfrobust"] + command, check=True)
            net = torch_network(arch)
            net.load_state_dict(torch.load(exported, weights_only=True), strict=True)
            got, want = _logits(net.eval(), 64 if arch == "resnet-50" else 32), reference[arch]
            error = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            assert error < 1e-5 and (got.argmax(1) == want.argmax(1)).all(), (arch, error)
            print(f"{arch}: exported state dict loads with strict=True; logits equal to {error:.1e} of the largest")


def write_big(path: str) -> None:
    """A random DM WideResNet-70-16 checkpoint (267M parameters, about 1 GB) for measuring the import."""
    from safetensors.numpy import save_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tfrobust.zoo import names

    shapes = names.state_dict_shapes(names.parse_arch("dm_wide_resnet-70-16"), 10)
    save_file(synthetic_state(shapes), path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "zoo"))
    p.add_argument("--check-export", action="store_true")
    p.add_argument("--tfrobust", default=sys.executable, help="the Python that has tfrobust (for --check-export)")
    p.add_argument("--big", metavar="FILE", help="write a random WRN-70-16 .safetensors checkpoint to FILE and stop")
    args = p.parse_args()
    if args.big:
        write_big(args.big)
    elif args.check_export:
        check_export(os.path.normpath(args.out), args.tfrobust)
    else:
        write_fixtures(os.path.normpath(args.out))


if __name__ == "__main__":
    main()
