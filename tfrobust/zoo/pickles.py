"""Reading pickled checkpoints without running their code and without PyTorch.

A pickle can call any function it names. These readers name a short list of what a checkpoint
may hold and refuse everything else before anything is called, with one line naming it:

* PyTorch files (``torch.save``: the zip format since PyTorch 1.6 and the legacy stream before
  it): ``collections.OrderedDict``, tensors (``torch._utils._rebuild_tensor_v2``, also through
  ``_rebuild_parameter``) and their storage types, read straight into numpy arrays;
* numpy ``.npy`` files holding a pickled object (DeepMind's ``(params, state)``): numpy arrays,
  dtypes and scalars, inside plain dicts, lists and tuples (older Haiku's ``frozendict`` is read
  as a dict; its later ``FlatMapping`` holds a JAX tree structure and is refused: convert such a
  file with ``haiku.data_structures.to_mutable_dict`` first).
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile

import numpy as np

from tfrobust.errors import UserError

_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Pending:
    """A tensor whose storage may still be unread (the legacy format stores the data after the pickle)."""

    def __init__(self, storage_key, offset, size, stride):
        self.key, self.offset, self.size, self.stride = storage_key, int(offset), tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _Pending(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _refuse(path, module, name):
    return UserError(f"{path}: refused to unpickle {module}.{name}: a checkpoint may hold only tensors, arrays and "
                     "plain containers (nothing in it was run)")


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path, self.storages = path, {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(name)
        raise _refuse(self.path, module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UserError(f"{self.path}: unknown stored object {str(pid)[:80]}")
        self.storages.setdefault(str(pid[2]), pid[1].name)
        return str(pid[2])


def _array(raw: bytes, storage_type: str, path: str, key: str) -> np.ndarray:
    dtype = _TORCH_DTYPES[storage_type]
    if dtype == "bfloat16":  # the upper half of a float32
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32)
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise UserError(f"{path}: storage {key} is {len(raw)} bytes, not a whole number of {np.dtype(dtype).name}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def _resolve(obj, arrays: dict, path: str):
    """``obj`` with every pending tensor replaced by a numpy array copied out of its storage."""
    if isinstance(obj, _Pending):
        flat = arrays[obj.key]
        if 0 in obj.size:
            return np.zeros(obj.size, flat.dtype.newbyteorder("="))
        last = obj.offset + sum((s - 1) * st for s, st in zip(obj.size, obj.stride))
        if obj.offset < 0 or min(obj.stride, default=0) < 0 or last >= flat.size:
            raise UserError(f"{path}: a tensor of shape {obj.size} reaches past the end of storage {obj.key}")
        view = np.lib.stride_tricks.as_strided(flat[obj.offset:], obj.size, [s * flat.itemsize for s in obj.stride])
        return np.array(view, dtype=flat.dtype.newbyteorder("="))
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, arrays, path)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, arrays, path) for v in obj)
    return obj


_DAMAGE = (pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError, KeyError, IndexError, AttributeError,
           EOFError, OverflowError, struct.error)


def read_torch(path: str):
    """The object ``torch.save`` wrote to ``path`` (zip or legacy format), tensors as numpy arrays."""
    try:
        if zipfile.is_zipfile(path):
            return _read_torch_zip(path)
        return _read_torch_legacy(path)
    except UserError:
        raise
    except _DAMAGE as e:  # a damaged or hand-made file fails in the unpickler or the zip reader in many ways
        reason = (str(e).splitlines() or [""])[0][:150]
        raise UserError(f"{path}: damaged or unsupported PyTorch checkpoint ({type(e).__name__}: {reason})") from None


def _read_torch_zip(path: str):
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise UserError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        if root + "byteorder" in z.namelist() and z.read(root + "byteorder").strip() not in (b"little", b""):
            raise UserError(f"{path}: big-endian PyTorch checkpoints are not supported")
        with z.open(pickles[0]) as f:
            unpickler = _TorchUnpickler(f, path)
            obj = unpickler.load()
        arrays = {}
        for key, storage_type in unpickler.storages.items():
            try:
                raw = z.read(f"{root}data/{key}")
            except KeyError:
                raise UserError(f"{path}: storage {key} is missing from the archive") from None
            arrays[key] = _array(raw, storage_type, path, key)
    return _resolve(obj, arrays, path)


def _read_torch_legacy(path: str):
    with open(path, "rb") as f:
        try:
            magic = _TorchUnpickler(f, path).load()
        except UserError:
            raise
        except Exception:  # not a pickle at all: many kinds
            raise UserError(f"{path} is not a PyTorch checkpoint (neither a zip file nor a pickle)") from None
        if magic != _LEGACY_MAGIC:
            raise UserError(f"{path} is not a PyTorch checkpoint (a pickle without PyTorch's magic number)")
        _TorchUnpickler(f, path).load()  # protocol version
        _TorchUnpickler(f, path).load()  # system information
        unpickler = _TorchUnpickler(f, path)
        obj = unpickler.load()
        keys = _TorchUnpickler(f, path).load()
        arrays = {}
        for key in keys:
            header = f.read(8)
            if len(header) != 8:
                raise UserError(f"{path}: truncated (storage {key} is missing)")
            count = struct.unpack("<q", header)[0]
            storage_type = unpickler.storages[str(key)]
            itemsize = 2 if storage_type in ("BFloat16Storage", "HalfStorage") else np.dtype(_TORCH_DTYPES[storage_type]).itemsize
            raw = f.read(count * itemsize)
            if len(raw) != count * itemsize:
                raise UserError(f"{path}: truncated (storage {key} is incomplete)")
            arrays[str(key)] = _array(raw, storage_type, path, str(key))
    return _resolve(obj, arrays, path)


class _NumpyUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) == ("haiku._src.data_structures", "frozendict"):
            return dict  # older Haiku's immutable dict, pickled as frozendict(a_dict)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _refuse(self.path, module, name)


def read_npy(path: str):
    """The content of a ``.npy`` file: an array, or the object pickled in it (numpy arrays and plain containers only)."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
        except ValueError as e:
            raise UserError(f"{path} is not a .npy file ({e})") from None
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        try:
            array = _NumpyUnpickler(f, path).load()
        except UserError:
            raise
        except Exception as e:  # a damaged pickle raises many kinds
            raise UserError(f"{path}: cannot read its pickled content ({type(e).__name__}: {e})") from None
    if isinstance(array, np.ndarray) and array.dtype.hasobject:
        return array.item() if array.shape == () else list(array.reshape(-1))
    return array


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _op(value) -> bytes:
    """The pickle opcodes of a str, int, bool or tuple of ints (protocol 2, no memo references)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def write_torch(state: "collections.OrderedDict", path: str, root: str = "archive") -> None:
    """Writes a state dict of float32/int64 numpy arrays in ``torch.save``'s zip format.

    The pickle holds only what ``torch.load(weights_only=True)`` accepts: an OrderedDict of
    tensors rebuilt by ``torch._utils._rebuild_tensor_v2`` from one storage each.
    """
    ordered_dict = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    body = [pickle.PROTO + bytes([2]), ordered_dict, pickle.MARK]
    storages = []
    for key, value in state.items():
        value = np.array(value, order="C", copy=None)  # ascontiguousarray would make a scalar 1-D
        if value.dtype not in _STORAGE_NAMES:
            raise UserError(f"cannot write {key} of dtype {value.dtype} (float32 or int64 only)")
        strides = tuple(int(np.prod(value.shape[i + 1:])) for i in range(value.ndim))
        storage_id = (pickle.MARK + _op("storage") + _global("torch", _STORAGE_NAMES[value.dtype])
                      + _op(str(len(storages))) + _op("cpu") + _op(int(value.size)) + pickle.TUPLE)
        body += [_op(str(key)), _global("torch._utils", "_rebuild_tensor_v2"), pickle.MARK, storage_id, pickle.BINPERSID,
                 _op(0), _op(tuple(int(d) for d in value.shape)), _op(strides), pickle.NEWFALSE, ordered_dict,
                 pickle.TUPLE, pickle.REDUCE]
        storages.append(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
    body += [pickle.SETITEMS, pickle.STOP]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", b"".join(body))
        z.writestr(f"{root}/byteorder", "little")
        for i, raw in enumerate(storages):
            z.writestr(f"{root}/data/{i}", raw)
        z.writestr(f"{root}/version", "3\n")


__all__ = ["read_torch", "read_npy", "write_torch"]
