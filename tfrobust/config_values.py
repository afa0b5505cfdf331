"""Config values from YAML and command-line text: a value converted to its field's annotated type.

``coerce("0.5,0.75", list, "eval.x")`` is ``[0.5, 0.75]``; ``coerce("8/255",
float, "attack.eps")`` the exact fraction; a value that does not fit is a
one-line :class:`~tfrobust.errors.UserError` naming the key.
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

from tfrobust.errors import UserError, parse_number


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts ``value`` to the annotated type, or raises UserError naming ``key``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"config key {key!r} needs true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key {key!r} needs a number, got {value!r}")
        try:
            number = (parse_number(value) if isinstance(value, str) else float(value)) if annotation is float else value
            if annotation is int:
                number = int(value) if not isinstance(value, float) or value.is_integer() else None
                if number is None:
                    raise ValueError
            return number
        except (TypeError, ValueError):
            raise UserError(
                f"config key {key!r} needs {'an integer' if annotation is int else 'a number'}, got {value!r}"
            ) from None
    if annotation is str:
        return str(value)
    if annotation is list or origin is list:
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise UserError(f"config key {key!r} needs a list, got {value!r}") from None
            else:
                # "0.5,0.75" -> [0.5, 0.75]: each item is read as a YAML scalar, like the items of a [...] list.
                value = [_scalar(item.strip()) for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key!r} needs a list, got {value!r}")
        return [_fraction_or_item(item) for item in value]
    return value


def _scalar(text: str):
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, str, bool)) else text


def _fraction_or_item(item):
    """A list item written as a fraction (``1/2``) as its number; any other item unchanged."""
    if isinstance(item, str) and "/" in item:
        try:
            return parse_number(item)
        except ValueError:
            return item
    return item


__all__ = ["coerce"]
