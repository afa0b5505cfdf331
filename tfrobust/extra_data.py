"""Extra (generated or unlabelled real) images mixed into every training batch.

The recipe of Gowal et al. (2021) and Wang et al. (2023) trains on batches of
which a fraction ``f`` (0.7 in Wang et al.) comes from a large pool of extra
images with labels or pseudo-labels (docs/algorithms.md, section 14):

- the pool is a ``.npz`` file with ``image`` (``(N, H, W, C)`` or
  ``(N, H, W)``, uint8 or floats in [0, 1]) and ``label`` (integers); the keys
  ``images``/``x`` and ``labels``/``y`` are accepted too. It is converted once
  (:func:`prepare_pool`), member by member in chunks, to uncompressed ``.npy``
  files that are read memory-mapped, so a pool of any size never sits in
  memory whole;
- a pool without labels is pseudo-labelled with a trained network
  (:func:`pseudo_label`, the ``pseudo_label.py`` command) before training,
  or used as it is with TRADES: its examples get the label -1 and enter only
  the KL term (the CE term is the mean over the labelled examples, as in
  Carmon et al. 2019);
- an epoch is ``ceil(N / B)`` batches, as without extra data; a batch of
  ``B`` holds ``B - floor(f B)`` labelled training examples, taken in turn
  from a permutation per (seed, epoch) (so an epoch sees a fresh subset of
  them, as in the references' sampler), and ``floor(f B)`` pool examples
  drawn uniformly with replacement from ``(seed, epoch, batch)`` alone, so a
  resumed run sees the batches an uninterrupted run would;
- labelled pool examples enter every term of the objective like labelled
  training examples (their pseudo-labels in the CE terms, their images in
  TRADES's KL term).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import zipfile
from typing import Optional

import numpy as np

from tfrobust.data_sources import check_images
from tfrobust.errors import UserError
from tfrobust.rundir import sha256_of

IMAGE_KEYS = ("image", "images", "x")
LABEL_KEYS = ("label", "labels", "y")
UNLABELLED = "unlabelled"  # the marker file of a prepared pool without labels
SOURCE = "source.json"  # the sha256 of the .npz a prepared pool was made from
_CHUNK = 4096
_DIGESTS: dict = {}


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise UserError("extra data: Fortran-ordered arrays are not supported; save the .npz from C-ordered arrays")
    return shape, dtype


def _copy_member(archive: zipfile.ZipFile, member: str, out_path: str, where: str = "extra data") -> tuple:
    """Streams one ``.npy`` member of a ``.npz`` into an uncompressed ``.npy`` file, chunk by chunk."""
    with archive.open(member) as f:
        shape, dtype = _npy_header(f)
        if dtype.hasobject:
            raise UserError(f"{where}: {member} holds Python objects; need numeric arrays")
        if not shape or 0 in shape:
            raise UserError(f"{where}: {member} is empty (shape {tuple(shape)}); need at least one image")
        # A name of this process's own: workers of a cluster may prepare one pool on a shared filesystem at
        # once; each writes the same bytes, and the last rename wins.
        partial = f"{out_path}.{socket.gethostname()}-{os.getpid()}.partial"
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if len(shape) > 1 else dtype.itemsize
        flat = out.reshape(shape[0], -1) if len(shape) > 1 else out.reshape(-1, 1)
        for start in range(0, shape[0], _CHUNK):
            count = min(_CHUNK, shape[0] - start)
            data = f.read(count * row)
            if len(data) != count * row:
                raise UserError(f"{where}: {member} is truncated")
            flat[start:start + count] = np.frombuffer(data, dtype=dtype).reshape(count, -1)
        out.flush()
        del out, flat
    os.replace(partial, out_path)
    return tuple(shape)


def _file_digest(path: str) -> str:
    """The sha256 of a file's bytes, read in chunks (once per process for an unchanged file)."""
    status = os.stat(path)
    key = (os.path.abspath(path), status.st_size, status.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_of(path)
    return _DIGESTS[key]


def check_pool_images(images, labels, where: str) -> None:
    """Checks a pool chunk by chunk as ``--data`` arrays are checked (shape, type, finite, in [0, 1], integer
    labels); ``labels`` may be None. A one-line UserError names ``where`` and what is wrong."""
    if len(images) == 0:
        raise UserError(f"{where} holds no images")
    for start in range(0, len(images), _CHUNK):
        x = images[start:start + _CHUNK]
        y = np.zeros(len(x), np.int64) if labels is None else labels[start:start + _CHUNK]
        check_images(x, y, where)


def prepare_pool(path: str, cache_dir: Optional[str] = None) -> str:
    """Converts a pool ``.npz`` once to ``images.npy``/``labels.npy`` in ``cache_dir``; returns that directory.

    ``cache_dir`` defaults to ``<path>.cache``. The cache records the sha256
    of the ``.npz`` it was made from (``source.json``) and is made again when
    the file's content differs (a replaced pool or new pseudo-labels); it is
    used as it is when the ``.npz`` is gone. ``path`` may also be a prepared
    directory. A pool without labels gets ``images.npy`` and an empty
    ``unlabelled`` marker file instead of ``labels.npy``. The images and
    labels are checked as ``--data`` arrays are (a one-line UserError).
    """
    if os.path.isdir(path):
        cache_dir = path
    cache_dir = cache_dir or path + ".cache"
    images, labels = os.path.join(cache_dir, "images.npy"), os.path.join(cache_dir, "labels.npy")
    marker, source = os.path.join(cache_dir, UNLABELLED), os.path.join(cache_dir, SOURCE)
    prepared = os.path.exists(images) and (os.path.exists(labels) or os.path.exists(marker))
    if prepared and not os.path.isfile(path):
        return cache_dir
    if not os.path.isfile(path):
        raise UserError(f"extra data file not found: {path}")
    digest = _file_digest(path)
    if prepared and _recorded_digest(source) == digest:
        return cache_dir
    for stale in (source, marker, labels, images):
        if os.path.exists(stale):
            os.remove(stale)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"extra data {path} could not be read as a .npz file: {e}") from None
    with archive:
        members = {os.path.splitext(n)[0]: n for n in archive.namelist() if n.endswith(".npy")}
        image_key = next((k for k in IMAGE_KEYS if k in members), None)
        label_key = next((k for k in LABEL_KEYS if k in members), None)
        if image_key is None:
            raise UserError(f"extra data {path} has no images: need one of the keys {', '.join(IMAGE_KEYS)}")
        created = not os.path.isdir(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        suffix = f".{socket.gethostname()}-{os.getpid()}.npy"
        try:
            shape = _copy_member(archive, members[image_key], images + suffix, f"extra data {path}")
            label_shape = None if label_key is None else _copy_member(
                archive, members[label_key], labels + suffix, f"extra data {path}")
            if label_shape is not None and (len(label_shape) != 1 or label_shape[0] != shape[0]):
                raise UserError(f"extra data {path}: {shape[0]} images but labels of shape {label_shape}")
            check_pool_images(np.load(images + suffix, mmap_mode="r"), None if label_shape is None else
                              np.load(labels + suffix, mmap_mode="r"), f"extra data {path}")
        except UserError:
            for partial in (images + suffix, labels + suffix):
                if os.path.exists(partial):
                    os.remove(partial)
            if created:
                shutil.rmtree(cache_dir, ignore_errors=True)
            raise
    os.replace(images + suffix, images)
    if label_shape is None:
        open(marker, "w").close()
    else:
        os.replace(labels + suffix, labels)
    with open(source + suffix, "w", encoding="utf-8") as f:
        json.dump({"sha256": digest, "file": os.path.abspath(path)}, f)
    os.replace(source + suffix, source)
    return cache_dir


def _recorded_digest(source: str):
    try:
        with open(source, encoding="utf-8") as f:
            return json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def open_pool(cache_dir: str, image_shape: tuple, num_classes: int) -> tuple:
    """The memory-mapped ``(images, labels)`` of a prepared pool, checked against the data set.

    ``labels`` is None for a pool without labels.
    """
    images = np.load(os.path.join(cache_dir, "images.npy"), mmap_mode="r")
    unlabelled = not os.path.exists(os.path.join(cache_dir, "labels.npy"))
    labels = None if unlabelled else np.load(os.path.join(cache_dir, "labels.npy"), mmap_mode="r")
    image_shape = tuple(int(d) for d in image_shape)
    if images.shape[1:] != image_shape and not (image_shape[-1] == 1 and images.shape[1:] == image_shape[:-1]):
        raise UserError(f"extra data images have shape {images.shape[1:]}, the data set's are {image_shape}")
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise UserError(f"extra data images are {images.dtype}; need uint8 or floats in [0, 1]")
    if len(images) == 0:
        raise UserError("extra data holds no images")
    if labels is None:
        return images, None
    if labels.dtype.kind not in "iu":
        raise UserError(f"extra data labels are {labels.dtype}; need integers")
    lo, hi = int(labels[:_CHUNK * 16].min()), int(labels[:_CHUNK * 16].max())
    if lo < 0 or hi >= num_classes:
        raise UserError(f"extra data labels must be in [0, {num_classes - 1}], found {lo}..{hi}")
    return images, labels


def has_labels(path: str, cache_dir: Optional[str] = None) -> bool:
    """Whether a pool (a ``.npz``, or a prepared directory) has labels; reads only the archive's member names."""
    prepared = path if os.path.isdir(path) else (cache_dir or path + ".cache")
    if not os.path.isfile(path) and os.path.exists(os.path.join(prepared, "images.npy")):
        if os.path.exists(os.path.join(prepared, "labels.npy")):
            return True
        if os.path.exists(os.path.join(prepared, UNLABELLED)):
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = {os.path.splitext(n)[0] for n in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return True  # unreadable or missing: prepare_pool says so in its own words
    return any(k in names for k in LABEL_KEYS)


def check_labels_for(defense, path: str, labelled: bool) -> None:
    """Refuses a pool without labels for a defense that needs a label for every example.

    Without labels only TRADES's KL term (``trades``, ``trades+awp``) can use the pool.
    """
    if labelled or defense.accepts_unlabelled:
        return
    raise UserError(
        f"data.extra_data {path} has no labels, which only TRADES's KL term can use (defense trades or "
        f"trades+awp); for {defense.name} make pseudo-labels first: python pseudo_label.py --model RUN "
        f"--data {path} --output labelled.npz"
    )


def split_batch(batch_size: int, fraction: float) -> tuple:
    """``(labelled, extra)`` examples per batch of ``batch_size`` with a fraction ``fraction`` from the pool."""
    extra = int(fraction * batch_size)  # floor, as the references
    labelled = batch_size - extra
    if labelled < 1 or (fraction > 0 and extra < 1):
        raise UserError(
            f"data.extra_fraction={fraction} leaves {labelled} labelled and {extra} extra examples in a batch of "
            f"{batch_size}; choose a fraction in (0, 1) that keeps both"
        )
    return labelled, extra


def pseudo_label(model_fn, source: str, output: str, batch_size: int = 512) -> int:
    """Labels the images of ``source`` (a ``.npz`` with images) with the argmax of
    ``model_fn`` (float32 images in [0, 1] -> logits); returns their number.

    The images are read and the labels written chunk by chunk; ``output`` is
    a ``.npz`` (uncompressed) with ``image`` and ``label``, written under a
    temporary name and renamed into place. An existing ``output`` is refused.
    """
    import tensorflow as tf

    if os.path.exists(output):
        raise UserError(f"{output} exists; choose another --output")
    if not os.path.isfile(source):
        raise UserError(f"extra data file not found: {source}")
    work = output + ".partial.d"
    os.makedirs(work, exist_ok=True)
    try:
        with zipfile.ZipFile(source) as archive:
            members = {os.path.splitext(n)[0]: n for n in archive.namelist() if n.endswith(".npy")}
            key = next((k for k in IMAGE_KEYS if k in members), None)
            if key is None:
                raise UserError(f"{source} has no images: need one of the keys {', '.join(IMAGE_KEYS)}")
            images_path = os.path.join(work, "image.npy")
            _copy_member(archive, members[key], images_path, source)
        images = np.load(images_path, mmap_mode="r")
        check_pool_images(images, None, source)
    except (zipfile.BadZipFile, UserError) as e:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, UserError):
            raise
        raise UserError(f"{source} could not be read as a .npz file: {e}") from None
    labels = np.lib.format.open_memmap(os.path.join(work, "label.npy"), mode="w+", dtype=np.int64, shape=(len(images),))
    for start in range(0, len(images), batch_size):
        x = np.asarray(images[start:start + batch_size])
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        if x.ndim == 3:
            x = x[..., None]
        logits = model_fn(tf.constant(x))
        labels[start:start + len(x)] = np.argmax(np.asarray(logits), axis=1)
    labels.flush()
    count = len(images)
    del labels, images
    with zipfile.ZipFile(output + ".partial", "w", zipfile.ZIP_STORED, allowZip64=True) as out:
        out.write(images_path, "image.npy")
        out.write(os.path.join(work, "label.npy"), "label.npy")
    os.replace(output + ".partial", output)
    shutil.rmtree(work, ignore_errors=True)
    return count


__all__ = [
    "IMAGE_KEYS", "LABEL_KEYS", "UNLABELLED", "SOURCE", "check_pool_images", "prepare_pool", "open_pool", "has_labels", "check_labels_for",
    "split_batch", "pseudo_label",
]
