"""The errors a command answers in one line, and that line.

Kept free of any third-party import, so that the command line can catch them
before it has imported anything heavy (:mod:`fedrobust.cli`).
"""

from __future__ import annotations

__all__ = ["ConfigError", "OneLineFailure", "one_line"]


class ConfigError(ValueError):
    """A configuration that cannot run. The message is one line naming the key."""


class OneLineFailure(RuntimeError):
    """A failure whose message is one line that says it all: the command prints it and exits 1."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message with its whitespace collapsed (its type's name if it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__
