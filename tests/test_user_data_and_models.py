"""The user's own data (image folder, .npz, any tfds name) and network (.keras file, module:function)."""

import os
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfrobust import data, data_sources, models
from tfrobust.cli import evaluate_main, train_main
from tfrobust.config import DataConfig, ModelConfig
from tfrobust.errors import UserError


@pytest.fixture(autouse=True)
def fresh_cache():
    data_sources._CUSTOM_CACHE.clear()
    yield
    data_sources._CUSTOM_CACHE.clear()


def images(rng, n, shape, classes):
    """Images whose mean brightness depends on the class, so the labels mean something."""
    y = np.arange(n) % classes
    x = rng.integers(0, 120, size=(n,) + shape) + (y * 60)[:, None, None, None]
    return x.clip(0, 255).astype(np.uint8), y


def write_npz(path, shape=(12, 10, 3), classes=3, n_train=60, n_test=24, **changes):
    rng = np.random.default_rng(0)
    x_train, y_train = images(rng, n_train, shape, classes)
    x_test, y_test = images(rng, n_test, shape, classes)
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    arrays.update(changes)
    np.savez(path, **arrays)
    return arrays


def write_folder(root, shape=(10, 12, 3), classes=("cat", "dog", "eel"), per_class=6):
    rng = np.random.default_rng(1)
    written = {}
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = os.path.join(root, name, f"{i:02d}.png")
            tf.io.write_file(path, tf.io.encode_png(image))
            written[image.tobytes()] = c
    return written


# --- .npz ----------------------------------------------------------------------------


def test_npz_shape_classes_and_normalisation_come_from_the_data(tmp_path):
    path = str(tmp_path / "mine.npz")
    arrays = write_npz(path)
    info = data.source_info(path)
    assert info.image_shape == (12, 10, 3) and info.num_classes == 3
    unit = arrays["x_train"].astype(np.float64) / 255
    np.testing.assert_allclose(info.mean, unit.mean(axis=(0, 1, 2)), rtol=1e-5)  # float32 vs float64 sums
    np.testing.assert_allclose(info.std, unit.std(axis=(0, 1, 2)), rtol=1e-4)
    ds = data.load_datasets(DataConfig(name=path, validation_examples=10, batch_size=16, augment=True))
    assert (ds.train_size, ds.validation_size, ds.test_size) == (50, 10, 24)
    x, y = data.load_test_arrays(path)
    np.testing.assert_array_equal(x, arrays["x_test"].astype(np.float32) / 255)
    np.testing.assert_array_equal(y, arrays["y_test"])
    xb, _ = next(iter(ds.train_epochs(0, 1)))
    assert xb.shape[1:] == (12, 10, 3) and float(tf.reduce_max(xb)) <= 1.0


def test_npz_float_images_are_used_as_they_are(tmp_path):
    path = str(tmp_path / "float.npz")
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(30, 8, 8)).astype(np.float32)
    np.savez(path, x_train=x[:20], y_train=np.arange(20) % 2, x_test=x[20:], y_test=np.arange(10) % 2)
    info = data.source_info(path)
    assert info.image_shape == (8, 8, 1) and info.num_classes == 2
    x_test, _ = data.load_test_arrays(path)
    np.testing.assert_array_equal(x_test[..., 0], x[20:])
    ds = data.load_datasets(DataConfig(name=path, validation_examples=0, batch_size=20))
    batch = next(iter(ds.train_epochs(0, 1)))[0].numpy()[..., 0]
    assert sorted(batch.ravel().tolist()) == sorted(x[:20].ravel().tolist())  # no /255, no augmentation


@pytest.mark.parametrize("change,message", [
    ({"x_test": None}, "lacks x_test"),
    ({"x_train": np.full((60, 12, 10, 3), 2.0, np.float32)}, "outside [0, 1]"),
    ({"y_train": np.zeros(59, np.int64)}, "60 images but labels of shape (59,)"),
    ({"x_test": np.zeros((24, 12, 11, 3), np.uint8)}, "test images (12, 11, 3)"),
    ({"y_train": -np.ones(60, np.int64)}, "negative labels"),
    ({"x_train": np.zeros((60, 12, 10, 2), np.uint8)}, "C in 1, 3, 4"),
])
def test_bad_npz_gives_one_line_errors(tmp_path, change, message):
    path = str(tmp_path / "bad.npz")
    arrays = write_npz(str(tmp_path / "good.npz"))
    arrays.update(change)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(UserError) as err:
        data.source_info(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        data.source_info(str(tmp_path / "none.npz"))
    with pytest.raises(UserError, match="data folder not found"):
        data.source_info(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        data.source_info(str(tmp_path / "empty"))


# --- image folders ----------------------------------------------------------------


def test_image_folder_with_train_and_test(tmp_path):
    written_train = write_folder(str(tmp_path / "train"))
    written_test = write_folder(str(tmp_path / "test"), per_class=2)
    info = data.source_info(str(tmp_path))
    assert info.image_shape == (10, 12, 3) and info.num_classes == 3
    for split, written in (("train", written_train), ("test", written_test)):
        x, y = data.load_arrays(str(tmp_path), split)
        assert len(x) == len(written)
        for image, label in zip(x, y):
            assert written[image.tobytes()] == label  # PNG is lossless: the very pixels, with their class


def test_image_folder_without_splits_holds_out_a_fixed_test_part(tmp_path):
    written = write_folder(str(tmp_path / "imgs"), shape=(9, 9, 1), per_class=10)
    x_train, y_train = data.load_arrays(str(tmp_path / "imgs"), "train")
    x_test, y_test = data.load_arrays(str(tmp_path / "imgs"), "test")
    assert (len(x_train), len(x_test)) == (24, 6) and x_train.shape[1:] == (9, 9, 1)
    train_keys = {im.tobytes() for im in x_train}
    assert not train_keys & {im.tobytes() for im in x_test}
    assert train_keys | {im.tobytes() for im in x_test} == set(written)
    data_sources._CUSTOM_CACHE.clear()
    again, _ = data.load_arrays(str(tmp_path / "imgs"), "test")
    np.testing.assert_array_equal(again, x_test)  # the same split every time (evaluation relies on it)


def test_image_folder_test_classes_must_match(tmp_path):
    write_folder(str(tmp_path / "train"))
    write_folder(str(tmp_path / "test"), classes=("cat", "dog"))
    with pytest.raises(UserError, match="has classes"):
        data.source_info(str(tmp_path))


# --- any tfds name --------------------------------------------------------------------


def test_any_tfds_name_offline_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        info = data.source_info("kmnist")
        assert info.image_shape == (28, 28, 1) and info.num_classes == 10
        x, y = data.load_test_arrays("kmnist")
        assert x.shape == (12, 28, 28, 1) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    with pytest.raises(UserError, match="unknown data set 'no_such_set'"):
        data.source_info("no_such_set")


# --- the user's network ------------------------------------------------------------


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent('''
        import keras

        def build(input_shape, num_classes):
            inputs = keras.Input(input_shape)
            h = keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-4))(inputs)
            h = keras.layers.BatchNormalization()(h)
            h = keras.layers.ReLU()(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            return keras.Model(inputs, keras.layers.Dense(num_classes)(h))

        def softmax(input_shape, num_classes):
            inputs = keras.Input(input_shape)
            h = keras.layers.Flatten()(inputs)
            return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(h))

        def not_a_model(input_shape, num_classes):
            return 42

        @keras.saving.register_keras_serializable(package="my_nets")
        class Subclassed(keras.Model):
            def __init__(self, num_classes=3, **kwargs):
                super().__init__(**kwargs)
                self.num_classes = num_classes
                self.conv = keras.layers.Conv2D(4, 3)
                self.pool = keras.layers.GlobalAveragePooling2D()
                self.head = keras.layers.Dense(num_classes)

            def call(self, x):
                return self.head(self.pool(self.conv(x)))

            def get_config(self):
                return dict(super().get_config(), num_classes=self.num_classes)

        def subclassed(input_shape, num_classes):
            return Subclassed(num_classes)

        def scaled_logits(input_shape, num_classes):
            inputs = keras.Input(input_shape)
            h = keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs))
            return keras.Model(inputs, keras.layers.Rescaling(0.5)(h))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


def test_factory_network_gets_the_data_shape(factory_module):
    info = data.DatasetInfo("x", (12, 10, 3), 3, (0.5,) * 3, (0.2,) * 3)
    net = models.network_for(ModelConfig(name=f"{factory_module}:build"), info)
    assert net.input_shape == (None, 12, 10, 3) and net.output_shape == (None, 3)
    with pytest.raises(UserError, match="not a keras.Model"):
        models.network_for(ModelConfig(name=f"{factory_module}:not_a_model"), info)
    with pytest.raises(UserError, match="has no function 'nope'"):
        models.check_model_name(f"{factory_module}:nope")
    with pytest.raises(UserError, match="cannot import 'no_module_here'"):
        models.check_model_name("no_module_here:build")


def test_keras_file_network_is_checked_against_the_data(tmp_path, factory_module):
    import my_nets

    path = str(tmp_path / "net.keras")
    my_nets.build((12, 10, 3), 3).save(path)
    net = models.network_for(ModelConfig(name=path), data.DatasetInfo("x", (12, 10, 3), 3, (0,), (1,)))
    assert net.output_shape == (None, 3)
    with pytest.raises(UserError, match="outputs shape"):
        models.network_for(ModelConfig(name=path), data.DatasetInfo("x", (12, 10, 3), 5, (0,), (1,)))
    with pytest.raises(UserError, match="does not accept images of shape"):
        models.network_for(ModelConfig(name=path), data.DatasetInfo("x", (12, 10, 1), 3, (0,), (1,)))
    with pytest.raises(UserError, match="model file not found"):
        models.check_model_name(str(tmp_path / "none.keras"))


# --- the command line ------------------------------------------------------------------


def run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_train_refuses_bad_user_pieces_in_one_line(tmp_path, capsys, factory_module):
    import my_nets

    npz = str(tmp_path / "d.npz")
    write_npz(npz)
    other_shape = str(tmp_path / "gray.keras")
    my_nets.build((8, 8, 1), 3).save(other_shape)
    cases = [
        (["--data", npz, "--model", other_shape], "does not accept images of shape (12, 10, 3)"),
        (["--data", str(tmp_path / "no.npz")], "data file not found"),
        (["--data", str(tmp_path / "nodir") + "/"], "data folder not found"),
        (["--data", npz, "--model", str(tmp_path / "no.keras")], "model file not found"),
        (["--data", npz, "--model", "my_nets:nope"], "has no function 'nope'"),
        (["--data", npz, "--model", "my_nets:softmax", "--no-eval", "--set", "data.validation_examples=10"],
         "outputs probabilities"),
        (["--data", npz, "--model", "my_nets:scaled_logits", "--defense", "trades+rat"],
         "RAT needs the logits to come straight from a Dense layer"),
    ]
    for argv, message in cases:
        workdir = tmp_path / f"w{len(message)}"
        code, err = run_main(train_main, argv + ["--workdir", str(workdir)], capsys)
        assert code == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not workdir.exists()  # nothing is created for a run that cannot start


def test_evaluate_refuses_a_model_that_does_not_fit_the_data(tmp_path, capsys, factory_module):
    import my_nets

    npz = str(tmp_path / "d.npz")
    write_npz(npz, shape=(8, 8, 1))
    path = str(tmp_path / "net.keras")
    my_nets.build((12, 10, 3), 3).save(path)
    code, err = run_main(evaluate_main, ["--model", path, "--data", npz], capsys)
    assert code == 2 and "does not accept images of shape (8, 8, 1)" in err and len(err.strip().splitlines()) == 1


# --- end to end: a user's BatchNorm + regularizer network with trades+awp ---------------------


@pytest.mark.slow
def test_user_network_trained_with_trades_awp_by_fit_and_by_cli_then_reloaded_and_evaluated(
        tmp_path, capsys, factory_module):
    import json

    import my_nets
    import tfrobust as tr

    npz = str(tmp_path / "d.npz")
    write_npz(npz, n_train=60, n_test=20)
    x_train, y_train = data.load_arrays(npz, "train")
    x_train = x_train.astype(np.float32) / 255
    x_test, y_test = data.load_test_arrays(npz)

    # Through fit.
    network = my_nets.build((12, 10, 3), 3)
    assert network.losses  # the kernel regularizer
    model = tr.RobustModel(network, tr.Defense("trades+awp", awp_warmup_epochs=1), eps=0.05, step_size=0.02,
                           steps=1, steps_per_epoch=2, eval_steps=2)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["sparse_categorical_accuracy"])
    history = model.fit(x_train, y_train, batch_size=30, epochs=2, verbose=0).history
    assert history["awp_relative_norm"][0] == 0 and history["awp_relative_norm"][1] > 0
    assert all(np.isfinite(history["loss"]))
    path = str(tmp_path / "fit.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.defense == model.defense and loaded.network.losses
    moving = [v for v in loaded.network.non_trainable_variables if "moving_mean" in v.path]
    assert moving and np.abs(moving[0].numpy()).max() > 0  # BatchNorm statistics were trained and saved
    report = tr.evaluate(loaded.network, x_test, y_test, 0.05, attacks=("clean", "pgd5_ce"), verbose=False)
    accuracy = report["accuracy"]
    assert 0 <= accuracy["pgd5_ce"] <= accuracy["clean"] <= 1 and report["examples"] == 20

    # Through the command line, with the network from module:function and the data from the .npz.
    workdir = str(tmp_path / "run")
    argv = ["--data", npz, "--model", f"{factory_module}:build", "--defense", "trades+awp", "--epochs", "2",
            "--workdir", workdir, "--no-eval"]  # evaluated below by evaluate.py
    for item in ("defense.awp.warmup_epochs=1", "data.validation_examples=10", "data.batch_size=25",
                 "attack.eps=0.05", "attack.step_size=0.02", "attack.steps=1", "eval.pgd_steps=2",
                 "eval.integrity_examples=0", "eval.images_every=0", "runtime.verbose=0"):
        argv += ["--set", item]
    assert train_main(argv) == 0
    with open(os.path.join(workdir, "history.json")) as f:
        run_history = json.load(f)
    assert run_history["awp_relative_norm"][0] == 0 and run_history["awp_relative_norm"][1] > 0
    trained = keras.models.load_model(os.path.join(workdir, "model.keras"))
    assert trained.input_shape == (None, 12, 10, 3) and trained.output_shape == (None, 3)
    assert trained.losses and any(isinstance(l, keras.layers.BatchNormalization) for l in trained.layers)
    output = str(tmp_path / "eval.json")
    assert evaluate_main(["--model", workdir, "--attacks", "clean,pgd5_ce", "--integrity-examples", "0",
                          "--output", output]) == 0
    with open(output) as f:
        evaluated = json.load(f)
    assert evaluated["data"] == npz and evaluated["examples"] == 20  # the run's data, found from its config
    assert 0 <= evaluated["accuracy"]["pgd5_ce"] <= evaluated["accuracy"]["clean"] <= 1


def test_a_run_on_a_subclassed_factory_network_is_evaluated_from_a_new_process_elsewhere(tmp_path, factory_module):
    import json
    import subprocess

    npz = str(tmp_path / "d.npz")
    write_npz(npz, n_train=40, n_test=12)
    workdir = str(tmp_path / "run")
    argv = ["--data", npz, "--model", f"{factory_module}:subclassed", "--epochs", "1", "--workdir", workdir,
            "--no-eval"]
    for item in ("data.validation_examples=8", "data.batch_size=16", "attack.steps=1", "eval.pgd_steps=1",
                 "eval.images_every=0", "runtime.verbose=0"):
        argv += ["--set", item]
    assert train_main(argv) == 0
    with open(os.path.join(workdir, "imports.json")) as f:
        assert json.load(f) == {"imports": [{"module": "my_nets", "path": str(tmp_path)}]}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), "--model", workdir, "--attacks", "clean",
                          "--integrity-examples", "0", "--output", str(elsewhere / "r.json")],
                         capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(elsewhere / "r.json") as f:
        assert json.load(f)["examples"] == 12
    # A module that can no longer be imported is named in one line.
    os.rename(tmp_path / "my_nets.py", tmp_path / "moved.py")
    run = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), "--model", workdir, "--attacks", "clean"],
                         capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert run.returncode == 2 and "the run imports 'my_nets'" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_default_run_directory_names_the_data_by_its_last_component():
    from tfrobust.cli import _run_label

    assert _run_label("fashion_mnist") == "fashion_mnist"
    assert _run_label("path/to/mydata.npz") == "mydata"
    assert _run_label("./images/") == "images"
    assert _run_label("mnist_corrupted/shot_noise") == "shot_noise"


def test_normalisation_from_the_config_overrides_the_data(tmp_path):
    path = str(tmp_path / "d.npz")
    write_npz(path)
    cfg = DataConfig(name=path, validation_examples=10, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.25])
    info = data.load_datasets(cfg).info
    assert info.mean == (0.5, 0.4, 0.3) and info.std == (0.2, 0.2, 0.25)
    net = models.network_for(ModelConfig(name="small_cnn"), info, seed=0)
    norm = net.get_layer(models.NORMALIZATION_LAYER)
    np.testing.assert_allclose(np.ravel(norm.mean), [0.5, 0.4, 0.3], rtol=1e-6)
    with pytest.raises(UserError, match="need 3 values"):
        data.load_datasets(DataConfig(name=path, validation_examples=10, mean=[0.5]))
    from tfrobust.config import load_config

    assert load_config(overrides={"data.mean": "[0.1, 0.2, 0.3]"}).data.mean == [0.1, 0.2, 0.3]
