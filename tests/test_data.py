"""Tests of tfrobust.data: IDX files, splits, tfds loading and augmentation."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from tfrobust import data
from tfrobust.config import DataConfig
from tfrobust.errors import UserError

N_TRAIN = 50
N_TEST = 20


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def _write_gz(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _write_idx_set(directory, n_train=N_TRAIN, n_test=N_TEST, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8)),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)),
    }
    # A recognisable first training image: row r, column c holds (r * 28 + c) % 256.
    arrays["train"][0][0] = (np.arange(28 * 28) % 256).reshape(28, 28).astype(np.uint8)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        _write_gz(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), _idx_bytes(images))
        _write_gz(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), _idx_bytes(labels))
    return arrays


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    if not xs:
        return None, None
    return np.concatenate(xs), np.concatenate(ys)


def _match_rows(found: np.ndarray, originals: np.ndarray) -> np.ndarray:
    """Index into ``originals`` of each image of ``found`` (exact equality), -1 if none."""
    flat_found = found.reshape(len(found), -1)
    flat_orig = originals.reshape(len(originals), -1)
    equal = (flat_found[:, None, :] == flat_orig[None, :, :]).all(axis=2)
    assert (equal.sum(axis=1) <= 1).all()
    return np.where(equal.any(axis=1), equal.argmax(axis=1), -1)


# ---------------------------------------------------------------------------
# IDX files


def test_idx_round_trip_split_and_values(tmp_path):
    arrays = _write_idx_set(str(tmp_path))
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    cfg = DataConfig(name="fashion_mnist", data_dir=str(tmp_path), validation_examples=10, batch_size=8, eval_batch_size=16)
    ds = data.load_datasets(cfg, seed=3)

    assert ds.info == data.dataset_info("fashion_mnist")
    assert (ds.train_size, ds.validation_size, ds.test_size) == (40, 10, 20)
    first_batch = next(iter(ds.train_epochs(0, 1)))
    assert first_batch[0].shape == (8, 28, 28, 1)
    assert first_batch[0].dtype == tf.float32 and first_batch[1].dtype == tf.int32

    x_tr, y_tr = _collect(ds.train_epochs(0, 1))
    x_val, y_val = _collect(ds.validation)
    x_te, y_te = _collect(ds.test)
    assert x_tr.shape == (40, 28, 28, 1) and x_val.shape == (10, 28, 28, 1) and x_te.shape == (20, 28, 28, 1)
    for x in (x_tr, x_val, x_te):
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    # Pixels are the file's bytes divided by 255.
    originals = train_images[..., None].astype(np.float32) / np.float32(255)
    tr_idx = _match_rows(x_tr, originals)
    val_idx = _match_rows(x_val, originals)
    assert (tr_idx >= 0).all() and (val_idx >= 0).all()
    # Train and validation are disjoint and together are the whole training file.
    assert set(tr_idx).isdisjoint(val_idx)
    assert sorted(np.concatenate([tr_idx, val_idx]).tolist()) == list(range(N_TRAIN))
    np.testing.assert_array_equal(y_tr, train_labels[tr_idx].astype(np.int32))
    np.testing.assert_array_equal(y_val, train_labels[val_idx].astype(np.int32))
    # Validation follows the seeded permutation: the last 10 of it.
    _, expected_val = data.split_indices(N_TRAIN, 10, seed=3)
    np.testing.assert_array_equal(val_idx, expected_val)
    # The recognisable image, wherever it went, has exact values.
    where = np.concatenate([x_tr, x_val])[list(np.concatenate([tr_idx, val_idx])).index(0)]
    assert where[0, 5, 0] == np.float32(5) / np.float32(255)
    assert where[2, 3, 0] == np.float32((2 * 28 + 3) % 256) / np.float32(255)
    assert where[27, 27, 0] == np.float32((27 * 28 + 27) % 256) / np.float32(255)
    # Test is the test file in order.
    np.testing.assert_array_equal(x_te, test_images[..., None].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y_te, test_labels.astype(np.int32))


def test_limits_and_seeds(tmp_path):
    arrays = _write_idx_set(str(tmp_path))
    originals = arrays["train"][0][..., None].astype(np.float32) / np.float32(255)
    base = dict(name="fashion_mnist", data_dir=str(tmp_path), validation_examples=10, batch_size=4, eval_batch_size=4)
    full = data.load_datasets(DataConfig(**base), seed=1)
    limited = data.load_datasets(DataConfig(**base, train_examples=15, test_examples=7), seed=1)
    assert (limited.train_size, limited.validation_size, limited.test_size) == (15, 10, 7)
    x_te, _ = _collect(limited.test)
    np.testing.assert_array_equal(x_te, arrays["test"][0][:7, ..., None].astype(np.float32) / np.float32(255))
    # The validation split does not depend on train_examples.
    np.testing.assert_array_equal(_collect(full.validation)[0], _collect(limited.validation)[0])
    # The limited training set is the first 15 of the non-validation permutation.
    train_idx, val_idx = data.split_indices(N_TRAIN, 10, seed=1)
    limited_idx = _match_rows(_collect(limited.train_epochs(0, 1))[0], originals)
    assert sorted(limited_idx.tolist()) == sorted(train_idx[:15].tolist())
    assert set(limited_idx).isdisjoint(val_idx)
    # Another seed holds out other examples.
    other = data.load_datasets(DataConfig(**base), seed=2)
    assert set(_match_rows(_collect(other.validation)[0], originals)) != set(val_idx)


def test_training_arrays_are_the_training_set(tmp_path):
    arrays = _write_idx_set(str(tmp_path))
    cfg = DataConfig(name="fashion_mnist", data_dir=str(tmp_path), validation_examples=10, batch_size=4,
                     train_examples=15, augment=False)
    x, y = data.load_training_arrays(cfg, seed=1)
    assert x.shape == (15, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    train_idx, _ = data.split_indices(N_TRAIN, 10, seed=1)
    np.testing.assert_array_equal(x, arrays["train"][0][train_idx[:15], ..., None].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, arrays["train"][1][train_idx[:15]].astype(np.int32))
    # The same examples as one pass of the training pipeline, in another order.
    x_pipe, y_pipe = _collect(data.load_datasets(cfg, seed=1).train_epochs(0, 1))
    order = _match_rows(x_pipe, x)
    assert sorted(order.tolist()) == list(range(15))
    np.testing.assert_array_equal(y_pipe, y[order])


def test_train_reshuffles_each_epoch_and_is_one_pass(tmp_path):
    _write_idx_set(str(tmp_path))
    cfg = DataConfig(name="fashion_mnist", data_dir=str(tmp_path), validation_examples=5, batch_size=45)
    ds = data.load_datasets(cfg, seed=0)
    epoch1 = _collect(ds.train_epochs(0, 1))[0]
    epoch2 = _collect(ds.train_epochs(1, 2))[0]
    assert len(epoch1) == len(epoch2) == 45
    assert not np.array_equal(epoch1, epoch2)
    assert set(map(bytes, epoch1.reshape(45, -1))) == set(map(bytes, epoch2.reshape(45, -1)))
    # Deterministic for a seed: a new pipeline repeats the same first epoch, and two epochs are the two in turn.
    again = data.load_datasets(cfg, seed=0)
    np.testing.assert_array_equal(_collect(again.train_epochs(0, 1))[0], epoch1)
    np.testing.assert_array_equal(_collect(again.train_epochs(0, 2))[0], np.concatenate([epoch1, epoch2]))


def test_no_validation(tmp_path):
    _write_idx_set(str(tmp_path))
    ds = data.load_datasets(DataConfig(name="mnist", data_dir=str(tmp_path), validation_examples=0, batch_size=16), seed=0)
    assert ds.validation_size == 0 and ds.train_size == N_TRAIN
    assert _collect(ds.validation) == (None, None)
    assert ds.info.name == "mnist"


def test_too_many_validation_examples(tmp_path):
    _write_idx_set(str(tmp_path))
    with pytest.raises(UserError, match="validation_examples"):
        data.load_datasets(DataConfig(data_dir=str(tmp_path), validation_examples=N_TRAIN))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x08\x03\x00\x00" + b"\x00" * 20, "magic"),
        (bytes([0, 0, 0x42, 3]) + b"\x00" * 20, "magic"),
        (bytes([0, 0, 0x08, 3]) + np.asarray([5, 28, 28], ">u4").tobytes() + b"\x00" * 100, "truncated"),
        (bytes([0, 0, 0x08, 3]) + np.asarray([1, 28], ">u4").tobytes(), "truncated"),
        (bytes([0, 0, 0x08, 3]) + np.asarray([1, 28, 28], ">u4").tobytes() + b"\x00" * 800, "more data"),
    ],
)
def test_malformed_idx_raises(tmp_path, payload, message):
    _write_idx_set(str(tmp_path))
    _write_gz(os.path.join(tmp_path, "train-images-idx3-ubyte.gz"), payload)
    with pytest.raises(UserError, match=message):
        data.load_arrays("fashion_mnist", "train", data_dir=str(tmp_path))


def test_not_gzip_and_mismatched_files_raise(tmp_path):
    _write_idx_set(str(tmp_path))
    with open(os.path.join(tmp_path, "t10k-images-idx3-ubyte.gz"), "wb") as f:
        f.write(b"this is not gzip data at all")
    with pytest.raises(UserError, match="t10k-images"):
        data.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))
    _write_gz(os.path.join(tmp_path, "t10k-images-idx3-ubyte.gz"), _idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    with pytest.raises(UserError, match="3 images but"):
        data.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))
    _write_gz(os.path.join(tmp_path, "t10k-images-idx3-ubyte.gz"), _idx_bytes(np.zeros((N_TEST, 32, 32), np.uint8)))
    with pytest.raises(UserError, match="shape"):
        data.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))
    _write_gz(os.path.join(tmp_path, "t10k-images-idx3-ubyte.gz"), _idx_bytes(np.zeros((N_TEST, 28, 28), np.uint8)))
    _write_gz(os.path.join(tmp_path, "t10k-labels-idx1-ubyte.gz"), _idx_bytes(np.full(N_TEST, 10, np.uint8)))
    with pytest.raises(UserError, match="labels outside"):
        data.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))
    os.remove(os.path.join(tmp_path, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is missing"):
        data.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))


def test_read_idx_limit_and_wider_types(tmp_path):
    values = (np.arange(24) - 5).astype(">i4").reshape(6, 4)
    path = os.path.join(tmp_path, "ints.gz")
    _write_gz(path, _idx_bytes(values, type_code=0x0C))
    np.testing.assert_array_equal(data.read_idx(path), values)
    np.testing.assert_array_equal(data.read_idx(path, limit=2), values[:2])
    plain = os.path.join(tmp_path, "plain-idx")
    with open(plain, "wb") as f:
        f.write(_idx_bytes(np.arange(7, dtype=np.uint8)))
    np.testing.assert_array_equal(data.read_idx(plain), np.arange(7))


def test_load_test_arrays(tmp_path):
    arrays = _write_idx_set(str(tmp_path))
    x, y = data.load_test_arrays("fashion_mnist", data_dir=str(tmp_path), limit=5)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(x[..., 0], arrays["test"][0][:5] / np.float32(255))
    np.testing.assert_array_equal(y, arrays["test"][1][:5])


def test_missing_data_dir_and_bad_names(tmp_path):
    missing = os.path.join(tmp_path, "nowhere")
    with pytest.raises(UserError, match="nowhere"):
        data.load_datasets(DataConfig(data_dir=missing))
    with pytest.raises(UserError, match="nowhere"):
        data.load_arrays("cifar10", "train", data_dir=missing)
    for call in (
        lambda: data.dataset_info("imagenet"),
        lambda: data.load_arrays("imagenet", "train"),
        lambda: data.load_datasets(DataConfig(name="imagenet")),
    ):
        with pytest.raises(UserError) as err:
            call()
        assert "imagenet" in str(err.value)
        for allowed in data.SUPPORTED:
            assert allowed in str(err.value)
    with pytest.raises(UserError, match="validation"):
        data.load_arrays("mnist", "validation")


# ---------------------------------------------------------------------------
# The real Fashion-MNIST files of Debian's dataset-fashion-mnist


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist():
    x_train, y_train = data.load_arrays("fashion_mnist", "train")
    assert x_train.shape == (60000, 28, 28, 1) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,)
    assert set(np.unique(y_train)) == set(range(10))
    assert np.bincount(y_train).tolist() == [6000] * 10
    x_test, y_test = data.load_arrays("fashion_mnist", "test", limit=300)
    assert x_test.shape == (300, 28, 28, 1)
    assert data.read_idx(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")).shape == (10000,)
    # The published mean of the training images.
    assert abs(x_train.mean() / 255.0 - data.dataset_info("fashion_mnist").mean[0]) < 1e-3
    ds = data.load_datasets(DataConfig(train_examples=64, test_examples=32, validation_examples=100, batch_size=32), seed=0)
    assert (ds.train_size, ds.validation_size, ds.test_size) == (64, 100, 32)
    x, y = next(iter(ds.train_epochs(0, 1)))
    assert x.shape == (32, 28, 28, 1) and 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


# ---------------------------------------------------------------------------
# tensorflow_datasets (mocked: no network)


def _crops(images: np.ndarray, pad: int, flip: bool) -> list:
    """Every crop of the zero-padded images (optionally mirrored), one array per offset."""
    if flip:
        images = images[:, :, ::-1]
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    h, w = images.shape[1:3]
    return [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]


def _augmented_sources(augmented: np.ndarray, originals: np.ndarray) -> tuple:
    """For each augmented image: whether it is an unmirrored and whether a mirrored crop of an original."""
    plain = np.zeros(len(augmented), bool)
    mirrored = np.zeros(len(augmented), bool)
    for flip, found in ((False, plain), (True, mirrored)):
        for crop in _crops(originals, data.CROP_PADDING, flip):
            found |= _match_rows(augmented, crop) >= 0
    return plain, mirrored


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_tfds_pipeline_and_augmentation(name):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        x_all, y_all = data.load_arrays(name, "train")
        assert x_all.shape == (24, 32, 32, 3) and x_all.dtype == np.uint8
        x_lim, _ = data.load_arrays(name, "test", limit=5)
        assert x_lim.shape == (5, 32, 32, 3)
        cfg = DataConfig(name=name, validation_examples=8, batch_size=8, eval_batch_size=5, augment=True)
        ds = data.load_datasets(cfg, seed=0)
        assert (ds.train_size, ds.validation_size, ds.test_size) == (16, 8, 24)
        for split in (ds.train_epochs(0, 1), ds.validation, ds.test):
            for x, y in split:
                assert x.shape[1:] == (32, 32, 3) and x.shape[0] <= 8
                assert x.dtype == tf.float32 and y.dtype == tf.int32
                assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
                assert 0 <= int(tf.reduce_min(y)) and int(tf.reduce_max(y)) < ds.info.num_classes
        # Validation is not augmented: it is exactly the held-out originals.
        originals = x_all.astype(np.float32) / np.float32(255)
        assert (_match_rows(_collect(ds.validation)[0], originals) >= 0).all()
        # Augmented training images are crops of the padded originals, mirrored only off SVHN.
        plain, mirrored = np.zeros(0, bool), np.zeros(0, bool)
        for epoch in range(3):
            p, m = _augmented_sources(_collect(ds.train_epochs(epoch, epoch + 1))[0], originals)
            plain, mirrored = np.concatenate([plain, p]), np.concatenate([mirrored, m])
        assert (plain | mirrored).all()
        if name == "svhn_cropped":
            assert not mirrored.any()
        else:
            assert mirrored.any() and plain.any()


def test_tfds_cifar100_labels():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        cfg = DataConfig(name="cifar100", validation_examples=2, augment=False, batch_size=16)
        ds = data.load_datasets(cfg)
        x, y = next(iter(ds.train_epochs(0, 1)))
        assert x.shape == (10, 32, 32, 3)
        assert ds.info.num_classes == 100 and int(tf.reduce_max(y)) < 100


def test_tfds_failure_is_one_line_user_error(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    requests = pytest.importorskip("requests")

    def no_network(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Max retries exceeded\nwith url: somewhere")

    monkeypatch.setattr(tfds, "load", no_network)
    with pytest.raises(UserError) as err:
        data.load_arrays("cifar10", "train")
    message = str(err.value)
    assert "\n" not in message
    assert "could not be loaded" in message and "data.data_dir" in message and "network" in message


# ---------------------------------------------------------------------------
# Augmentation function


def test_augment_options():
    assert data.augment_options("cifar10") == {"pad": 4, "flip_probability": 0.5}
    assert data.augment_options("cifar100")["flip_probability"] == 0.5
    assert data.augment_options("svhn_cropped") == {"pad": 4, "flip_probability": 0.0}
    assert data.augment_options("fashion_mnist") is None
    assert data.augment_options("mnist") is None
    assert data.augment_options("cifar10", augment=False) is None


def test_augment_batch_flip_and_crop():
    rng = np.random.default_rng(0)
    images = rng.random((6, 32, 32, 3)).astype(np.float32)
    seed = tf.constant([7, 9], tf.int64)
    flipped = data.augment_batch(images, seed, pad=0, flip_probability=1.0).numpy()
    np.testing.assert_array_equal(flipped, images[:, :, ::-1])
    assert not np.array_equal(flipped, images)
    np.testing.assert_array_equal(data.augment_batch(images, seed, pad=0, flip_probability=0.0).numpy(), images)
    # SVHN's options never mirror, whatever the seed.
    svhn = data.augment_options("svhn_cropped")
    for s in range(5):
        out = data.augment_batch(images, tf.constant([s, 1], tf.int64), **svhn).numpy()
        assert out.shape == images.shape
        plain, mirrored = _augmented_sources(out, images)
        assert plain.all() and not mirrored.any()
    # Crops differ between images of a batch and between seeds; values stay in range.
    a = data.augment_batch(images, tf.constant([1, 2], tf.int64), pad=4, flip_probability=0.0).numpy()
    b = data.augment_batch(images, tf.constant([1, 3], tf.int64), pad=4, flip_probability=0.0).numpy()
    assert not np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(
        a, data.augment_batch(images, tf.constant([1, 2], tf.int64), pad=4, flip_probability=0.0).numpy()
    )
