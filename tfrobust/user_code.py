"""The user's code a run depends on: recorded when it trains, imported again wherever it is loaded.

A run trained with ``--model module:function`` or with plug-ins may hold
classes that only the user's modules define (a subclassed network, a custom
layer, a registered weight-space term). ``imports.json`` in the run directory
names each such module with the directory it was imported from (or the path
of a ``.py`` plug-in), so that ``evaluate``, ``pseudo_label`` and Python's
:func:`tfrobust.loading.load` import them in a new process, from any working
directory, before the run's ``.keras`` files are read.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys

from tfrobust.errors import UserError

FILE = "imports.json"


def import_plugins(names) -> None:
    """Imports each plug-in: a module name (found from the current directory too) or a ``.py`` file.

    Importing twice does nothing more (a module runs once per process). A
    plug-in that cannot be imported is a one-line UserError.
    """
    for name in names:
        name = str(name).strip()
        if not name:
            continue
        try:
            if name.endswith(".py"):
                path = os.path.abspath(name)
                if not os.path.isfile(path):
                    raise UserError(f"plugin file not found: {name}")
                module_name = "tfrobust_plugin_" + hashlib.sha1(path.encode()).hexdigest()[:12]
                if module_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
            else:
                if os.getcwd() not in sys.path and "" not in sys.path:
                    sys.path.insert(0, os.getcwd())  # a module next to where the command runs
                importlib.import_module(name)
        except UserError:
            raise
        except Exception as e:  # ImportError, or any error the plug-in's own code raises
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"plugin {name!r} could not be imported: {type(e).__name__}: {first}") from None


def _import_root(module_name: str):
    """The ``sys.path`` entry ``module_name`` was imported from, or None (a built-in or namespace module)."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = os.path.dirname(os.path.abspath(path))
    levels = module_name.count(".") + (1 if os.path.basename(path) == "__init__.py" else 0)
    for _ in range(levels):
        root = os.path.dirname(root)
    return root


def run_imports(config) -> list:
    """``[{"module": name, "path": dir}, {"file": path}, ...]``: the user's modules that ``config`` imported."""
    entries = []
    names = [str(p).strip() for p in getattr(config, "plugins", []) or []]
    model_name = config.model.name
    if ":" in model_name and not model_name.endswith(".keras"):
        names.append(model_name.partition(":")[0])
    for name in dict.fromkeys(n for n in names if n):
        if name.endswith(".py"):
            entries.append({"file": os.path.abspath(name)})
        else:
            entries.append({"module": name, "path": _import_root(name)})
    return entries


def record(config, run_dir: str, write) -> None:
    """Writes ``imports.json`` into ``run_dir`` with ``write(path, text)`` (nothing when there is nothing to import)."""
    entries = run_imports(config)
    if entries:
        write(os.path.join(run_dir, FILE), json.dumps({"imports": entries}, indent=1) + "\n")


def import_recorded(run_dir: str) -> None:
    """Imports what ``run_dir/imports.json`` names (nothing when the file is absent); one-line UserError otherwise."""
    path = os.path.join(run_dir, FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["imports"]
        entries = [dict(e) for e in entries]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged: it should list the modules the run imports") from None
    for entry in entries:
        if "file" in entry:
            import_plugins([str(entry["file"])])
            continue
        name, root = str(entry.get("module", "")), entry.get("path")
        if root and os.path.isdir(root) and root not in sys.path:
            sys.path.append(root)
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or any error the user's module raises
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(
                f"the run imports {name!r} (from {root}), which cannot be imported now: {type(e).__name__}: {first}"
            ) from None


__all__ = ["FILE", "import_plugins", "run_imports", "record", "import_recorded"]
