"""Errors that name a user's mistake.

A :class:`UserError` is raised for bad input (an unknown name, a negative
budget, a missing file). The command-line entry points catch it, print its
one-line message and exit with status 2, without a traceback.
"""


class UserError(ValueError):
    """A mistake in what the user asked for, with a one-line explanation."""


def unknown_choice(kind: str, value, allowed) -> UserError:
    """Builds the error for a value that is not one of ``allowed``."""
    allowed = ", ".join(sorted(str(a) for a in allowed))
    return UserError(f"unknown {kind} {value!r}; allowed: {allowed}")


__all__ = ["UserError", "unknown_choice"]
