"""Keras finds tfrobust's saved classes after ``import tfrobust``, without TensorFlow loaded at import.

``keras.models.load_model`` looks a saved class up by its registered name
(``tfrobust>RobustModel``) in Keras' registry of custom objects, which the
class's module fills when it is imported. ``import tfrobust`` imports no
TensorFlow, so it registers a stand-in under each name instead: once Keras is
imported (at once if it already is, otherwise right after its import), and the
stand-in imports the real class when a file is loaded. Importing the class's
module replaces the stand-in with the class itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# Registered name -> (module, class) of every class that tfrobust saves into .keras files.
CLASSES = {"tfrobust>RobustModel": ("tfrobust.trainer", "RobustModel")}


class _Deferred:
    """Keras' registry entry for a class whose module is imported on first use."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def resolve(self):
        return getattr(importlib.import_module(self.module), self.name)

    def from_config(self, config):
        return self.resolve().from_config(config)

    def __repr__(self):
        return f"<{self.module}.{self.name}, imported when first loaded>"


def register_with_keras() -> None:
    """Puts the stand-ins into Keras' registry (a real class already registered is kept)."""
    from keras.saving import get_custom_objects

    registry = get_custom_objects()
    for registered_name, (module, name) in CLASSES.items():
        registry.setdefault(registered_name, _Deferred(module, name))


class _RegisterAfter(importlib.abc.Loader):
    """Runs the real loader of ``keras``, then :func:`register_with_keras`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _stop_watching()
        register_with_keras()


class _KerasImportWatch(importlib.abc.MetaPathFinder):
    """Finds ``keras`` with the other finders and wraps its loader.

    It stays in place until Keras has been imported: a look-up alone
    (``importlib.util.find_spec("keras")``, as TensorFlow does) imports nothing.
    """

    searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" or self.searching:
            return None
        self.searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


def _stop_watching() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _KerasImportWatch)]


def install() -> None:
    """Registers now if Keras is imported, otherwise as soon as it is."""
    if "keras" in sys.modules:
        register_with_keras()
    elif not any(isinstance(f, _KerasImportWatch) for f in sys.meta_path):
        sys.meta_path.insert(0, _KerasImportWatch())


__all__ = ["CLASSES", "register_with_keras", "install"]
