"""Image classification data sets as ``tf.data`` pipelines: the splits, the epochs, augmentation.

The arrays come from :mod:`tfrobust.data_sources` (IDX files, tfds, folders,
``.npz``). Images stay ``uint8`` (or the user's float32) in memory and are
turned into ``float32`` values in ``[0, 1]`` inside the pipeline. A
validation split is held out from the training split with a permutation
fixed by a seed, so it never overlaps the examples trained on and never
touches the test set. Augmentation (pad 4, random crop, horizontal flip
except on SVHN) applies to the 32x32 built-in data sets only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfrobust import seeds
from tfrobust.config import DATA_SETS, DataConfig
from tfrobust.data_sources import (  # noqa: F401 - the data set's sources, re-exported as data's own
    DEBIAN_FASHION_MNIST_DIR, FOLDER_TEST_FRACTION, DatasetInfo, check_data_dir, check_source, dataset_info,
    load_arrays, load_test_arrays, read_idx, source_info, source_kind, unit_float,
)
from tfrobust.errors import UserError

SUPPORTED = DATA_SETS

# Pixels of zero padding before the random crop of the 32x32 data sets.
CROP_PADDING = 4


@dataclasses.dataclass
class Datasets:
    """The three splits of a data set, batched and ready for training."""

    validation: tf.data.Dataset
    test: tf.data.Dataset
    info: DatasetInfo
    train_size: int
    validation_size: int
    test_size: int
    # train_epochs(start, end): the training set's epochs start..end-1 back to
    # back, each shuffled and augmented as a function of (seed, epoch) only, so
    # that a resumed run sees exactly the batches an uninterrupted run would.
    train_epochs: Callable
    # True when data.extra_data has no labels: its examples carry the label -1
    # (only TRADES's KL term uses them, RobustModel(allow_unlabelled=True)).
    unlabelled_extra: bool = False
    # Examples in the training split before the validation split and data.train_examples.
    split_size: Optional[int] = None
    # train_subset(n): the first n training examples, unaugmented, as float arrays in [0, 1] and labels.
    train_subset: Optional[Callable] = None


VALIDATION_MAX_SHARE = 0.5
VALIDATION_WARN_SHARE = 0.2


def split_indices(num_examples: int, validation_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices into a training split of ``num_examples``.

    The split is permuted with a generator seeded by ``seed``; the last
    ``validation_examples`` of the permutation are validation, the rest are
    training. The two never share an index. A validation split of more than
    half the training split is refused (:data:`VALIDATION_MAX_SHARE`).
    """
    if validation_examples < 0:
        raise UserError(f"data.validation_examples must be >= 0, got {validation_examples}")
    if validation_examples > VALIDATION_MAX_SHARE * num_examples:
        suggestion = max(1, int(0.1 * num_examples))
        raise UserError(
            f"data.validation_examples={validation_examples} would hold out more than half of the "
            f"{num_examples} training examples; set data.validation_examples (e.g. --set "
            f"data.validation_examples={suggestion}, 10%) or 0 for no validation"
        )
    permutation = np.random.default_rng(seed).permutation(num_examples)
    cut = num_examples - validation_examples
    return permutation[:cut], permutation[cut:]


def validation_warning(num_examples: int, validation_examples: int) -> Optional[str]:
    """A one-line warning when validation takes more than :data:`VALIDATION_WARN_SHARE` of the training split."""
    if num_examples and validation_examples > VALIDATION_WARN_SHARE * num_examples:
        return (f"data.validation_examples={validation_examples} holds out {validation_examples / num_examples:.0%} "
                f"of the {num_examples} training examples; lower it with --set data.validation_examples=N "
                "if that is more than intended")
    return None


def stratified_subset(y, count: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``count`` examples drawn at random, every label in proportion to its frequency.

    Each label gets ``count * n_label / n`` examples rounded down, and the
    examples left over go to the labels with the largest remainders (ties to
    the smaller label). The draw depends on ``(y, count, seed)`` only: the same
    seed gives the same subset. ``count >= len(y)`` gives every index.
    """
    y = np.asarray(y).reshape(len(y), -1)[:, 0] if np.ndim(y) > 1 else np.asarray(y)
    n = len(y)
    if count >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(y, return_counts=True)
    quota = counts * count / n
    share = np.floor(quota).astype(np.int64)
    left = count - int(share.sum())
    order = sorted(range(len(labels)), key=lambda i: (-(quota[i] - share[i]), i))
    for i in order[:left]:
        share[i] += 1
    chosen = [rng.choice(np.flatnonzero(y == label), size=int(k), replace=False)
              for label, k in zip(labels, share) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------
# Augmentation


def augment_options(name: str, augment: bool = True) -> Optional[dict]:
    """Keyword arguments of :func:`augment_batch` for ``name``, or None for none.

    32x32 data sets get a 4-pixel pad and random crop, plus a random
    horizontal flip except on SVHN, whose digits are not mirror symmetric.
    28x28 data sets and the user's own data are not augmented.
    """
    if source_kind(name) != "builtin":
        return None
    info = dataset_info(name)
    if not augment or info.image_shape[:2] != (32, 32):
        return None
    return {"pad": CROP_PADDING, "flip_probability": 0.0 if name == "svhn_cropped" else 0.5}


def augment_batch(images: tf.Tensor, seed, pad: int = CROP_PADDING, flip_probability: float = 0.5) -> tf.Tensor:
    """Random crops (after zero padding) and horizontal flips of a batch.

    Args:
      images: (B, H, W, C) images.
      seed: a stateless seed, an int tensor of shape (2,).
      pad: pixels of zeros added on every side before cropping back to (H, W).
      flip_probability: chance that an image is mirrored left to right.
    """
    images = tf.convert_to_tensor(images)
    seed = tf.cast(seed, tf.int64)
    shape = tf.shape(images)
    batch, height, width = shape[0], images.shape[1], images.shape[2]
    if pad > 0:
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        offsets = tf.random.stateless_uniform(
            [batch, 2], seed=tf.stack([seed[0], seed[1] * 2]), minval=0, maxval=2 * pad + 1, dtype=tf.int32
        )
        rows = offsets[:, :1] + tf.range(height)[tf.newaxis, :]
        cols = offsets[:, 1:] + tf.range(width)[tf.newaxis, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    if flip_probability > 0:
        draw = tf.random.stateless_uniform([batch], seed=tf.stack([seed[0], seed[1] * 2 + 1]))
        flip = draw < flip_probability
        images = tf.where(flip[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(images, axis=[2]), images)
    return images


# ---------------------------------------------------------------------------
# Pipelines


def _to_float(x, y):
    if x.dtype != tf.uint8:  # the user's float images, already in [0, 1]
        return tf.cast(x, tf.float32), tf.cast(y, tf.int32)
    return tf.cast(x, tf.float32) / 255.0, tf.cast(y, tf.int32)


def _eval_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
    return ds.batch(batch_size).map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _epochs_pipeline(x: np.ndarray, y: np.ndarray, cfg: DataConfig, seed: int, start: int, end: int) -> tf.data.Dataset:
    """Epochs ``start`` .. ``end - 1``; epoch e is permuted and augmented from (seed, e) alone."""
    images = tf.constant(x)
    labels = tf.constant(y.astype(np.int32))
    n = len(x)
    options = augment_options(cfg.name, cfg.augment)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                         seed=seeds.epoch_seed(seed, epoch))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(cfg.batch_size).enumerate()

        def gather(index, idx):
            batch_x, batch_y = _to_float(tf.gather(images, idx), tf.gather(labels, idx))
            if options is not None:
                batch_x = augment_batch(batch_x, seeds.augment_seed(seed, epoch, index), **options)
            return batch_x, batch_y

        return batches.map(gather)

    return tf.data.Dataset.range(int(start), int(end)).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def _mixed_epochs_pipeline(x, y, cfg: DataConfig, seed: int, start: int, end: int, pool, labelled: int, extra: int):
    """Epochs of ``ceil(N / batch_size)`` batches (as without extra data and as the references), each of
    ``labelled`` training examples taken in turn from a permutation per (seed, epoch), so that an
    epoch sees a fresh subset of them, and ``extra`` pool examples drawn with replacement from
    (seed, epoch, batch); augmented together."""
    pool_images, pool_labels = pool
    images = tf.constant(x)
    labels = tf.constant(y.astype(np.int32))
    n, size = len(x), len(pool_images)
    options = augment_options(cfg.name, cfg.augment)
    shape = tuple(int(d) for d in x.shape[1:])
    pool_dtype = tf.as_dtype(pool_images.dtype)

    def read(idx):
        batch = np.asarray(pool_images[idx])
        if pool_labels is None:  # a pool without labels: -1 marks its examples
            return batch.reshape((len(idx),) + shape), np.full(len(idx), -1, np.int32)
        return batch.reshape((len(idx),) + shape), np.asarray(pool_labels[idx]).astype(np.int32)

    steps = max(1, math.ceil(n / cfg.batch_size))
    rounds = math.ceil(steps * labelled / n)  # permutations needed (more than one only for tiny sets)

    def one_epoch(epoch):
        order = tf.concat([
            tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                     seed=seeds.epoch_seed(seed, epoch, r))
            for r in range(rounds)
        ], axis=0)[: steps * labelled]
        batches = tf.data.Dataset.from_tensor_slices(order).batch(labelled).enumerate()

        def gather(index, idx):
            x_lab, y_lab = _to_float(tf.gather(images, idx), tf.gather(labels, idx))
            pick_seed = seeds.extra_draw_seed(seed, epoch, index)
            pick = tf.sort(tf.random.stateless_uniform([extra], pick_seed, minval=0, maxval=size, dtype=tf.int64))
            x_ext, y_ext = tf.numpy_function(read, [pick], [pool_dtype, tf.int32], stateful=False)
            x_ext = tf.ensure_shape(x_ext, (extra,) + shape)
            y_ext = tf.ensure_shape(y_ext, (extra,))
            x_ext, y_ext = _to_float(x_ext, y_ext)
            batch_x = tf.concat([x_lab, x_ext], axis=0)
            batch_y = tf.concat([y_lab, y_ext], axis=0)
            if options is not None:
                batch_x = augment_batch(batch_x, seeds.augment_seed(seed, epoch, index), **options)
            return batch_x, batch_y

        return batches.map(gather)

    return tf.data.Dataset.range(int(start), int(end)).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def load_datasets(cfg: DataConfig, seed: int = 0) -> Datasets:
    """Builds the train, validation and test pipelines described by ``cfg``.

    The training split is permuted with ``seed``; its last
    ``cfg.validation_examples`` examples become the validation set and the
    first ``cfg.train_examples`` of the rest the training set. The test set
    is the first ``cfg.test_examples`` of the test split, in file order.
    ``train_epochs(start, end)`` gives the training epochs, each shuffled
    (and augmented) from ``(seed, epoch)``.
    """
    info = source_info(cfg.name, cfg.data_dir)
    if cfg.mean is not None or cfg.std is not None:
        channels = info.image_shape[-1]
        mean = tuple(float(m) for m in (cfg.mean if cfg.mean is not None else [0.0] * channels))
        std = tuple(float(v) for v in (cfg.std if cfg.std is not None else [1.0] * channels))
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise UserError(f"data.mean and data.std need {channels} values (one per channel), std > 0; "
                            f"got {list(mean)} and {list(std)}")
        info = dataclasses.replace(info, mean=mean, std=std)
    if cfg.batch_size <= 0 or cfg.eval_batch_size <= 0:
        raise UserError("data.batch_size and data.eval_batch_size must be > 0")
    for key in ("train_examples", "test_examples"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise UserError(f"data.{key} must be > 0, got {value}")
    (x_tr, y_tr), (x_val, y_val), split_size = _split(cfg, seed)
    x_test, y_test = load_arrays(cfg.name, "test", cfg.data_dir, limit=cfg.test_examples)
    train_epochs = lambda start, end: _epochs_pipeline(x_tr, y_tr, cfg, seed, start, end)  # noqa: E731
    pool = None
    if getattr(cfg, "extra_data", None):
        from tfrobust import extra_data

        labelled, extra = extra_data.split_batch(cfg.batch_size, cfg.extra_fraction)
        pool = extra_data.open_pool(
            extra_data.prepare_pool(cfg.extra_data, cfg.extra_cache_dir), info.image_shape, info.num_classes
        )

        def train_epochs(start, end):
            return _mixed_epochs_pipeline(x_tr, y_tr, cfg, seed, start, end, pool, labelled, extra)

    return Datasets(
        validation=_eval_pipeline(x_val, y_val, cfg.eval_batch_size),
        test=_eval_pipeline(x_test, y_test, cfg.eval_batch_size),
        info=info,
        train_size=len(x_tr),
        validation_size=len(x_val),
        test_size=len(x_test),
        train_epochs=train_epochs,
        unlabelled_extra=pool is not None and pool[1] is None,
        split_size=split_size,
        train_subset=lambda n: (_to_float(tf.constant(x_tr[:n]), y_tr[:n])[0].numpy(), y_tr[:n].astype(np.int32)),
    )


def _split(cfg: DataConfig, seed: int) -> tuple:
    """((train images, labels), (validation images, labels), size of the training split) as load_datasets
    splits them (images uint8 or the user's float32, labels int64)."""
    check_data_dir(cfg.data_dir)
    x_train, y_train = load_arrays(cfg.name, "train", cfg.data_dir)
    train_idx, val_idx = split_indices(len(x_train), cfg.validation_examples, seed)
    if cfg.train_examples is not None:
        train_idx = train_idx[: cfg.train_examples]
    return (x_train[train_idx], y_train[train_idx]), (x_train[val_idx], y_train[val_idx]), len(x_train)


def load_training_arrays(cfg: DataConfig, seed: int = 0) -> tuple:
    """The examples :func:`load_datasets` trains on (before augmentation), as
    ``float32`` images in [0, 1] and ``int32`` labels: for measuring how
    robust a network is on its own training data."""
    (x, y), _, _ = _split(cfg, seed)
    return unit_float(x), y.astype(np.int32)


__all__ = [
    "SUPPORTED",
    "DEBIAN_FASHION_MNIST_DIR",
    "CROP_PADDING",
    "DatasetInfo",
    "Datasets",
    "dataset_info",
    "read_idx",
    "load_arrays",
    "load_test_arrays",
    "split_indices",
    "validation_warning",
    "stratified_subset",
    "VALIDATION_MAX_SHARE",
    "VALIDATION_WARN_SHARE",
    "augment_options",
    "augment_batch",
    "load_datasets",
    "load_training_arrays",
    "FOLDER_TEST_FRACTION",
    "source_kind",
    "check_source",
    "source_info",
]
