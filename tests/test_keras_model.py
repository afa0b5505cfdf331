"""RobustModel as a Keras model: saving, callbacks, regularizers, sample weights, metrics, checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from tfrobust import attacks
from tfrobust.defenses import DEFENSES, Defense, parse_defense
from tfrobust.errors import UserError
from tfrobust.trainer import RobustModel, start_point


@pytest.fixture(scope="module")
def batch(fashion_subset):
    x, y = fashion_subset
    return x[:64], y[:64]


def regularized_cnn(l2=10.0, batch_norm=True, seed=0):
    """A user's network: conv + BatchNorm + L2-regularised dense layers."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(4, 3)(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D(4)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(l2))(h)
    outputs = keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(l2))(h)
    return keras.Model(inputs, outputs)


def robust(network, defense, eps=0.1, steps=1, lr=0.05, momentum=0.9, **kwargs):
    kwargs.setdefault("steps_per_epoch", 2)
    model = RobustModel(network, defense, eps=eps, step_size=eps / 4, steps=steps, seed=1, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum))
    return model


def weights_of(model):
    return [np.array(w.numpy()) for w in model.weights]


# --- saving and callbacks --------------------------------------------------------


def test_save_and_load_model_round_trip_weights_and_defense(tmp_path, batch):
    x, y = batch
    d = Defense("trades+awp", awp_gamma=0.007, awp_warmup_epochs=1, unclipped_gaussian_start=True)
    model = robust(regularized_cnn(l2=1e-3), d, eps=0.2, weight_decay=5e-4, eval_steps=3)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "robust.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, RobustModel)
    assert loaded.defense == d
    saved, original = loaded.get_config(), model.get_config()
    assert saved.pop("network")["class_name"] == original.pop("network")["class_name"] == "Functional"
    assert saved == original
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    for a, b in zip(weights_of(loaded), weights_of(model)):
        np.testing.assert_array_equal(a, b)
    # The optimizer state (step count drives the AWP warm-up) comes back too.
    assert int(loaded.optimizer.iterations.numpy()) == 2
    np.testing.assert_array_equal(loaded.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0))


def test_model_checkpoint_saves_whole_model(tmp_path, batch):
    x, y = batch
    model = robust(tiny_cnn(batch_norm=True), Defense("at+awp"))
    path = str(tmp_path / "epoch.keras")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(path)])
    loaded = keras.models.load_model(path)
    assert loaded.defense == Defense("at+awp")
    for a, b in zip(weights_of(loaded.network), weights_of(model.network)):
        np.testing.assert_array_equal(a, b)


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise RuntimeError("interrupted")


@pytest.mark.slow
def test_backup_and_restore_resumes_an_interrupted_fit(tmp_path, batch):
    x, y = batch
    d = Defense("trades+awp", awp_warmup_epochs=1)

    def fresh():
        return robust(tiny_cnn(batch_norm=True, seed=4), d, momentum=0.0)

    backup = str(tmp_path / "backup")
    interrupted = fresh()
    with pytest.raises(RuntimeError):
        interrupted.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False,
                        callbacks=[keras.callbacks.BackupAndRestore(backup), _StopAfterFirstEpoch()])
    resumed = fresh()
    history = resumed.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False,
                          callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 1  # only the second epoch ran
    assert history.history["awp_relative_norm"][0] > 0  # past the one-epoch warm-up
    straight = fresh()
    straight.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    # Same process, same machine, same seeds: only float summation order could differ
    # between the two runs, so a tolerance of a few ulps of the weights suffices.
    for a, b in zip(weights_of(resumed.network), weights_of(straight.network)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- the network's own losses ---------------------------------------------------------


def test_regularization_losses_enter_the_reported_loss(batch):
    x, y = batch
    network = regularized_cnn(l2=10.0, batch_norm=False)
    plain = keras.models.clone_model(network)
    plain.set_weights(network.get_weights())
    plain.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = plain.evaluate(x, y, batch_size=64, verbose=0)
    ce_only = float(np.mean(attacks.cross_entropy(network(x), y)))
    assert expected > 10 * ce_only  # the regularizers dominate: a real check
    model = robust(network, Defense("at"), eps=0.0, steps=0, lr=0.0)
    reported = model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False).history["loss"][0]
    # float32 sums in a different order: relative agreement to 1e-5.
    np.testing.assert_allclose(reported, expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["at+awp", "trades+awp", "mart+awp"])
def test_awp_ascent_includes_regularization_losses(batch, name):
    x, y = batch
    network = regularized_cnn(l2=0.5, batch_norm=False)
    model = robust(network, Defense(name), eps=0.0, steps=0)
    grads = model.ascent_gradients(tf.constant(x), tf.constant(x), tf.constant(y))
    kernels = [v for v in network.trainable_variables if len(v.shape) >= 2]
    d = Defense(name)
    with tf.GradientTape() as tape:
        logits = network(x, training=True)
        primary, regulariser, _ = d.objective.loss_terms(logits, logits, y, d.beta)
        penalty = sum(0.5 * tf.reduce_sum(tf.square(k)) for k in kernels[1:])  # L2(0.5) on both dense kernels
        loss = tf.reduce_mean(primary + regulariser) + penalty
    expected = tape.gradient(loss, kernels)
    # Independent float32 computation of the same gradient: agreement to 1e-5 relative.
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(expected[-1].numpy()).max() > 0.1  # the penalty's share is not negligible


# --- sample weights ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["at+awp", "trades"])
def test_zero_sample_weights_equal_training_on_the_rest(batch, name):
    x, y = batch
    weights = np.r_[np.ones(32), np.zeros(32)].astype("float32")
    # eps 0: the attack returns x, so the two runs see the same inputs.
    weighted = robust(tiny_cnn(seed=2), Defense(name), eps=0.0, steps=0, steps_per_epoch=1)
    weighted.fit(x, y, sample_weight=weights, batch_size=64, epochs=1, verbose=0, shuffle=False)
    half = robust(tiny_cnn(seed=2), Defense(name), eps=0.0, steps=0, steps_per_epoch=1)
    half.fit(x[:32], y[:32], batch_size=64, epochs=1, verbose=0, shuffle=False)
    # Weighted sum over 64 vs mean over 32: float32 rounding only.
    for a, b in zip(weights_of(weighted.network), weights_of(half.network)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sample_weights_give_the_weighted_mean_loss(batch):
    x, y = batch
    network = tiny_cnn(seed=5)
    w = np.random.default_rng(0).uniform(0.1, 3.0, size=64).astype("float32")
    ce = attacks.cross_entropy(network(x), y).numpy()
    model = robust(network, Defense("at"), eps=0.0, steps=0, lr=0.0)
    reported = model.fit(x, y, sample_weight=w, batch_size=64, epochs=1, verbose=0).history["loss"][0]
    np.testing.assert_allclose(reported, np.sum(w * ce) / np.sum(w), rtol=1e-5)  # float32 rounding
    assert abs(np.sum(w * ce) / np.sum(w) - ce.mean()) > 1e-3  # weighting changes the number


# --- compiled metrics and compile ---------------------------------------------------


def test_compiled_metrics_follow_adversarial_logits(fashion_subset):
    x, y = fashion_subset
    model = RobustModel(tiny_cnn(), Defense("at"), eps=0.1, step_size=0.025, steps=2, eval_steps=2, seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["sparse_categorical_accuracy"])
    history = model.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0,
                        validation_data=(x[500:], y[500:])).history
    assert history["sparse_categorical_accuracy"] == history["adv_accuracy"]
    assert history["val_sparse_categorical_accuracy"] == history["val_pgd_accuracy"]
    result = model.evaluate(x[500:], y[500:], verbose=0, return_dict=True)
    assert result["sparse_categorical_accuracy"] == result["pgd_accuracy"]


def test_compile_with_a_loss_is_refused():
    model = RobustModel(tiny_cnn(), Defense("at"), eps=0.1, step_size=0.025, steps=1)
    with pytest.raises(UserError, match="without loss"):
        model.compile(optimizer="sgd", loss="mse")


# --- AWP warm-up -----------------------------------------------------------------------


def test_awp_warmup_in_epochs_needs_the_epoch_length(batch):
    with pytest.raises(UserError) as refused:
        RobustModel(tiny_cnn(), "trades+awp", eps=0.1, step_size=0.025, steps=1)
    # The message names both ways out, the second in a form RobustModel takes as it is written.
    assert "steps_per_epoch=" in str(refused.value)
    assert "Defense('trades+awp', awp_warmup_epochs=0)" in str(refused.value)
    RobustModel(tiny_cnn(), Defense("trades+awp", awp_warmup_epochs=0), eps=0.1, step_size=0.025, steps=1)
    x, y = batch
    model = robust(tiny_cnn(), Defense("trades+awp"), steps_per_epoch=3)
    with pytest.raises(UserError, match="2 steps per epoch"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)


# --- logits, not probabilities ------------------------------------------------------


def test_network_ending_in_softmax_is_refused():
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Flatten()(inputs)
    probabilities = keras.layers.Dense(10, activation="softmax")(h)
    with pytest.raises(UserError, match="probabilities"):
        RobustModel(keras.Model(inputs, probabilities), Defense("at"), eps=0.1, step_size=0.025, steps=1)


def test_subclassed_network_ending_in_softmax_is_refused_at_fit(batch):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.flat = keras.layers.Flatten()
            self.dense = keras.layers.Dense(10)

        def call(self, x):
            return keras.activations.softmax(self.dense(self.flat(x)))

    x, y = batch
    net = Net()
    model = RobustModel(net, Defense("at"), eps=0.1, step_size=0.025, steps=1)  # unbuilt: shape unknown yet
    model.compile(optimizer="sgd")
    net(x[:1])
    with pytest.raises(UserError, match="probabilities"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)


def test_unbuilt_network_ending_in_softmax_is_refused_when_fit_builds_it(batch):
    x, y = batch
    net = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])  # no Input
    model = RobustModel(net, Defense("at"), eps=0.1, step_size=0.025, steps=1)
    model.compile(optimizer="sgd")
    with pytest.raises(UserError, match="probabilities"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    logits_net = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(10)])
    model = RobustModel(logits_net, Defense("at"), eps=0.1, step_size=0.025, steps=1)
    model.compile(optimizer="sgd")
    assert np.isfinite(model.fit(x, y, batch_size=32, epochs=1, verbose=0).history["loss"][0])


# --- Defense from a name, and the reference's unclipped Gaussian start -------------------


@pytest.mark.parametrize("name", DEFENSES)
def test_defense_from_name_equals_parse_defense(name):
    d = Defense(name)
    assert d == parse_defense(name)
    assert Defense(**d.hyperparameters()) == d


def test_defense_keyword_overrides_and_refusals():
    d = Defense("TRADES + awp", awp_gamma=0.002, beta=3)
    assert (d.name, d.base, d.awp, d.awp_gamma, d.beta, d.awp_warmup_epochs) == ("trades+awp", "trades", True, 0.002, 3.0, 10)
    assert Defense("rat").name == "trades+rat" and Defense("rat").rat
    with pytest.raises(UserError, match="awp=False, not True"):
        Defense("trades", awp=True)
    with pytest.raises(UserError, match="gamma"):
        Defense("at+awp", awp_gamma=-1)
    with pytest.raises(UserError, match="unknown defense"):
        Defense("madry")


def test_unclipped_gaussian_start_is_the_reference_start():
    x = tf.zeros((4, 28, 28, 1))
    seed = tf.constant([3, 0], tf.int32)
    clipped = start_point(x, 0.1, "linf", "gaussian", seed).numpy()
    raw = start_point(x, 0.1, "linf", "gaussian_unclipped", seed).numpy()
    assert clipped.min() == 0.0 and raw.min() < 0.0
    np.testing.assert_array_equal(np.clip(raw, 0, 1), clipped)
    assert Defense("trades", unclipped_gaussian_start=True).attack_start == "gaussian_unclipped"
    assert Defense("mart").attack_start == "gaussian"
    assert Defense("at", unclipped_gaussian_start=True).attack_start == "uniform"  # AT starts uniformly


def test_unclipped_start_changes_the_trades_attack_on_black_pixels(batch):
    x, y = batch
    network = tiny_cnn(seed=6)
    clipped = robust(network, Defense("trades"), steps=1)
    reference = robust(network, Defense("trades", unclipped_gaussian_start=True), steps=1)
    a = clipped.adversarial_examples(tf.constant(x), tf.constant(y)).numpy()
    b = reference.adversarial_examples(tf.constant(x), tf.constant(y)).numpy()
    assert (x == 0).mean() > 0.3  # Fashion-MNIST: many exact zeros
    # From a clipped start the KL gradient at x' = x is zero there; the reference's start is not x.
    assert not np.array_equal(a, b)
    for adv in (a, b):
        assert adv.min() >= 0.0 and adv.max() <= 1.0 and np.abs(adv - x).max() <= 0.1 + 1e-6


def test_config_option_reaches_the_defense():
    from tfrobust.config import load_config

    cfg = load_config(overrides={"defense.name": "mart", "defense.unclipped_gaussian_start": "true"})
    assert parse_defense(cfg.defense.name, cfg.defense).attack_start == "gaussian_unclipped"
    assert parse_defense("mart").attack_start == "gaussian"


# --- under tf.distribute ------------------------------------------------------------------


def test_weights_and_regularizers_on_two_replicas_match_one_device(batch):
    from tfrobust.config import RuntimeConfig
    from tfrobust.experiment import build_strategy

    x, y = batch[0][:32], batch[1][:32]
    # Uneven weights: the first replica's half of the batch weighs more, so a per-replica
    # normalisation (instead of the global sum of weights) would give a different step.
    w = np.r_[np.full(16, 3.0), np.linspace(0.1, 1.0, 16)].astype("float32")

    def one_step(strategy):
        with strategy.scope():
            model = RobustModel(regularized_cnn(l2=0.05, batch_norm=False, seed=3), Defense("at+awp"),
                                eps=0.0, step_size=0.0, steps=0, seed=7)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.0))
        model.fit(tf.data.Dataset.from_tensor_slices((x, y, w)).batch(32), epochs=1, verbose=0)
        return model

    single = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"))
    mirrored = one_step(build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"])))
    moved = 0.0
    for a, b, w0 in zip(single.network.trainable_variables, mirrored.network.trainable_variables,
                        regularized_cnn(l2=0.05, batch_norm=False, seed=3).trainable_variables):
        replicas = [r.numpy() for r in b.value.values]
        # eps = 0: no sign step amplifies rounding, so float32 summation order is the only difference.
        np.testing.assert_allclose(replicas[0], a.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(replicas[0], replicas[1])
        moved = max(moved, float(np.abs(a.numpy() - w0.numpy()).max()))
    assert moved > 1e-3
