"""The resume log of an AutoAttack run: every decided batch in a JSON-lines file, replayed after an interruption."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from tfrobust.errors import UserError
from tfrobust.rundir import weights_checksum

DISCARDED = ".discarded"


def fingerprint(x, y, eps, norm, names, version, seed, batch_size, passes, individual, model_sha256=None) -> dict:
    """What a partial-results file must match to be replayed: the model's weights, the data and every setting."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    return {"model_sha256": model_sha256, "data_sha256": digest.hexdigest(), "n_examples": int(len(x)),
            "eps": float(eps), "norm": norm, "attacks": list(names), "version": version, "seed": int(seed),
            "batch_size": int(batch_size), "verdict_passes": int(passes), "individual": bool(individual)}


def _line_checksum(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _checked(line: str):
    """The batch entry of a line whose checksum and keys are right, else None."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    keys = {"attack", "batch", "examples", "fooled", "norms", "sha256"}
    if not isinstance(entry, dict) or set(entry) != keys or entry["sha256"] != _line_checksum(entry):
        return None
    return entry


class PartialLog:
    """Append-only JSON-lines record of decided batches; replays a file from an interrupted run.

    Line 1 is the fingerprint of the run (with the sha256 of the model's
    weights); each further line is one batch:
    ``{"attack", "batch", "examples": [...], "fooled": [...], "norms": [...], "sha256"}``,
    where ``sha256`` is the checksum of the line's other fields, written with
    one ``write`` call and flushed to disk (fsync) before the next batch
    starts. A torn last line (the process was killed while writing) is
    ignored and its batch runs again. A file written for another model, or
    with a line that fails its checksum (garbled or edited), is not replayed:
    it is moved to ``<path>.discarded`` (replacing an older one), one line
    on stderr says why, and the evaluation starts from scratch. A file of the
    same model with other settings is refused (UserError): the command was
    probably mistyped.
    """

    def __init__(self, path, fingerprint):
        self.path = path
        self.done = {}
        self.file = None
        if path is None:
            return
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().split("\n")
            reason = self._replay(lines, fingerprint)
            if reason is None:
                self.file = open(path, "a", encoding="utf-8")
                return
            self.done = {}
            os.replace(path, path + DISCARDED)
            print(f"warning: {path} not replayed: {reason}; moved to {path + DISCARDED}, evaluating from scratch",
                  file=sys.stderr, flush=True)
        self.file = open(path, "w", encoding="utf-8")
        self._write(fingerprint)

    def _replay(self, lines, fingerprint):
        """Reads the decided batches of ``lines`` into ``done``; returns why the file is discarded, or None."""
        try:
            header = json.loads(lines[0])
        except ValueError:
            return "its first line is not a fingerprint"
        if not isinstance(header, dict):
            return "its first line is not a fingerprint"
        if header.get("model_sha256") != fingerprint["model_sha256"]:
            return "it was written for another model (the weights' sha256 differs)"
        if header != fingerprint:
            changed = sorted(k for k in set(header) | set(fingerprint) if header.get(k) != fingerprint.get(k))
            raise UserError(f"{self.path} was written by an evaluation with different {', '.join(changed)}; "
                            "remove it to start over or rerun the same command")
        body = lines[1:]
        while body and not body[-1]:
            body.pop()
        complete = []
        for number, line in enumerate(body, start=2):
            entry = _checked(line)
            if entry is None:
                if number == len(body) + 1 and lines[-1] != "" and _torn(line):
                    break  # the last line, cut short by a kill
                return f"line {number} fails its checksum (garbled or edited)"
            self.done[(entry["attack"], entry["batch"])] = entry
            complete.append(line)
        # rewrite without a torn tail, atomically
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join([lines[0]] + complete) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return None

    def _write(self, obj):
        self.file.write(json.dumps(obj) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def lookup(self, attack, batch, examples):
        entry = self.done.get((attack, batch))
        if entry is None:
            return None
        if list(entry["examples"]) != [int(i) for i in examples]:
            raise UserError(f"{self.path} does not match this evaluation (batch {batch} of {attack} holds other "
                            "examples); remove it to start over")
        return np.asarray(entry["fooled"], np.int64), np.asarray(entry["norms"], np.float64)

    def record(self, attack, batch, examples, fooled, norms):
        if self.file is not None:
            entry = {"attack": attack, "batch": int(batch), "examples": [int(i) for i in examples],
                     "fooled": [int(i) for i in fooled], "norms": [float(v) for v in norms]}
            entry["sha256"] = _line_checksum(entry)
            self._write(entry)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _torn(line: str) -> bool:
    """Whether ``line`` is an incomplete JSON text (a write cut short), rather than a complete but wrong one."""
    try:
        json.loads(line)
    except ValueError:
        return True
    return False


__all__ = ["fingerprint", "weights_checksum", "PartialLog", "DISCARDED"]
