"""Extra (generated or pseudo-labelled) images mixed into every training batch (tfrobust/extra_data.py)."""

import os

import keras
import numpy as np
import pytest

from conftest import tiny_cnn
from tfrobust import data, extra_data
from tfrobust.cli import pseudo_label_main
from tfrobust.config import DataConfig, load_config
from tfrobust.errors import UserError
from tfrobust.trainer import RobustModel


def constant_pool(n, shape=(28, 28), labels=True):
    """Images whose every pixel is i % 251 + 2 (never a Fashion-MNIST image), labels (3 i) % 10."""
    value = (np.arange(n) % 251 + 2).astype(np.uint8)
    x = np.broadcast_to(value.reshape((n,) + (1,) * len(shape)), (n,) + shape).copy()
    return (x, (3 * np.arange(n)) % 10) if labels else (x, None)


def test_prepare_pool_streams_a_compressed_npz_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(extra_data, "_CHUNK", 7)  # many chunks and a partial last one
    x, y = constant_pool(50, (4, 5, 3))
    path = str(tmp_path / "pool.npz")
    np.savez_compressed(path, image=x, label=y)
    cache = extra_data.prepare_pool(path)
    assert cache == path + ".cache"
    images, labels = extra_data.open_pool(cache, (4, 5, 3), 10)
    assert isinstance(images, np.memmap)
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    assert extra_data.prepare_pool(path) == cache  # converted once


def test_pool_errors_are_one_line(tmp_path):
    x, _ = constant_pool(10)
    labels_only = str(tmp_path / "l.npz")
    np.savez(labels_only, label=np.zeros(10, np.int64))
    with pytest.raises(UserError, match="has no images: need one of the keys image, images, x"):
        extra_data.prepare_pool(labels_only)
    bad = str(tmp_path / "b.npz")
    np.savez(bad, images=x, labels=np.full(10, 12))
    with pytest.raises(UserError, match=r"labels must be in \[0, 9\], found 12..12"):
        extra_data.open_pool(extra_data.prepare_pool(bad), (28, 28, 1), 10)
    with pytest.raises(UserError, match=r"shape \(28, 28\), the data set's are \(32, 32, 3\)"):
        extra_data.open_pool(extra_data.prepare_pool(bad), (32, 32, 3), 10)
    with pytest.raises(UserError, match="extra data file not found"):
        extra_data.prepare_pool(str(tmp_path / "missing.npz"))
    with pytest.raises(UserError, match="choose a fraction in"):
        extra_data.split_batch(4, 0.2)  # floor(0.8) = 0 extra examples
    with pytest.raises(UserError, match=r"data.extra_fraction must be in \(0, 1\)"):
        load_config(overrides={"data.extra_fraction": "1.5"})


def test_every_batch_mixes_the_pool_deterministically_per_epoch(tmp_path):
    pool_x, pool_y = constant_pool(250)
    path = str(tmp_path / "pool.npz")
    np.savez(path, image=pool_x, label=pool_y)
    cfg = DataConfig(train_examples=100, validation_examples=50, batch_size=20, extra_data=path, extra_fraction=0.7)
    ds = data.load_datasets(cfg, seed=5)
    labelled, extra = 6, 14

    def epochs(start, end):
        return [(x.numpy(), y.numpy()) for x, y in ds.train_epochs(start, end)]

    both = epochs(0, 2)
    assert len(both) == 10  # ceil(100 / 20) batches per epoch, as without extra data
    seen = []
    for x, y in both[:5]:
        flat = x.reshape(len(x), -1)
        constant = (flat == flat[:, :1]).all(axis=1)
        n_lab = labelled
        assert len(x) == 20
        assert not constant[:n_lab].any() and constant[n_lab:].all()
        index = np.rint(flat[n_lab:, 0] * 255).astype(int) - 2  # pool index (the pool has 250 images)
        np.testing.assert_array_equal(y[n_lab:], (3 * index) % 10)  # each image keeps its own label
        seen.append(flat[:n_lab])
    assert len(np.unique(np.concatenate(seen), axis=0)) == 30  # 30 distinct labelled examples per epoch
    resumed = epochs(1, 2)  # a resumed run's second epoch
    assert len(resumed) == 5
    for (a, b), (c, d) in zip(both[5:], resumed):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert not np.array_equal(both[0][0], both[5][0])

    model = RobustModel(tiny_cnn(seed=1), "trades", eps=0.1, step_size=0.025, steps=1, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    history = model.fit(ds.train_epochs(0, 1), steps_per_epoch=5, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_pseudo_label_command(tmp_path, trained_tiny, fashion_subset, capsys):
    x = (fashion_subset[0][500:600] * 255).round().astype(np.uint8)[..., 0]  # (N, 28, 28) uint8
    source = str(tmp_path / "unlabelled.npz")
    np.savez_compressed(source, image=x)
    net_path = str(tmp_path / "net.keras")
    trained_tiny.save(net_path)
    out = str(tmp_path / "labelled.npz")
    assert pseudo_label_main(["--model", net_path, "--data", source, "--output", out, "--batch-size", "32"]) == 0
    assert "wrote 100 pseudo-labelled images" in capsys.readouterr().out
    with np.load(out) as f:
        np.testing.assert_array_equal(f["image"], x)
        want = np.argmax(trained_tiny(x[..., None].astype(np.float32) / 255.0, training=False).numpy(), axis=1)
        np.testing.assert_array_equal(f["label"], want)
        assert len(np.unique(f["label"])) > 3  # a trained network, not a constant labelling
    # The output is refused when it exists, with a one-line error and status 2.
    with pytest.raises(SystemExit) as exit_info:
        pseudo_label_main(["--model", net_path, "--data", source, "--output", out])
    assert exit_info.value.code == 2
    assert "exists; choose another --output" in capsys.readouterr().err
    assert not os.path.exists(out + ".partial")
