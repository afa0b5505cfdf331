"""Unlabelled examples (label -1, a pool of extra images without labels) enter only TRADES's KL term.

The objective with ``allow_unlabelled`` is ``mean over labelled CE(f(x), y) +
beta * mean over all KL(p(x) || p(x'))`` (Carmon et al. 2019, ``ignore_index=-1``).
The attack is replaced by a fixed elementwise map of the batch (as in
tests/test_accumulation.py), so the step and the objective written out by hand
see bitwise the same ``x'`` and no PGD sign step can turn a rounding
difference into a whole step.
"""

import json
import os
import re
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_cnn
from test_accumulation import TIGHT, FixedAttackModel, largest_gap
from tfrobust import data, extra_data
from tfrobust.cli import train_main
from tfrobust.config import DataConfig
from tfrobust.defenses import Defense
from tfrobust.errors import UserError

EPS, BETA, LR = 0.1, 6.0, 0.1
# One plain SGD step (lr 0.1) from weights of size ~0.1: the step and the hand-written objective differ only
# in the order of float32 sums, ~1e-7 of a gradient entry, so ~1e-8 in the weights. The wrong normalisations
# checked below (CE divided by the whole batch, unlabelled examples given class 0) move them by > 1e-4.
TOL = 1e-6


def one_step(name, x, y, allow_unlabelled=True, strategy=None, accumulate_steps=1, batch=None):
    defense = Defense(name, awp_warmup_epochs=0) if "awp" in name else Defense(name)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = FixedAttackModel(tiny_cnn(seed=4), defense, eps=EPS, step_size=0.025, steps=1, seed=1,
                                 allow_unlabelled=allow_unlabelled, accumulate_steps=accumulate_steps)
        model.compile(optimizer=keras.optimizers.SGD(LR))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch or len(x))
    history = model.fit(dataset, epochs=1, verbose=0, shuffle=False).history
    return model, {k: v[-1] for k, v in history.items()}


def by_hand(x, y, ce_divisor=None, unlabelled_class=None):
    """The step written out: CE over the labelled examples (divided by their count), beta * KL over all."""
    network = tiny_cnn(seed=4)
    x_adv = FixedAttackModel.adversarial_examples(types.SimpleNamespace(settings=types.SimpleNamespace(eps=EPS)),
                                                 tf.constant(x), None)
    labelled = y >= 0
    if unlabelled_class is not None:  # a wrong objective: unlabelled examples counted as one class
        y, labelled = np.where(labelled, y, unlabelled_class), np.ones_like(labelled)
    with tf.GradientTape() as tape:
        logits, logits_adv = network(x, training=True), network(x_adv, training=True)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=np.maximum(y, 0), logits=logits)
        ce_mean = tf.reduce_sum(tf.where(labelled, ce, 0.0)) / (ce_divisor or labelled.sum())
        log_p, log_q = tf.nn.log_softmax(logits), tf.nn.log_softmax(logits_adv)
        kl = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=1)
        loss = ce_mean + BETA * tf.reduce_mean(kl)
    grads = tape.gradient(loss, network.trainable_variables)
    new = [w.numpy() - LR * g.numpy() for w, g in zip(network.trainable_variables, grads)]
    correct = np.argmax(logits.numpy(), axis=1) == y
    return new, {"loss": float(loss), "ce_clean": float(ce_mean), "kl": float(tf.reduce_mean(kl)),
                 "clean_accuracy": float(correct[labelled].mean())}


def gap(model, expected):
    return max(float(np.abs(w.numpy() - e).max()) for w, e in zip(model.network.trainable_variables, expected))


@pytest.fixture(scope="module")
def batch(fashion_subset):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32].copy()
    y[[1, 4, 5, 9, 14, 20, 21, 22, 27, 30, 31]] = -1  # 11 unlabelled among 32, spread over the batch
    return x, y


def test_unlabelled_examples_enter_only_the_kl_term(batch):
    x, y = batch
    model, logs = one_step("trades", x, y)
    expected, values = by_hand(x, y)
    assert gap(model, expected) < TOL
    for key, value in values.items():  # the logs: the loss, the CE over the labelled, the KL over all, accuracy
        assert logs[key] == pytest.approx(value, rel=1e-5), key
    # The check separates the reference's objective from near misses.
    assert gap(model, by_hand(x, y, ce_divisor=len(y))[0]) > 100 * TOL
    assert gap(model, by_hand(x, y, unlabelled_class=0)[0]) > 100 * TOL


def test_a_fully_labelled_batch_trains_as_without_the_option(fashion_subset):
    x, y = fashion_subset[0][:32], fashion_subset[1][:32]
    with_option, logs = one_step("trades", x, y, allow_unlabelled=True)
    without, plain_logs = one_step("trades", x, y, allow_unlabelled=False)
    assert gap(with_option, [w.numpy() for w in without.network.trainable_variables]) < TOL
    # The same predictions counted over the same 32 examples (a rounding-level near-tie may flip one).
    assert abs(logs["clean_accuracy"] - plain_logs["clean_accuracy"]) <= 1 / 32 + 1e-7


@pytest.fixture(scope="module")
def mirrored_strategy():
    # One strategy per process (see tests/test_distributed.py).
    from tfrobust.config import RuntimeConfig
    from tfrobust.experiment import build_strategy

    return build_strategy(RuntimeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"]))


@pytest.mark.slow
def test_the_labelled_mean_is_over_the_global_batch(fashion_subset, mirrored_strategy):
    """Labelled first, unlabelled last (as the extra-data batches are): on two replicas the second holds no
    label, and with two micro-batches the second has none; both must make the one-device update of trades+awp."""
    x, y = fashion_subset[0][:32], fashion_subset[1][:32].copy()
    y[16:] = -1
    whole, _ = one_step("trades+awp", x, y)
    assert largest_gap(whole, one_step("trades+awp", x, y, strategy=mirrored_strategy)[0]) < TIGHT
    assert largest_gap(whole, one_step("trades+awp", x, y, accumulate_steps=2)[0]) < TIGHT
    # A mean per replica (or per micro-batch) would double the CE term: far outside the tolerance.
    doubled = y.copy()
    doubled[:16] = -1  # the other half labelled: another CE term, another update
    assert largest_gap(whole, one_step("trades+awp", x, doubled)[0]) > 100 * TIGHT


@pytest.mark.parametrize("name,reason", [
    ("at", "'at'"), ("mart", "'mart'"), ("trades+s2o", "'trades+s2o'"), ("trades+rat", "'trades+rat'"),
])
def test_defenses_without_a_label_free_term_refuse_unlabelled_examples(name, reason):
    message = f"unlabelled examples enter only TRADES's KL term, which defense {reason}"
    with pytest.raises(UserError, match=re.escape(message)):
        FixedAttackModel(tiny_cnn(), Defense(name), eps=EPS, step_size=0.025, steps=1, allow_unlabelled=True)
    assert not Defense(name).accepts_unlabelled and not Defense(name + "+awp").accepts_unlabelled


def test_trades_and_awp_accept_unlabelled_examples():
    assert Defense("trades").accepts_unlabelled and Defense("trades+awp").accepts_unlabelled


def unlabelled_pool(tmp_path, images):
    path = str(tmp_path / "unlabelled.npz")
    np.savez(path, image=(images * 255).round().astype(np.uint8))
    return path


def test_a_pool_without_labels_gives_label_minus_one(tmp_path, fashion_subset):
    path = unlabelled_pool(tmp_path, fashion_subset[0][400:])
    cache = extra_data.prepare_pool(path)
    images, labels = extra_data.open_pool(cache, (28, 28, 1), 10)
    assert labels is None and len(images) == 200
    assert os.path.exists(os.path.join(cache, extra_data.UNLABELLED))
    assert extra_data.prepare_pool(path) == cache  # converted once
    cfg = DataConfig(train_examples=100, validation_examples=50, batch_size=20, extra_data=path, extra_fraction=0.5)
    ds = data.load_datasets(cfg, seed=2)
    assert ds.unlabelled_extra
    for x, y in ds.train_epochs(0, 1):
        y = y.numpy()
        assert (y[:10] >= 0).all() and (y[10:] == -1).all()


def test_training_on_a_pool_without_labels(tmp_path, fashion_subset, capsys):
    path = unlabelled_pool(tmp_path, fashion_subset[0][400:])
    common = ["--epochs", "1", "--set", "data.train_examples=64", "--set", "data.validation_examples=32",
              "--set", "data.test_examples=32", "--set", "data.batch_size=32", "--set", f"data.extra_data={path}",
              "--set", "data.extra_fraction=0.5", "--set", "attack.steps=1", "--set", "eval.pgd_steps=1",
              "--set", "eval.images_every=0", "--set", "eval.integrity_examples=0", "--set", "runtime.verbose=0",
              "--set", "model.name=small_cnn", "--no-eval"]
    refused = tmp_path / "refused"
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--defense", "at", "--workdir", str(refused)] + common)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"data.extra_data {path} has no labels" in err and "python pseudo_label.py" in err
    assert not refused.exists()  # refused before the run directory was made
    workdir = tmp_path / "trades"
    try:
        code = train_main(["--defense", "trades", "--workdir", str(workdir)] + common)
    except SystemExit as e:
        code = e.code
    assert code in (0, None), capsys.readouterr().err[-2000:]
    with open(workdir / "history.json") as f:
        history = json.load(f)
    assert np.isfinite(history["loss"][0]) and 0.0 <= history["clean_accuracy"][0] <= 1.0
