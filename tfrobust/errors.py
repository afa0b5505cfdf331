"""Errors that name a user's mistake.

A :class:`UserError` is raised for bad input (an unknown name, a negative
budget, a missing file). The command-line entry points catch it, print its
one-line message and exit with status 2, without a traceback.
"""

import math
import numbers


class UserError(ValueError):
    """A mistake in what the user asked for, with a one-line explanation."""


def unknown_choice(kind: str, value, allowed) -> UserError:
    """Builds the error for a value that is not one of ``allowed``."""
    allowed = ", ".join(sorted(str(a) for a in allowed))
    return UserError(f"unknown {kind} {value!r}; allowed: {allowed}")


def check_number(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a finite float >= ``minimum`` (> with ``strict``), or a one-line UserError naming ``name``."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise UserError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value) if _is_scalar(value) else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise UserError(f"{name} must be a single number, got {value!r}")
    if not math.isfinite(number):
        raise UserError(f"{name} must be finite, got {number}")
    if number < minimum or (strict and number == minimum):
        raise UserError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {number:g}")
    return number


def parse_number(text) -> float:
    """A number written as text: a float, or a fraction ``a/b`` such as ``8/255`` (exact, unlike a rounded 0.031).

    Raises ValueError for anything else (a zero denominator included).
    """
    text = str(text).strip()
    if "/" in text:
        num, _, den = text.partition("/")
        try:
            return float(num) / float(den)
        except ZeroDivisionError:
            raise ValueError(f"not a number or fraction: {text!r}") from None
    return float(text)


def _is_scalar(value) -> bool:
    shape = getattr(value, "shape", ())
    return len(tuple(shape)) == 0


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (a Python or NumPy integer, not a bool), or a one-line UserError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_steps(name: str, value, minimum: int = 0, maximum: int = 1000) -> int:
    """``value`` as an int in [minimum, maximum], or a one-line UserError naming ``name``."""
    if isinstance(value, bool) or not _is_scalar(value):
        raise UserError(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name} must be an integer, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise UserError(f"{name} must be between {minimum} and {maximum}, got {number}")
    return number


__all__ = ["UserError", "unknown_choice", "check_number", "check_int", "check_steps", "parse_number"]
