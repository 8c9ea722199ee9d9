"""The one exception of model loading, ``ModelLoadError``, and how its messages quote
the error that caused it."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model source that cannot be turned into a module; the message says how to fix it."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut at
    ``limit`` characters: what a one-line error message quotes of a library's exception."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."
