"""Finding and reading experiment config files: the configs shipped in the package, YAML without repeated keys."""

from __future__ import annotations

import os

import yaml

from tfrobust.errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise UserError(f"config key {key!r} is given twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_configs() -> dict:
    """The experiment files shipped with tfrobust: ``{name: one-line description}``.

    The description is the file's first comment line. Names are file names
    without ``.yaml`` (e.g. ``cifar10_preactresnet18_at_awp``) and can be given
    to ``--config`` or :func:`load_config` in place of a path.
    """
    found = {}
    for entry in sorted(os.listdir(PACKAGED_CONFIGS)):
        if entry.endswith(".yaml"):
            with open(os.path.join(PACKAGED_CONFIGS, entry), encoding="utf-8") as f:
                first = f.readline().strip()
            found[entry[: -len(".yaml")]] = first.lstrip("#").strip() if first.startswith("#") else ""
    return found


def resolve_config(name_or_path: str) -> str:
    """The file behind ``--config``: an existing path, else a packaged config's name.

    ``cifar10_preactresnet18_at_awp`` (with or without ``.yaml``) names the
    packaged file, and so does ``configs/<name>.yaml`` where no such file is
    (the README's form, outside a clone); anything that exists as a file is
    taken as it is.
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    name = os.path.basename(name_or_path)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    packaged = os.path.join(PACKAGED_CONFIGS, name + ".yaml")
    if os.path.dirname(name_or_path) in ("", "configs") and os.path.isfile(packaged):
        return packaged
    raise UserError(f"config file not found: {name_or_path} (neither a file nor a packaged config; "
                    "'tfrobust configs' lists the packaged ones)")


def read_config_file(path: str):
    """The YAML values of a config file (one-line UserError for an unreadable file, bad YAML or a repeated key)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise UserError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except UserError as e:
        raise UserError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None


__all__ = ["PACKAGED_CONFIGS", "packaged_configs", "resolve_config", "read_config_file"]
