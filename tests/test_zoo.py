"""Published checkpoints in (tfrobust import-model) and out (export-model), against PyTorch's logits.

tests/fixtures/zoo/ was written by scripts/write_zoo_fixtures.py with PyTorch: small DeepMind and
Zagoruyko WideResNets (depth 10, width 2) in every checkpoint format, and PyTorch's logits of
every family on fixed inputs. The full-size PreActResNet-18 weights are rebuilt here from the
script's seeded generator, which needs no PyTorch.
"""

import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tfrobust.commands import main
from tfrobust.errors import UserError
from tfrobust.models import build_model, wide_resnet_swish_parameters
from tfrobust.zoo import checkpoints, convert, names, pickles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "zoo")
REFERENCE = np.load(os.path.join(FIXTURES, "logits.npz"))


def _script():
    spec = importlib.util.spec_from_file_location("write_zoo_fixtures", os.path.join(ROOT, "scripts", "write_zoo_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_logits(network, arch, inputs="inputs"):
    got = np.asarray(network(REFERENCE[inputs], training=False))
    want = REFERENCE[arch]
    # float32 convolutions summed in another order (oneDNN vs PyTorch, Intel vs AMD) differ by ~1e-6 of the
    # largest logit; 1e-4 leaves room for that and still catches any wrong layout, padding or epsilon (>1e-2).
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("arch, files", [("dm_wide_resnet-10-2", (".pt", ".safetensors", ".npy")),
                                         ("wide_resnet-10-2", (".pt", ".legacy.pth", ".safetensors"))])
def test_every_format_gives_pytorchs_logits(arch, files):
    for ext in files:
        assert_same_logits(convert.import_model(os.path.join(FIXTURES, arch + ext), arch, "cifar10"), arch)


@pytest.mark.parametrize("arch, data, size", [("preact_resnet-18", "cifar10", 32), ("dm_preact_resnet-18", "cifar10", 32),
                                              ("resnet-50", "imagenet", 64)])
def test_full_size_networks_give_pytorchs_logits(arch, data, size, tmp_path):
    spec = names.parse_arch(arch)
    classes = names.DATA[data][0]
    state = _script().synthetic_state(names.state_dict_shapes(spec, classes))
    path = str(tmp_path / "c.pt")
    pickles.write_torch({"module." + k: v for k, v in state.items()}, path)  # DataParallel's prefix, taken off
    network = convert.import_model(path, arch, data, input_shape=(size, size, 3))
    assert_same_logits(network, arch, "inputs" if size == 32 else f"inputs_{size}")
    assert sum(int(np.prod(w.shape)) for w in network.trainable_weights) == names.parameter_count(spec, classes)


def test_parameter_counts_of_full_size_networks_are_the_published_ones():
    # Published: WRN-28-10 36.5M, WRN-34-10 46.2M (Zagoruyko & Komodakis; TRADES), PreActResNet-18 11.2M,
    # WRN-70-16 266.8M (Gowal et al. 2020: 267M); torchvision's ImageNet ResNet-50 25,557,032 and
    # WideResNet-50-2 68,883,240 (its model table).
    counts = {a: names.parameter_count(names.parse_arch(a), 10) for a in (
        "wide_resnet-28-10", "wide_resnet-34-10", "preact_resnet-18", "dm_wide_resnet-70-16", "dm_wide_resnet-28-10")}
    assert {a: round(c / 1e6, 1) for a, c in counts.items()} == {
        "wide_resnet-28-10": 36.5, "wide_resnet-34-10": 46.2, "preact_resnet-18": 11.2, "dm_wide_resnet-70-16": 266.8,
        "dm_wide_resnet-28-10": 36.5}
    assert names.parameter_count(names.parse_arch("resnet-50"), 1000) == 25_557_032
    assert names.parameter_count(names.parse_arch("wide_resnet-50-2"), 1000) == 68_883_240
    assert counts["dm_wide_resnet-70-16"] == wide_resnet_swish_parameters(70, 16)  # models.py's own count
    small = build_model("wide_resnet", (32, 32, 3), 10, depth=10, width=2)
    assert sum(int(np.prod(w.shape)) for w in small.trainable_weights) == names.parameter_count(
        names.parse_arch("wide_resnet-10-2"), 10)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"conv1.weight": _RunsCode(marker)}, protocol=2)
    zipped = tmp_path / "evil.pt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", payload)
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C) + pickle.dumps(1001) + pickle.dumps({}) + payload)
    npy = tmp_path / "evil.npy"
    np.save(npy, np.array([_RunsCode(marker), {}], dtype=object), allow_pickle=True)
    for path in (zipped, legacy, npy):
        with pytest.raises(UserError) as e:
            checkpoints.read_state_dict(str(path))
        assert str(e.value) == (f"{path}: refused to unpickle {os.system.__module__}.system: a checkpoint may hold only "
                                "tensors, arrays and plain containers (nothing in it was run)")
    assert not marker.exists()


def test_files_that_are_no_checkpoint_are_named(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"a": 1}))
    empty_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(empty_zip, "w") as z:
        z.writestr("readme.txt", "hello")
    listed = tmp_path / "list.pt"
    pickles.write_torch({"w": np.zeros(2, np.float32)}, str(listed))
    with zipfile.ZipFile(listed, "a") as z:  # a second pickle: which one is the checkpoint?
        z.writestr("other/data.pkl", pickle.dumps(1))
    bad_call = tmp_path / "bad_call.pt"  # a tensor rebuilt from one argument instead of six
    with zipfile.ZipFile(bad_call, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nX\x01\x00\x00\x00x\x85R.")
    for path, message in ((text, "is not a PyTorch checkpoint (neither a zip file nor a pickle)"),
                          (plain, "is not a PyTorch checkpoint (a pickle without PyTorch's magic number)"),
                          (empty_zip, "is a zip file but not a PyTorch checkpoint (no data.pkl)"),
                          (listed, "is a zip file but not a PyTorch checkpoint (no data.pkl)"),
                          (bad_call, ": damaged or unsupported PyTorch checkpoint (TypeError: _rebuild_tensor() missing 3 "
                                     "required positional arguments: 'offset', 'size', and 'stride')"),
                          (tmp_path / "gone.pt", None)):
        with pytest.raises(UserError) as e:
            checkpoints.read_state_dict(str(path))
        assert str(e.value) == ((f"{path}{message}" if message[0] == ":" else f"{path} {message}") if message
                                else f"checkpoint not found: {path}")


def test_normalisation_can_be_replaced_or_dropped():
    checkpoint = os.path.join(FIXTURES, "dm_wide_resnet-10-2.safetensors")
    network = convert.import_model(checkpoint, "dm_wide_resnet-10-2", "cifar10", mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)
    assert convert.normalisation(network) == ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert convert.normalisation(convert.import_model(checkpoint, "dm_wide_resnet-10-2", mean=())) is None
    # CIFAR-100's statistics are the default for --data cifar100 (a 100-class checkpoint would be needed to load).
    assert names.data_defaults(names.parse_arch("dm_wide_resnet-10-2"), "cifar100") == (
        100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert names.data_defaults(names.parse_arch("wide_resnet-34-10"), "cifar10") == (10, None, None)


def _import(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture
def dm_state():
    return load_file(os.path.join(FIXTURES, "dm_wide_resnet-10-2.safetensors"))


@pytest.mark.parametrize("change, data, message", [
    (lambda s: s.pop("layer.0.block.0.conv_0.weight"), "cifar10",
     "missing parameter layer.0.block.0.conv_0.weight (shape (32, 16, 3, 3))"),
    (lambda s: s.update({"layer.3.block.0.conv_0.weight": np.zeros(1, np.float32)}), "cifar10",
     "unexpected parameter layer.3.block.0.conv_0.weight"),
    (lambda s: s.update({"batchnorm.running_var": np.ones(7, np.float32)}), "cifar10",
     "parameter batchnorm.running_var has shape (7,), dm_wide_resnet-10-2 needs (128,)"),
    (lambda s: [s.pop("init_conv.weight"), s.pop("batchnorm.bias")], "cifar10",
     "missing parameter init_conv.weight (shape (16, 3, 3, 3)) (and 1 more problems)"),
    (lambda s: None, "cifar100", "logits.weight has 10 classes, the data has 100"),
])
def test_each_mismatch_is_one_line_naming_the_parameter(change, data, message, dm_state, tmp_path, capsys):
    change(dm_state)
    path = str(tmp_path / "c.safetensors")
    save_file(dm_state, path)
    output = tmp_path / "m.keras"
    code, err = _import(["import-model", path, "--arch", "dm_wide_resnet-10-2", "--data", data, "--output", str(output)],
                        capsys)
    prefix = f"error: {path}: " if data == "cifar100" else f"error: {path} does not fit dm_wide_resnet-10-2: "
    assert (code, err) == (2, prefix + message)
    assert not output.exists()


@pytest.mark.parametrize("argv, message", [
    (["--arch", "densenet-121"], "unknown --arch 'densenet-121'; allowed: " + names.ARCH_HELP),
    (["--arch", "wide_resnet-30-10"], "--arch 'wide_resnet-30-10': depth must be 6n+4 (10, 16, 22, 28, 34, ...) and width >= 1"),
    (["--arch", "dm_wide_resnet-10-2", "--data", "svhn"], "unknown --data 'svhn'; allowed: cifar10, cifar100, imagenet"),
    (["--arch", "dm_wide_resnet-10-2", "--data", "imagenet"],
     "--data imagenet: dm_wide_resnet-10-2 is a CIFAR network; for ImageNet use resnet-50 or wide_resnet-50-2"),
    (["--arch", "resnet-34"], "--arch 'resnet-34': torchvision's ResNets are resnet-50, resnet-101, resnet-152, "
                              "wide_resnet-50-2 and wide_resnet-101-2"),
    (["--arch", "dm_wide_resnet-10-2", "--std", "0.2", "0", "0.2"], "--std must be > 0, got [0.2, 0.0, 0.2]"),
])
def test_bad_import_arguments_exit_2(argv, message, tmp_path, capsys):
    checkpoint = os.path.join(FIXTURES, "dm_wide_resnet-10-2.safetensors")
    code, err = _import(["import-model", checkpoint, "--output", str(tmp_path / "m.keras")] + argv, capsys)
    assert (code, err) == (2, "error: " + message)


def test_import_writes_a_keras_file_that_loads_elsewhere_evaluates_and_exports(tmp_path, capsys):
    checkpoint = os.path.join(FIXTURES, "wide_resnet-10-2.pt")
    output = tmp_path / "m.keras"
    assert main(["import-model", checkpoint, "--arch", "wide_resnet-10-2", "--output", str(output)]) == 0
    sha256 = hashlib.sha256(open(checkpoint, "rb").read()).hexdigest()
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote {output}: wide_resnet-10-2, 304,634 weights, sha256 {sha256[:16]}... of {checkpoint}, normalisation none")
    code, err = _import(["import-model", checkpoint, "--arch", "wide_resnet-10-2", "--output", str(output)], capsys)
    assert (code, err) == (2, f"error: output file {output} exists; choose another --output")
    # A fresh process, tfrobust imported alone: the file loads and gives PyTorch's logits.
    np.save(tmp_path / "x.npy", REFERENCE["inputs"])
    script = ("import sys, numpy as np, tfrobust, keras; m = keras.models.load_model(sys.argv[1]); "
              "np.save(sys.argv[2], np.asarray(m(np.load(sys.argv[3]), training=False)))")
    subprocess.run([sys.executable, "-c", script, str(output), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                   check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    got, want = np.load(tmp_path / "y.npy"), REFERENCE["wide_resnet-10-2"]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))  # as in assert_same_logits
    # evaluate names where the network came from.
    from tfrobust.evaluation import evaluate_run, format_table

    data = tmp_path / "d.npz"
    labels = want.argmax(1).astype(np.int64)
    np.savez(data, x_train=REFERENCE["inputs"], y_train=labels, x_test=REFERENCE["inputs"], y_test=labels)
    report = evaluate_run(str(output), ["clean"], data=str(data), integrity_examples=0, verbose=False,
                          output=str(tmp_path / "r.json"))
    assert report["accuracy"]["clean"] == 1.0  # the labels are the PyTorch network's own predictions
    assert format_table(report).splitlines()[0] == (
        f"8 examples, linf eps=0.03137; wide_resnet-10-2 imported from {checkpoint} (sha256 {sha256[:16]}...)")
    recorded = json.load(open(tmp_path / "r.json"))["provenance"]
    assert recorded == {"source": checkpoint, "sha256": sha256,
                        "arch": "wide_resnet-10-2", "format": "pytorch", "data": "cifar10", "mean": None, "std": None}
    # Exported back in the published names: the checkpoint's tensors exactly (TRADES' unused copy left out).
    for fmt, name in (("pytorch", "e.pt"), ("safetensors", "e.safetensors")):
        assert main(["export-model", str(output), "--format", fmt, "--output", str(tmp_path / name)]) == 0
        exported = checkpoints.read_state_dict(str(tmp_path / name))
        original = {k: v for k, v in checkpoints.read_state_dict(checkpoint).items() if not k.startswith("sub_block1")}
        assert sorted(exported) == sorted(original)
        for key, value in original.items():
            assert np.array_equal(exported[key], value) or key.endswith("num_batches_tracked"), key


def test_tfrobust_networks_export_and_others_are_refused(tmp_path, capsys):
    network = build_model("wide_resnet_swish", (32, 32, 3), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), depth=10, width=1,
                          seed=0)
    network.save(tmp_path / "swish.keras")
    assert main(["export-model", str(tmp_path / "swish.keras"), "--output", str(tmp_path / "s.pt")]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {tmp_path / 's.pt'}: dm_wide_resnet-10-1, 46 tensors; the network normalises with mean "
        "[0.5, 0.5, 0.5] and std [0.25, 0.25, 0.25]: give the PyTorch class these")
    back = convert.import_model(str(tmp_path / "s.pt"), "dm_wide_resnet-10-1", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = REFERENCE["inputs"][:2]
    np.testing.assert_array_equal(np.asarray(back(x, training=False)), np.asarray(network(x, training=False)))
    build_model("small_cnn", (32, 32, 3), 10).save(tmp_path / "cnn.keras")
    code, err = _import(["export-model", str(tmp_path / "cnn.keras"), "--output", str(tmp_path / "c.pt")], capsys)
    assert (code, err) == (2, "error: network 'small_cnn' is none of tfrobust's wide_resnet, wide_resnet_swish, "
                              "preact_resnet18 or an imported network: it has no published names to export to")
