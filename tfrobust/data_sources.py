"""Where a data set's arrays come from: IDX files, tensorflow_datasets, an image folder or a ``.npz`` file.

Fashion-MNIST (the default) and MNIST are read from the gzip IDX files of the
original distribution; Fashion-MNIST is also found in
``/usr/share/datasets/fashion-mnist/`` when Debian's ``dataset-fashion-mnist``
package is installed. Every other data set, and these two when no IDX files
are at hand, comes through ``tensorflow_datasets``.

``data.name`` may also name the user's own data (see :func:`source_kind`):

- an image folder with one sub-folder per class (read with
  ``keras.utils.image_dataset_from_directory``), split into ``train/`` and
  ``test/`` sub-folders or else with a fixed 20% held out as the test split;
  the image size and channels are those of its first image;
- a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (images
  ``(N, H, W)`` or ``(N, H, W, C)``, uint8 or floats in [0, 1]; integer labels);
- any tensorflow_datasets name with ``train`` and ``test`` splits.

For these, the image shape, the number of classes and the per-channel mean
and standard deviation (used by the built-in networks' normalisation layer)
are taken from the data. Images stay ``uint8`` (or the user's float32).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import zipfile
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf

from tfrobust.config import DATA_SETS
from tfrobust.errors import UserError, unknown_choice

SUPPORTED = DATA_SETS  # the built-in data sets

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set."""

    name: str
    image_shape: tuple  # (H, W, C)
    num_classes: int
    mean: tuple  # per-channel mean of the training images in [0, 1]
    std: tuple  # per-channel standard deviation


_INFO = {
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), 10, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo("mnist", (28, 28, 1), 10, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", (32, 32, 3), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": DatasetInfo("svhn_cropped", (32, 32, 3), 10, (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)),
}

# The IDX file names of a split: (images, labels).
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX element type codes (third byte of the magic number).
_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def dataset_info(name: str) -> DatasetInfo:
    """Shape, number of classes and normalisation constants of a built-in data set (see :func:`source_info`)."""
    if name not in _INFO:
        check_source(name)
        raise UserError(f"data set {name!r} is not built in ({', '.join(SUPPORTED)}); source_info describes any data source")
    return _INFO[name]


# ---------------------------------------------------------------------------
# IDX files


def read_idx(path: str, limit: Optional[int] = None) -> np.ndarray:
    """Reads an IDX file (gzip-compressed if its name ends in ``.gz``).

    Args:
      path: the file.
      limit: read only the first ``limit`` entries along the first axis.

    Raises:
      UserError: the file is not a well-formed IDX file.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0:
                raise UserError(f"{path} is not an IDX file (bad magic number {header.hex() or 'missing'})")
            dtype = _IDX_TYPES.get(header[2])
            ndim = header[3]
            if dtype is None or ndim == 0:
                raise UserError(f"{path} is not an IDX file (bad magic number {header.hex()})")
            dims_bytes = f.read(4 * ndim)
            if len(dims_bytes) != 4 * ndim:
                raise UserError(f"{path} is a truncated IDX file (incomplete header)")
            dims = [int(d) for d in np.frombuffer(dims_bytes, dtype=">u4")]
            count = dims[0] if limit is None else min(dims[0], max(int(limit), 0))
            shape = [count] + dims[1:]
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            data = f.read(size)
            if len(data) != size:
                raise UserError(f"{path} is a truncated IDX file ({len(data)} of {size} data bytes)")
            if count == dims[0] and f.read(1):
                raise UserError(f"{path} has more data than its IDX header declares")
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path} could not be read as a gzip IDX file: {e}") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_paths(directory: str, split: str) -> Optional[tuple]:
    """The (images, labels) IDX paths of ``split`` in ``directory``, or None if absent.

    Raises UserError when only one of the two files is there.
    """
    found = []
    for base in _IDX_FILES[split]:
        path = None
        for candidate in (base + ".gz", base):
            if os.path.isfile(os.path.join(directory, candidate)):
                path = os.path.join(directory, candidate)
                break
        found.append(path)
    if found[0] is None and found[1] is None:
        return None
    if found[0] is None or found[1] is None:
        missing = _IDX_FILES[split][0 if found[0] is None else 1]
        raise UserError(f"{directory} has only one of the two IDX files of the {split} split: {missing}.gz is missing")
    return found[0], found[1]


def _load_idx(name: str, images_path: str, labels_path: str, limit: Optional[int]) -> tuple:
    info = dataset_info(name)
    images = read_idx(images_path, limit)
    labels = read_idx(labels_path, limit)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise UserError(f"{images_path} does not hold uint8 images of shape (N, H, W)")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{labels_path} does not hold integer labels of shape (N,)")
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    images = images[..., np.newaxis]
    if images.shape[1:] != info.image_shape:
        raise UserError(f"{images_path} holds images of shape {images.shape[1:]}, not {info.image_shape} as {name} has")
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise UserError(f"{labels_path} has labels outside 0..{info.num_classes - 1}")
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------------------
# tensorflow_datasets


def _tfds_load(name: str, split: str, data_dir: Optional[str]):
    """``tfds.load`` of a prepared data set; one not prepared is downloaded only when there is a network."""
    import tensorflow_datasets as tfds

    kwargs = dict(split=split, data_dir=data_dir, as_supervised=True, shuffle_files=False)
    try:
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # "Variant folder ... has no dataset_info.json" while probing
        try:
            return tfds.load(name, download=False, **kwargs)
        finally:
            absl_logger.setLevel(level)
    except AssertionError:  # tfds' way of saying "not prepared in data_dir"
        _check_network(name)
        return tfds.load(name, **kwargs)


def _load_tfds(name: str, split: str, data_dir: Optional[str], limit: Optional[int]) -> tuple:
    import tensorflow_datasets as tfds

    split_arg = split if limit is None else f"{split}[:{int(limit)}]"
    try:
        ds = _tfds_load(name, split=split_arg, data_dir=data_dir)
        images, labels = [], []
        for x, y in tfds.as_numpy(ds.batch(4096)):
            images.append(x)
            labels.append(y)
    except UserError:
        raise
    except Exception as e:  # tfds raises many kinds when it cannot download or find the data.
        raise UserError(
            f"data set {name!r} could not be loaded through tensorflow_datasets ({type(e).__name__}); "
            "pass data.data_dir=DIR with the prepared data set, or run with a network"
        ) from e
    info = dataset_info(name)
    if images:
        x = np.concatenate(images)
        y = np.concatenate(labels)
    else:
        x = np.zeros((0,) + info.image_shape, np.uint8)
        y = np.zeros((0,), np.int64)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if x.shape[1:] != info.image_shape:
        raise UserError(f"data set {name!r} from tensorflow_datasets has images of shape {x.shape[1:]}")
    return x.astype(np.uint8, copy=False), y.astype(np.int64, copy=False)


# tfds' downloader retries for minutes before it gives up; without a network
# (no route to tfds' storage and no proxy configured) refuse at once.
DOWNLOAD_PROBE = ("storage.googleapis.com", 443)


def _check_network(name: str, timeout: float = 5.0) -> None:
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return  # the downloader goes through the proxy; a direct probe says nothing
    try:
        socket.create_connection(DOWNLOAD_PROBE, timeout=timeout).close()
    except OSError as e:
        raise UserError(
            f"data set {name!r} is not prepared in tensorflow_datasets' data directory and there is no network "
            f"({DOWNLOAD_PROBE[0]}: {e.strerror or e}); pass data.data_dir=DIR with the prepared data set, "
            "or run with a network"
        ) from None


# ---------------------------------------------------------------------------
# The user's own data: an image folder, a .npz file or any tfds name

# Image files image_dataset_from_directory reads.
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# The part of a class-per-sub-folder image folder held out as its test split
# when it has no train/ and test/ sub-folders (a fixed permutation, seed 0).
FOLDER_TEST_FRACTION = 0.2
_CUSTOM_CACHE: dict = {}


def source_kind(name: str) -> str:
    """What ``data.name`` refers to: ``builtin``, ``folder``, ``npz`` or ``tfds``.

    A built-in name wins; a name ending in ``.npz`` is a file; an existing
    directory, or a name that starts like a path (``/``, ``.``, ``~``), is an
    image folder; any other name (``kmnist``, ``mnist_corrupted/shot_noise``)
    is looked up in tensorflow_datasets.
    """
    name = str(name)
    if name in _INFO:
        return "builtin"
    if name.lower().endswith(".npz"):
        return "npz"
    if os.path.isdir(name) or name.startswith(("/", ".", "~")):
        return "folder"
    return "tfds"


def check_source(name: str) -> None:
    """Refuses a data source that cannot exist, before anything is built (one-line UserError)."""
    kind = source_kind(name)
    if kind == "npz" and not os.path.isfile(name):
        raise UserError(f"data file not found: {name}")
    if kind == "folder" and not os.path.isdir(name):
        raise UserError(f"data folder not found: {name}")
    if kind == "tfds":
        import tensorflow_datasets as tfds

        try:
            tfds.builder_cls(name.split("/")[0].split(":")[0])
        except Exception:  # tfds raises its own not-found error kinds
            allowed = ", ".join(sorted(SUPPORTED))
            raise UserError(
                f"unknown data set {name!r}; allowed: {allowed}, any tensorflow_datasets name, "
                "an image folder (one sub-folder per class) or a .npz file"
            ) from None


def unit_float(x: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1]: uint8 divided by 255, floats as they are."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def check_images(x, y, where: str) -> tuple:
    """Validates one split of user data (or a chunk of an extra-data pool): NHWC images (uint8, or floats in
    [0, 1]) and integer labels; returns them as NHWC images and int64 labels, or raises a one-line UserError."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or min(x.shape[1:3], default=0) < 1:
        raise UserError(f"{where} must hold images of shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2 and len(y) == len(x):
        raise UserError(f"{where} has one-hot labels of shape {y.shape}; store integer class labels of shape (N,) "
                        "(y.argmax(axis=-1))")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{where} has {len(x)} images but labels of shape {y.shape}; need one integer label per image")
    if y.dtype.kind not in "iuf":
        raise UserError(f"{where} has labels of type {y.dtype}; need integer class labels 0..K-1")
    if y.size and (y.dtype.kind not in "iu" and not np.all(np.mod(y, 1) == 0)):
        raise UserError(f"{where} has non-integer labels")
    if y.size and y.min() < 0:
        raise UserError(f"{where} has negative labels")
    if x.dtype != np.uint8:
        if x.dtype.kind not in "fiu":
            raise UserError(f"{where} holds images of type {x.dtype}; need uint8 or floats in [0, 1]")
        if x.size and np.isnan(x).any():
            raise UserError(f"{where} holds NaN pixels; need uint8 images or floats in [0, 1]")
        if x.size and (np.min(x) < 0 or np.max(x) > 1):
            raise UserError(f"{where} holds non-uint8 images with values in [{np.min(x):g}, {np.max(x):g}], outside "
                            "[0, 1]; divide 0..255 images by 255 (or store them as uint8), or scale them to [0, 1]")
        x = x.astype(np.float32)
    return x, y.astype(np.int64)


def _load_npz(path: str) -> dict:
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes); a .npz data set needs x_train, y_train, x_test, y_test")
    if not zipfile.is_zipfile(path):  # numpy would read it as a pickle and speak of allow_pickle
        raise UserError(f"{path} is not a .npz file (not a zip archive of .npy arrays; save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise UserError(f"{path} could not be read as a .npz file: {str(e).splitlines()[0]}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; a .npz data set needs x_train, y_train, x_test, y_test")
    train = check_images(arrays["x_train"], arrays["y_train"], f"{path} x_train/y_train")
    test = check_images(arrays["x_test"], arrays["y_test"], f"{path} x_test/y_test")
    return {"train": train, "test": test, "classes": None}


def _image_files(directory: str):
    """The files with an image's name under ``directory``, in sorted order."""
    for root, _, files in sorted(os.walk(directory)):
        for f in sorted(files):
            if f.lower().endswith(_IMAGE_EXTENSIONS):
                yield os.path.join(root, f)


def _decoded(path: str):
    """The image in ``path`` (a tensor), or None if it does not decode."""
    try:
        return tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    except tf.errors.OpError:
        return None


def _first_image_shape(directory: str) -> tuple:
    for path in _image_files(directory):
        image = _decoded(path)
        if image is None:
            raise UserError(f"{path} is not a readable image")
        return tuple(int(d) for d in image.shape)
    raise UserError(f"data folder {directory} holds no images ({', '.join(_IMAGE_EXTENSIONS)}) in class sub-folders")


def _unreadable_image(directory: str):
    """The first file with an image's name under ``directory`` that does not decode (None if all do)."""
    return next((path for path in _image_files(directory) if _decoded(path) is None), None)


def _read_folder(directory: str, shape: tuple, class_names=None) -> tuple:
    import keras

    modes = {1: "grayscale", 3: "rgb", 4: "rgba"}
    if shape[-1] not in modes:
        raise UserError(f"images in {directory} have {shape[-1]} channels; need 1, 3 or 4")
    try:
        ds = keras.utils.image_dataset_from_directory(
            directory, labels="inferred", label_mode="int", class_names=class_names,
            color_mode=modes[shape[-1]], image_size=shape[:2], batch_size=None, shuffle=False, verbose=False,
        )
    except ValueError as e:
        raise UserError(f"data folder {directory}: {str(e).splitlines()[0]}") from None
    names = list(ds.class_names)
    xs, ys = [], []
    try:
        for x, y in ds.batch(1024).as_numpy_iterator():
            xs.append(np.round(x).clip(0, 255).astype(np.uint8))
            ys.append(y)
    except tf.errors.OpError:  # a file with an image's name that does not decode
        raise UserError(f"{_unreadable_image(directory) or directory} is not a readable image; remove it or "
                        "replace it") from None
    if not xs:
        raise UserError(f"data folder {directory} holds no images in class sub-folders")
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), names


def _load_folder(directory: str) -> dict:
    """A class-per-sub-folder image folder; ``train/`` and ``test/`` sub-folders when present.

    The image size and channels are those of the first image (every other
    image is resized to it); the classes are the sub-folder names, sorted.
    Without ``train/`` and ``test/``, a fixed ``FOLDER_TEST_FRACTION`` of the
    images (a permutation with seed 0) is the test split.
    """
    train_dir, test_dir = os.path.join(directory, "train"), os.path.join(directory, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        shape = _first_image_shape(train_dir)
        x_train, y_train, names = _read_folder(train_dir, shape)
        test_names = sorted(d for d in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, d)))
        if test_names != names:
            raise UserError(f"{test_dir} has classes {test_names}, but {train_dir} has {names}")
        x_test, y_test, _ = _read_folder(test_dir, shape, names)
    else:
        shape = _first_image_shape(directory)
        x, y, names = _read_folder(directory, shape)
        order = np.random.default_rng(0).permutation(len(x))
        cut = len(x) - max(1, int(round(FOLDER_TEST_FRACTION * len(x))))
        if cut < 1:
            raise UserError(f"data folder {directory} has too few images ({len(x)}) to hold out a test split")
        x_train, y_train, x_test, y_test = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    return {"train": (x_train, y_train), "test": (x_test, y_test), "classes": len(names)}


def _load_tfds_any(name: str, data_dir: Optional[str]) -> dict:
    import tensorflow_datasets as tfds

    splits = {}
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        label = builder.info.features.get("label") if hasattr(builder.info.features, "get") else None
        classes = getattr(label, "num_classes", None)
        for split in ("train", "test"):
            ds = _tfds_load(name, split=split, data_dir=data_dir)
            xs, ys = [], []
            for x, y in tfds.as_numpy(ds.batch(4096)):
                xs.append(x)
                ys.append(y)
            splits[split] = check_images(np.concatenate(xs), np.concatenate(ys), f"data set {name!r} {split} split")
    except UserError:
        raise
    except Exception as e:  # tfds raises many kinds when it cannot find, download or batch the data.
        raise UserError(
            f"data set {name!r} could not be loaded through tensorflow_datasets "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return dict(splits, classes=classes)


def _custom(name: str, data_dir: Optional[str]) -> dict:
    """Both splits and the class count of a user data source (read once per process)."""
    key = (os.path.abspath(name) if source_kind(name) != "tfds" else name, data_dir)
    if key not in _CUSTOM_CACHE:
        check_source(name)
        kind = source_kind(name)
        loaded = {"npz": _load_npz, "folder": _load_folder}[kind](name) if kind != "tfds" else _load_tfds_any(name, data_dir)
        (x_train, y_train), (x_test, y_test) = loaded["train"], loaded["test"]
        if x_train.shape[1:] != x_test.shape[1:]:
            raise UserError(f"data {name}: training images have shape {x_train.shape[1:]} but test images {x_test.shape[1:]}")
        if len(x_train) == 0:
            raise UserError(f"data {name} has no training images")
        if len(x_test) == 0:  # refused before training: the run ends with an evaluation on them
            raise UserError(f"data {name} has no test images")
        classes = loaded["classes"] or int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        if max(y_train.max(initial=0), y_test.max(initial=0)) >= classes:
            raise UserError(f"data {name} has labels outside 0..{classes - 1}")
        if classes < 2:
            raise UserError(f"data {name} has only one class")
        if kind == "npz":  # the classes are its labels, numbered 0..K-1
            _check_class_count(name, classes, len(y_train) + len(y_test))
        unit = unit_float(x_train)
        axes = tuple(range(unit.ndim - 1))
        std = np.maximum(unit.std(axis=axes), 1e-3)
        info = DatasetInfo(name, tuple(int(d) for d in x_train.shape[1:]), classes,
                           tuple(float(m) for m in unit.mean(axis=axes)), tuple(float(s) for s in std))
        _CUSTOM_CACHE[key] = {"info": info, "train": (x_train, y_train), "test": (x_test, y_test)}
    return _CUSTOM_CACHE[key]


def _check_class_count(name: str, classes: int, examples: int) -> None:
    """Refuses more classes than examples (a stray label of 10**8 would build a network with 10**8 outputs)."""
    if classes > examples:
        raise UserError(f"data {name} has labels up to {classes - 1}, more classes than its {examples} examples; "
                        "number the classes 0..K-1")


def source_info(name: str, data_dir: Optional[str] = None) -> DatasetInfo:
    """Shape, class count and per-channel mean/std of any data source (taken from the data for the user's own)."""
    if source_kind(name) == "builtin":
        return dataset_info(name)
    return _custom(name, data_dir)["info"]


# ---------------------------------------------------------------------------
# Arrays


def check_data_dir(data_dir: Optional[str]) -> None:
    if data_dir is None:
        return
    if not os.path.isdir(data_dir):
        raise UserError(f"data.data_dir {data_dir!r} does not exist or is not a directory")
    try:
        empty = not os.listdir(data_dir)
    except OSError as e:
        raise UserError(f"data.data_dir {data_dir!r} cannot be read: {e.strerror or e}") from None
    if empty:
        # Never fall back silently to other data than the directory the user named.
        raise UserError(f"data.data_dir {data_dir!r} is empty; put the data set's files there or leave data.data_dir unset")


def load_arrays(
    name: str, split: str, data_dir: Optional[str] = None, limit: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of a data set into memory, in file order.

    Args:
      name: one of :data:`SUPPORTED`.
      split: ``"train"`` or ``"test"``.
      data_dir: a directory with the IDX files (Fashion-MNIST, MNIST) or
        tensorflow_datasets' data directory; None for the defaults.
      limit: keep only the first ``limit`` examples.

    Returns:
      ``uint8`` images of shape (N, H, W, C) and ``int64`` labels of shape (N,).
    """
    if split not in _IDX_FILES:
        raise unknown_choice("split", split, tuple(_IDX_FILES))
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, got {limit}")
    check_data_dir(data_dir)
    if source_kind(name) != "builtin":
        x, y = _custom(name, data_dir)[split]
        return (x, y) if limit is None else (x[:limit], y[:limit])
    info = dataset_info(name)
    directories = []
    if data_dir is not None:
        directories.append(data_dir)
    if name == "fashion_mnist":
        directories.append(DEBIAN_FASHION_MNIST_DIR)
    if info.image_shape == (28, 28, 1):
        for directory in directories:
            if os.path.isdir(directory):
                paths = _idx_paths(directory, split)
                if paths is not None:
                    return _load_idx(name, paths[0], paths[1], limit)
    return _load_tfds(name, split, data_dir, limit)


def load_test_arrays(name: str, data_dir: Optional[str] = None, limit: Optional[int] = None) -> tuple:
    """The test split as ``float32`` images in [0, 1] (NHWC) and ``int32`` labels."""
    x, y = load_arrays(name, "test", data_dir=data_dir, limit=limit)
    return unit_float(x), y.astype(np.int32)


# Validation may take at most this share of the training split (more is refused) and should
# take at most VALIDATION_WARN_SHARE of it (more is said at the start of the run).


__all__ = [
    "SUPPORTED", "DEBIAN_FASHION_MNIST_DIR", "FOLDER_TEST_FRACTION", "DatasetInfo", "dataset_info", "read_idx",
    "source_kind", "check_source", "check_images", "unit_float", "source_info", "check_data_dir", "load_arrays", "load_test_arrays",
]
