"""Ownership and completion of a run directory: a lock file and a "finished" marker.

- ``run.lock`` names the process that owns the directory (``pid host``). It
  is created atomically (a hard link of a complete temporary file, which
  fails if the lock exists), so two processes never both own a directory.
  A lock whose pid is no longer alive on this host is stale and is taken
  over; a lock held by another host is refused (remove it by hand once that
  process is gone).
- ``finished.json`` is written last, atomically, and says what is complete:
  ``{"trained": true, "evaluated": false}`` after a train-only (``--no-eval``)
  run, ``"evaluated": true`` once ``report.json`` is also on disk, and the
  sha256 of every network file (``"networks"``). A run directory without it
  is unfinished, whatever other files it holds -- unless it holds the final
  networks and no backup: then the run finished and its marker was lost, and
  the directory is refused (:func:`marker_problem`) rather than trained again.

:func:`workdir_status` reads what a directory holds ("new", "unfinished",
"trained", "finished"), :func:`prepare_workdir` refuses one that cannot take a
new start, and :func:`owned` creates a directory and holds its lock for a block.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import threading

import yaml

from tfrobust.errors import UserError

LOCK = "run.lock"
FINISHED = "finished.json"
REPORT = "report.json"
CONFIG = "config.yaml"
# The network files of a finished run, whose checksums the finished marker holds.
NETWORKS = ("model.keras", "best.keras", "model_live.keras")

_held: dict = {}
_held_guard = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().split()
        return int(text[0]), text[1]
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def lock(workdir: str, path: str | None = None, label: str | None = None):
    """Holds ``workdir/run.lock`` (or the lock file ``path``) for the block; refuses with a UserError when
    another live process holds it.

    ``label`` names what the lock guards in the messages (default: ``workdir <workdir>``).
    Re-entrant within one process (a train inside a train-and-evaluate).
    """
    path = os.path.abspath(path or os.path.join(workdir, LOCK))
    with _held_guard:
        if path in _held:
            _held[path] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    _acquire(path, label or f"workdir {workdir}", os.path.dirname(path))
    with _held_guard:
        _held[path] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[path]
        owner = _read_lock(path)
        if owner == (os.getpid(), socket.gethostname()):
            with contextlib.suppress(OSError):
                os.remove(path)


def output_lock(output: str):
    """Holds ``<output>.lock`` for the block: two processes never write the same output file."""
    return lock(os.path.dirname(os.path.abspath(output)), path=output + ".lock", label=f"--output {output}")


def _acquire(path: str, label: str, directory: str) -> None:
    me = f"{os.getpid()} {socket.gethostname()}\n"
    tmp = f"{path}.{os.getpid()}.tmp"
    name = os.path.basename(path)
    choose = "--workdir" if label.startswith("workdir") else label.split()[0]
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(me)
    except OSError as e:
        raise UserError(f"{label}: cannot write in {directory} ({e.strerror or e})") from None
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                pass
            owner = _read_lock(path)
            if owner is None:
                raise UserError(f"{label} has an unreadable lock {path}; if no process is using it, remove that file")
            pid, host = owner
            if host == socket.gethostname() and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)  # stale: its owner died (kill -9, power loss)
                continue
            where = "" if host == socket.gethostname() else f" on host {host}"
            raise UserError(f"{label} is in use by process {pid}{where} ({name}); "
                            f"wait for it to finish or choose another {choose}")
        raise UserError(f"{label}: could not take {name}; try again")
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise UserError(f"{label} is on a file system without hard links; the lock {name} needs them") from None
        raise UserError(f"{label}: cannot write in {directory} ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def finished(workdir: str) -> dict:
    """The finished marker ({} when the run is not finished).

    A directory written before the marker existed counts as evaluated when it
    holds a ``report.json`` that is complete JSON and no backup.
    """
    path = os.path.join(workdir, FINISHED)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                marker = json.load(f)
            if isinstance(marker, dict) and marker.get("trained"):
                return marker
        except (OSError, ValueError):
            pass
        return {}
    report = os.path.join(workdir, REPORT)
    if os.path.exists(report) and not os.path.exists(os.path.join(workdir, "backup", "state.json")):
        try:
            with open(report, encoding="utf-8") as f:
                json.load(f)
            return {"trained": True, "evaluated": True}
        except (OSError, ValueError):
            return {}
    return {}


def sha256_of(path: str) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_checksum(weights) -> str:
    """The sha256 of a network's weights (each variable's shape and bytes, in order)."""
    import numpy

    digest = hashlib.sha256()
    for w in weights:
        value = numpy.asarray(w.numpy() if hasattr(w, "numpy") else w)
        digest.update(repr(tuple(value.shape)).encode())
        digest.update(numpy.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def network_checksums(workdir: str) -> dict:
    """``{file name: sha256}`` of the network files (:data:`NETWORKS`) in ``workdir``."""
    return {name: sha256_of(os.path.join(workdir, name)) for name in NETWORKS
            if os.path.isfile(os.path.join(workdir, name))}


def marker_problem(workdir: str):
    """What is wrong with the finished marker of a run whose networks are on disk, or None.

    A marker that cannot be read, does not say ``"trained": true``, or lists
    a network whose checksum differs (or that is missing), and a missing
    marker next to final networks without a backup (the backup is removed
    only after the marker is written) are problems: such a directory holds a
    finished run, which must not be trained again.
    """
    path = os.path.join(workdir, FINISHED)
    present = [name for name in NETWORKS if os.path.isfile(os.path.join(workdir, name))]
    if not os.path.exists(path):
        if present and not os.path.exists(os.path.join(workdir, "backup", "state.json")) and not finished(workdir):
            return f"{FINISHED} is missing but the final networks are there and the backup is gone"
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        return f"{FINISHED} cannot be read ({type(e).__name__})"
    if not isinstance(marker, dict) or marker.get("trained") is not True:
        return f"{FINISHED} does not say the run is trained ({json.dumps(marker)[:60]})"
    recorded = marker.get("networks")
    if not isinstance(recorded, dict):
        return None  # written before checksums were recorded
    for name, checksum in recorded.items():
        file = os.path.join(workdir, str(name))
        if not os.path.isfile(file):
            return f"{name}, listed in {FINISHED}, is missing"
        if sha256_of(file) != checksum:
            return f"{name} differs from the network recorded in {FINISHED} (its sha256 changed)"
    return None


# What a weights file holds beyond the numbers (HDF5 or zip structure, names, config), at most.
FILE_OVERHEAD_BYTES = 1 << 20


def variables_nbytes(variables) -> int:
    """The bytes of the numbers of ``variables`` (Keras or TensorFlow variables)."""
    import numpy

    total = 0
    for v in variables:
        size = getattr(v.dtype, "size", None)  # a TensorFlow dtype; Keras names its dtypes
        if not isinstance(size, int):
            try:
                size = numpy.dtype(str(v.dtype)).itemsize
            except TypeError:
                size = 4
        total += size * int(numpy.prod([int(d) for d in v.shape]))
    return total


def check_free_space(path: str, nbytes: int) -> None:
    """Raises OSError(ENOSPC) naming the directory of ``path`` when it has less than ``nbytes`` free.

    Checked before a weights file is written: the HDF5 writer does not fail
    cleanly when the disk fills in the middle of a file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # the write itself reports what is wrong
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"No space left on device: {path} needs about {nbytes / 1e6:.1f} MB, "
                      f"{free / 1e6:.1f} MB are free", directory)


def partial_name(path: str) -> str:
    """``dir/partial-<name>`` for ``dir/<name>``: where a file is written before it is renamed into place."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f"partial-{name}")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary name next to ``path``; renames it onto ``path`` when the block succeeds.

    The temporary name keeps the file's suffix (``partial-<name>``) so that
    writers that check it (Keras' ``.weights.h5``, ``.keras``) accept it. If
    the block fails, the temporary file is removed and ``path`` is untouched.
    """
    partial = partial_name(path)
    remove(partial)
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        remove(partial)
        raise


def remove(path: str) -> None:
    """Removes a file, link or directory tree if it exists; errors are ignored."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def atomic_write(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, fsync and rename."""
    with atomic_path(path) as partial:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_replace_dir(path: str, write) -> None:
    """Calls ``write(tmp)`` to build a directory, then puts it at ``path`` (replacing an old one).

    The old directory is moved aside before the new one is renamed into
    place, so ``path`` is either the old or the new complete directory, or
    (for an instant) absent -- never a mixture.
    """
    partial = partial_name(path)
    old = os.path.join(os.path.dirname(path), f"old-{os.path.basename(path)}")
    remove(partial)
    try:
        write(partial)
    except BaseException:
        remove(partial)
        raise
    remove(old)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(partial, path)
    remove(old)


def mark_finished(workdir: str, evaluated: bool) -> None:
    """Writes the finished marker atomically (the last write of a run), with the networks' checksums."""
    marker = {"trained": True, "evaluated": bool(evaluated), "networks": network_checksums(workdir)}
    atomic_write(os.path.join(workdir, FINISHED), json.dumps(marker) + "\n")


def workdir_status(workdir: str) -> str:
    """"new" (absent or empty), "unfinished", "trained" (finished train-only run) or "finished" (evaluated).

    Raises UserError for a path that is not a directory or a directory that
    holds something else than a tfrobust run.
    """
    if not workdir:
        raise UserError("--workdir must not be empty")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} exists and is not a directory")
    try:
        entries = set(os.listdir(workdir)) if os.path.isdir(workdir) else set()
    except OSError as e:
        raise UserError(f"workdir {workdir} cannot be read: {e.strerror or e}") from None
    if not entries - {LOCK}:
        return "new"
    problem = marker_problem(workdir)
    if problem:
        raise UserError(f"workdir {workdir} holds a finished run whose marker is damaged: {problem}; nothing was "
                        f"changed. Evaluate its networks with `evaluate.py --model {workdir}`, or train again in "
                        "another --workdir")
    marker = finished(workdir)
    if marker:
        return "finished" if marker.get("evaluated") else "trained"
    if CONFIG not in entries:
        raise UserError(f"workdir {workdir} is not empty and holds no tfrobust run; choose another --workdir")
    return "unfinished"


def prepare_workdir(workdir: str) -> bool:
    """Creates ``workdir``; returns True when an unfinished run is there to resume.

    A finished run or a non-empty directory that is not a run of ours is
    never overwritten (UserError).
    """
    status = workdir_status(workdir)
    if status == "finished":
        raise UserError(f"workdir {workdir} holds a finished run; choose another --workdir")
    if status == "trained":
        raise UserError(f"workdir {workdir} holds a finished training run (--no-eval); choose another --workdir, "
                        "or run the same command without --no-eval to evaluate it")
    os.makedirs(workdir, exist_ok=True)
    return status == "unfinished"


@contextlib.contextmanager
def owned(workdir: str):
    """Creates ``workdir`` if needed and holds its lock; a start refused before anything was written
    removes the directory it created."""
    workdir_status(workdir)  # refuses a foreign directory before anything is created
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    try:
        with lock(workdir):
            yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(workdir)  # only if empty
        raise


def holds_config(workdir: str, config: dict) -> bool:
    """Whether ``workdir/config.yaml`` is ``config`` (a config as a dict, ``config.to_dict``)."""
    with open(os.path.join(workdir, CONFIG), encoding="utf-8") as f:
        return yaml.safe_load(f) == config


def check_new_file(path: str, flag: str) -> None:
    """Refuses (UserError naming ``flag``) an output file that exists or cannot be written: nothing is overwritten."""
    import tempfile

    if not path.strip():
        raise UserError(f"{flag} must not be empty")
    if os.path.exists(path):
        raise UserError(f"output file {path} exists; choose another {flag}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{flag} {path}: directory {directory} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tfrobust-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"{flag}: cannot write in {directory} ({e.strerror or e})") from None


def write_config(workdir: str, config: dict) -> None:
    """Writes ``config`` (a dict) to ``workdir/config.yaml``, atomically."""
    atomic_write(os.path.join(workdir, CONFIG), yaml.safe_dump(config, sort_keys=False))


__all__ = ["LOCK", "FINISHED", "REPORT", "CONFIG", "workdir_status", "prepare_workdir", "owned", "holds_config",
           "check_new_file", "write_config", "lock", "finished", "partial_name", "remove", "atomic_path", "atomic_write",
           "atomic_replace_dir", "mark_finished", "output_lock", "NETWORKS", "sha256_of", "network_checksums", "marker_problem", "weights_checksum",
           "check_free_space", "variables_nbytes", "FILE_OVERHEAD_BYTES"]
