"""The resume log of an AutoAttack run: every decided batch in a JSON-lines file, replayed after an interruption."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from tfrobust.errors import UserError


def fingerprint(x, y, eps, norm, names, version, seed, batch_size, passes, individual) -> dict:
    """What a partial-results file must match to be replayed: the data and every setting."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).astype(np.int64).tobytes())
    return {"data_sha256": digest.hexdigest(), "n_examples": int(len(x)), "eps": float(eps), "norm": norm,
            "attacks": list(names), "version": version, "seed": int(seed), "batch_size": int(batch_size),
            "verdict_passes": int(passes), "individual": bool(individual)}


class PartialLog:
    """Append-only JSON-lines record of decided batches; replays a file from an interrupted run.

    Line 1 is the fingerprint of the run; each further line is one batch:
    ``{"attack", "batch", "examples": [...], "fooled": [...], "norms": [...]}``,
    written with one ``write`` call and flushed to disk (fsync) before the next
    batch starts. A torn last line (the process was killed while writing) is
    ignored and its batch runs again.
    """

    def __init__(self, path, fingerprint):
        self.path = path
        self.done = {}
        self.file = None
        if path is None:
            return
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().split("\n")
            try:
                header = json.loads(lines[0])
            except ValueError:
                raise UserError(f"{path} is not a partial-results file of this evaluation; remove it or "
                                "choose another output") from None
            if header != fingerprint:
                changed = sorted(k for k in set(header) | set(fingerprint) if header.get(k) != fingerprint.get(k))
                raise UserError(f"{path} was written by an evaluation with different {', '.join(changed)}; "
                                "remove it to start over or rerun the same command")
            complete = []
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # torn last line
                self.done[(entry["attack"], entry["batch"])] = entry
                complete.append(line)
            # rewrite without a torn tail, atomically
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write("\n".join([lines[0]] + complete) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")
            self._write(fingerprint)

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
            self._write({"attack": attack, "batch": int(batch), "examples": [int(i) for i in examples],
                         "fooled": [int(i) for i in fooled], "norms": [float(v) for v in norms]})

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


__all__ = ["fingerprint", "PartialLog"]
