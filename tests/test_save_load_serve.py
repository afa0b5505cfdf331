"""A RobustModel behaves as a Keras model outside the process that trained it: saved, loaded in a fresh
interpreter, exported, served, evaluated; its metrics work with Keras' callbacks; its defense's
requirements on the network are checked when it is built.

Logits computed in another process on the same machine are compared with ``rtol=1e-6``: the same
operations on the same CPU give the same float32 values up to rounding, and a wrong network (the live
one instead of the average, another file) differs by orders of magnitude more.
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfrobust as tr
from conftest import tiny_cnn
from tfrobust import registration, weight_space
from tfrobust.errors import UserError
from tfrobust.trainer import EVALUATION_METRICS, RobustModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE, CLASSES = (12, 12, 1), 4


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n,) + SHAPE).astype("float32"), (np.arange(n) % CLASSES).astype("int32")


def trained(defense, ema=None, network=None, **kwargs):
    x, y = data()
    model = RobustModel(network or tiny_cnn(SHAPE, CLASSES, batch_norm=True), defense, eps=0.1, step_size=0.05,
                        steps=2, steps_per_epoch=2, eval_steps=2, seed=3, ema_decay=ema, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    return model


def python(code, cwd=None, timeout=300):
    """Runs ``code`` in a fresh interpreter (the project importable); returns its stdout, asserting success."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Models of four defenses (two with weight averaging), each saved with model.save, and their logits."""
    folder = tmp_path_factory.mktemp("saved")
    x, _ = data(8, seed=1)
    np.save(folder / "x.npy", x)
    cases = {"at": ("at", None), "trades_awp_ema": (tr.Defense("trades+awp", awp_warmup_epochs=1), 0.9),
             "at_s2o": ("at+s2o", None), "trades_rat_ema": ("trades+rat", 0.5)}
    expected = {}
    for name, (defense, ema) in cases.items():
        model = trained(defense, ema)
        model.save(folder / f"{name}.keras")
        expected[name] = model.predict(x, verbose=0)
        if ema is not None:
            averaged = model.averaged_network(x, training=False).numpy()
            live = model.network(x, training=False).numpy()
            np.testing.assert_array_equal(expected[name], averaged)  # predict uses the average...
            assert np.abs(live - averaged).max() > 1e-3  # ...which is not the live network
        model.export(str(folder / f"{name}_serve"))
        expected[name + "_defense"] = model.defense.name
    np.savez(folder / "expected.npz", **{k: v for k, v in expected.items() if not k.endswith("_defense")})
    return folder, expected


LOAD_ALL = """
    import numpy as np
    folder = {folder!r}
    x = np.load(folder + "/x.npy")
    expected = np.load(folder + "/expected.npz")
    for name in {names!r}:
        model = keras.models.load_model(folder + "/" + name + ".keras")
        assert type(model).__name__ == "RobustModel", type(model)
        np.testing.assert_allclose(model.predict(x, verbose=0), expected[name], rtol=1e-6, atol=1e-6)
        print(name, model.defense.name)
"""


@pytest.mark.parametrize("imports", ["import keras, tfrobust", "import tfrobust\nimport tensorflow\nimport keras"])
def test_saved_robust_models_load_in_a_fresh_interpreter_after_import_tfrobust(saved, imports):
    folder, expected = saved
    names = ["at", "trades_awp_ema", "at_s2o", "trades_rat_ema"]
    out = python(imports + textwrap.dedent(LOAD_ALL.format(folder=str(folder), names=names)))
    assert out.split() == [w for n in names for w in (n, expected[n + "_defense"])]


def test_import_tfrobust_still_loads_no_tensorflow_and_a_plain_keras_session_is_told_what_to_import(saved):
    folder, _ = saved
    code = f"""
        import sys
        import keras
        try:
            keras.models.load_model({str(folder / 'at.keras')!r})
        except TypeError as e:
            print("refused", "Could not locate class 'RobustModel'" in str(e))
        import tfrobust
        print(type(keras.models.load_model({str(folder / 'at.keras')!r})).__name__)
    """
    assert python(code).split() == ["refused", "True", "RobustModel"]


def test_every_class_registered_with_keras_is_known_to_the_lazy_registration():
    package = ROOT / "tfrobust"
    found = {}
    for path in package.rglob("*.py"):
        source = path.read_text()
        for match in re.finditer(r"register_keras_serializable\(package=\"(\w+)\"\)\s*\nclass (\w+)", source):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[f"{match.group(1)}>{match.group(2)}"] = (module, match.group(2))
    assert found and found == registration.CLASSES


def test_export_serves_images_to_logits_of_the_evaluated_network_in_a_fresh_interpreter(saved):
    folder, _ = saved
    code = f"""
        import numpy as np, tensorflow as tf
        folder = {str(folder)!r}
        x = np.load(folder + "/x.npy")
        expected = np.load(folder + "/expected.npz")
        for name in ("at", "trades_awp_ema"):
            loaded = tf.saved_model.load(folder + "/" + name + "_serve")
            serve = loaded.signatures["serving_default"]
            inputs = serve.structured_input_signature[1]
            assert list(inputs) == ["images"] and inputs["images"].shape.as_list() == [None, 12, 12, 1], inputs
            assert list(serve.structured_outputs) == ["logits"]
            out = loaded.serve(tf.constant(x))["logits"].numpy()
            np.testing.assert_allclose(out, expected[name], rtol=1e-6, atol=1e-6)
            print(name)
    """
    assert python(code).split() == ["at", "trades_awp_ema"]


def test_evaluate_command_takes_a_saved_robust_model_and_uses_its_averaged_network(saved, tmp_path):
    folder, expected = saved
    x, _ = data(8, seed=1)
    y = np.argmax(expected["trades_awp_ema"], axis=1).astype("int64")
    y[:3] = (y[:3] + 1) % CLASSES  # three examples the averaged network gets wrong
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=x, y_test=y)
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--model", str(folder / "trades_awp_ema.keras"), "--data",
         str(npz), "--attacks", "clean", "--integrity-examples", "0", "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    # Another batch size may round a near-tie the other way: such examples may count either way.
    top2 = np.sort(expected["trades_awp_ema"], axis=1)[:, -2:]
    near_ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))
    assert abs(report["accuracy"]["clean"] * 8 - 5) <= near_ties
    # What evaluate loads from the file is the averaged network (the live one differs by > 1e-3 in the logits).
    from tfrobust import loading

    loaded = loading.load(str(folder / "trades_awp_ema.keras"))
    np.testing.assert_allclose(loaded.model_fn(tf.constant(x)).numpy(), expected["trades_awp_ema"], rtol=1e-6, atol=1e-6)


def test_a_subclassed_network_saved_in_a_keras_file_is_evaluated_with_plugin(tmp_path):
    (tmp_path / "user_nets.py").write_text(textwrap.dedent('''
        import keras

        @keras.saving.register_keras_serializable(package="user")
        class TinyNet(keras.Model):
            def __init__(self, classes=4, **kwargs):
                super().__init__(**kwargs)
                self.classes = classes
                self.flat = keras.layers.Flatten()
                self.head = keras.layers.Dense(classes)

            def call(self, x):
                return self.head(self.flat(x))

            def get_config(self):
                return dict(super().get_config(), classes=self.classes)
    '''))
    x, y = data(16)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=x, y_test=y)
    python(f"""
        import numpy as np, user_nets
        net = user_nets.TinyNet()
        net(np.zeros((1, 12, 12, 1), "float32"))
        net.save({str(tmp_path / 'net.keras')!r})
    """, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    argv = [sys.executable, str(ROOT / "evaluate.py"), "--model", str(tmp_path / "net.keras"), "--data", str(npz),
            "--attacks", "clean", "--integrity-examples", "0"]
    refused = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=elsewhere)
    assert refused.returncode == 2
    assert "Could not locate class 'TinyNet'" in refused.stderr and "--plugin" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    ok = subprocess.run(argv + ["--plugin", str(tmp_path / "user_nets.py")], capture_output=True, text=True,
                        env=env, timeout=300, cwd=elsewhere)
    assert ok.returncode == 0, ok.stderr[-3000:]


# --- metrics and Keras callbacks ----------------------------------------------------------------


def test_keras_callbacks_infer_the_direction_of_every_loss_and_accuracy():
    x, y = data()
    model = RobustModel(tiny_cnn(SHAPE, CLASSES), "trades", eps=0.1, step_size=0.05, steps=1, eval_steps=2)
    model.compile(optimizer="sgd", metrics=["accuracy"])
    callbacks = {
        "val_pgd_accuracy": keras.callbacks.EarlyStopping(monitor="val_pgd_accuracy", patience=5),
        "val_pgd_loss": keras.callbacks.ReduceLROnPlateau(monitor="val_pgd_loss", patience=5),
        "kl": keras.callbacks.EarlyStopping(monitor="kl", patience=5),
        "val_loss": keras.callbacks.EarlyStopping(patience=5),  # Keras' default monitor
    }
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, validation_data=(x[:16], y[:16]),
                        callbacks=list(callbacks.values()))
    greater, less = keras.ops.greater, keras.ops.less
    assert callbacks["val_pgd_accuracy"].monitor_op is greater
    assert all(callbacks[k].monitor_op is less for k in ("val_pgd_loss", "kl", "val_loss"))
    # val_loss is the validation objective: the robust cross-entropy, also reported as val_pgd_loss.
    assert history.history["val_loss"] == history.history["val_pgd_loss"]


def test_evaluate_returns_what_metrics_names_lists_starting_with_the_loss():
    x, y = data()
    model = trained("at")
    model.compile(optimizer="sgd", metrics=["accuracy"])
    values = model.evaluate(x, y, verbose=0)
    as_dict = model.evaluate(x, y, verbose=0, return_dict=True)
    assert model.metrics_names == list(EVALUATION_METRICS) + ["accuracy"]
    assert dict(zip(model.metrics_names, values)) == pytest.approx(as_dict)
    assert values[0] == as_dict["loss"] == as_dict["pgd_loss"]
    assert as_dict["accuracy"] == as_dict["pgd_accuracy"]  # compiled metrics see the adversarial logits


def test_reported_terms_are_weighted_like_the_loss_and_accuracies_are_not():
    x, y = data()
    weights = np.where(np.arange(len(y)) % 3 == 0, 5.0, 0.5).astype("float32")
    model = RobustModel(tiny_cnn(SHAPE, CLASSES), "at", eps=0.1, step_size=0.05, steps=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0), metrics=["accuracy"])  # weights stay put
    logs = model.fit(x, y, sample_weight=weights, batch_size=64, epochs=1, verbose=0, shuffle=False).history
    # AT without regularisers: the loss is the weighted mean of ce_adv (float32 sums of 64 terms: 1e-5).
    assert logs["ce_adv"][0] == pytest.approx(logs["loss"][0], rel=1e-5)
    # class_weight becomes sample weights in Keras: the compiled accuracy and adv_accuracy agree, unweighted.
    logs = model.fit(x, y, class_weight={0: 10.0, 1: 0.1, 2: 1.0, 3: 1.0}, batch_size=32, epochs=1, verbose=0).history
    assert logs["accuracy"] == logs["adv_accuracy"]


def test_summary_names_the_defense_the_attack_and_the_network_layers():
    model = RobustModel(tiny_cnn(SHAPE, CLASSES), tr.Defense("trades+awp", awp_gamma=0.005), eps=0.1,
                        step_size=0.025, steps=7, steps_per_epoch=3, ema_decay=0.99)
    lines = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line))
    text = "\n".join(lines)
    assert "defense trades+awp" in text and "awp_gamma=0.005" in text and "beta=6.0" in text
    assert "PGD-7 (linf) eps 0.1, step 0.025" in text and "decay 0.99" in text
    assert "conv2d" in text and "logits" in text  # the network's own rows


# --- the defense's requirements on the network, checked when the model is built -----------------


def backbone_in_a_wrapper():
    """A keras.applications-like backbone (its own model, ending in Dense) nested in a normalising wrapper."""
    keras.utils.set_random_seed(0)
    inner = keras.Input(SHAPE)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inner))
    backbone = keras.Model(inner, keras.layers.Dense(CLASSES, name="predictions")(h), name="backbone")
    outer = keras.Input(SHAPE)
    return keras.Model(outer, backbone(keras.layers.Rescaling(2.0, -1.0)(outer)), name="wrapper")


class Subclassed(keras.Model):
    """A subclassed network whose last assigned attribute is not the layer that gives the logits."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3)
        self.flat = keras.layers.Flatten()
        self.head = keras.layers.Dense(CLASSES, name="head")
        self.features = keras.layers.Dense(8, name="features")

    def call(self, x):
        return self.head(self.features(self.flat(self.conv(x))))


def test_rat_finds_the_logits_layer_in_nested_and_subclassed_networks():
    wrapper = backbone_in_a_wrapper()
    assert weight_space.output_dense_layer(wrapper, CLASSES, "RAT").name == "predictions"
    net = Subclassed()
    net(np.zeros((1,) + SHAPE, "float32"))
    assert weight_space.output_dense_layer(net, CLASSES, "RAT").name == "head"
    for network in (wrapper, Subclassed()):
        model = trained("trades+rat", network=network)
        assert np.isfinite(model.get_metrics_result()["rat_first"])


def test_rat_gradient_is_taken_at_the_logits_layer_of_a_nested_network():
    wrapper = backbone_in_a_wrapper()
    from tfrobust.defenses.rat import last_dense_kernel

    assert last_dense_kernel(wrapper, CLASSES) is wrapper.get_layer("backbone").get_layer("predictions").kernel


def test_a_network_the_defense_cannot_train_is_refused_at_construction_in_one_line():
    inputs = keras.Input(SHAPE)
    h = keras.layers.Dense(CLASSES)(keras.layers.Flatten()(inputs))
    scaled = keras.Model(inputs, keras.layers.Rescaling(2.0)(h))
    with pytest.raises(UserError, match=r"RAT needs the logits to come straight from a Dense layer; .* 'rescaling"):
        RobustModel(scaled, "trades+rat", eps=0.1, step_size=0.05, steps=1)
    RobustModel(scaled, "trades", eps=0.1, step_size=0.05, steps=1)  # nothing else needs the Dense layer
    no_kernel = keras.Sequential([keras.Input(SHAPE), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Rescaling(1.0)])
    with pytest.raises(UserError, match="AWP perturbs the kernels"):
        RobustModel(no_kernel, "at+awp", eps=0.1, step_size=0.05, steps=1, steps_per_epoch=1)


def test_an_unbuilt_network_is_checked_by_fit_before_anything_is_traced():
    class TwoHeads(Subclassed):
        def __init__(self):
            super().__init__()
            self.other = keras.layers.Dense(CLASSES, name="other")

    x, y = data(32)
    model = RobustModel(TwoHeads(), "trades+rat", eps=0.1, step_size=0.05, steps=1)
    model.compile(optimizer="sgd")
    with pytest.raises(UserError, match=r"Dense layers with 4 units are: 'head', 'other'"):
        model.fit(x, y, epochs=1, verbose=0)
    assert model.optimizer.iterations.numpy() == 0


def test_flatness_of_an_averaging_model_must_name_the_network_it_measures():
    x, y = data(16)
    model = trained("at", ema=0.9)
    with pytest.raises(UserError, match="pass model.network"):
        tr.flatness.robust_loss(model, x, y, eps=0.1, steps=1)
    assert np.isfinite(tr.flatness.robust_loss(model.network, x, y, eps=0.1, steps=1))


# --- settings passed whole -------------------------------------------------------------------------


def test_settings_are_one_value_saved_field_by_field_and_checked_where_made():
    from tfrobust.step.settings import FIELDS, StepSettings

    settings = StepSettings(eps=8 / 255, step_size=2 / 255, steps=3, ema_decay=0.99, weight_decay=5e-4, seed=7)
    model = RobustModel(tiny_cnn(SHAPE, CLASSES), "at", settings)
    assert model.settings is settings
    config = model.get_config()
    assert {k: config[k] for k in FIELDS} == settings.to_config()
    assert RobustModel.from_config(config).settings == settings
    same = RobustModel(tiny_cnn(SHAPE, CLASSES), "at", eps=8 / 255, step_size=2 / 255, steps=3, ema_decay=0.99,
                       weight_decay=5e-4, seed=7)
    assert same.settings == settings and settings.validation_step_size == (8 / 255) / 4
    with pytest.raises(UserError, match="either settings or its fields"):
        RobustModel(tiny_cnn(SHAPE, CLASSES), "at", settings, eps=0.1)
    with pytest.raises(UserError, match="needs steps"):
        RobustModel(tiny_cnn(SHAPE, CLASSES), "at", eps=0.1, step_size=0.1)
    with pytest.raises(UserError, match="unknown norm 'l3'"):
        StepSettings(eps=0.1, step_size=0.1, steps=1, norm="l3")
    with pytest.raises(UserError, match="label smoothing applies to the CE term of at and trades; mart has none"):
        RobustModel(tiny_cnn(SHAPE, CLASSES), "mart", StepSettings(eps=0.1, step_size=0.1, steps=1,
                                                                    label_smoothing=0.1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.eps = 0.5


def test_one_hot_labels_are_refused_by_fit_before_anything_is_traced():
    x, y = data(32)
    model = RobustModel(tiny_cnn(SHAPE, CLASSES), "at", eps=0.1, step_size=0.05, steps=1)
    model.compile(optimizer="sgd")
    one_hot = np.eye(CLASSES, dtype="float32")[y]
    with pytest.raises(UserError, match=r"labels of shape \(32, 4\) look one-hot"):
        model.fit(x, one_hot, epochs=1, verbose=0)
    with pytest.raises(UserError, match=r"look one-hot"):
        model.fit(tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(16), epochs=1, verbose=0)
    assert model.optimizer.iterations.numpy() == 0
    with pytest.raises(UserError, match="2 inputs"):
        a, b = keras.Input(SHAPE), keras.Input(SHAPE)
        two = keras.Model([a, b], keras.layers.Dense(CLASSES)(keras.layers.Flatten()(keras.layers.Add()([a, b]))))
        RobustModel(two, "at", eps=0.1, step_size=0.05, steps=1)
