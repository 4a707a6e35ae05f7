"""The errors a command answers in one line, and that line.

Kept free of any third-party import, so that the command line can catch them
before it has imported anything heavy (:mod:`fedrobust.cli`). The line is
redacted (:func:`redact`: a URL's password becomes ``***``), as every log
line is, since an error may quote a config value such as ``tune.storage``.
"""

from __future__ import annotations

import re

__all__ = ["ConfigError", "DataError", "OneLineFailure", "check", "one_line", "redact"]

# scheme://user:password@  (the user may be empty; the password runs to the last '@' before the host)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^\s]*)(?P<at>@)")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['head']}***{m['at']}" if m["password"] != "***" else m[0], text)


class ConfigError(ValueError):
    """A configuration that cannot run. The message is one line naming the key."""


class DataError(RuntimeError):
    """A dataset that cannot be read. The message says what was expected where."""


class OneLineFailure(RuntimeError):
    """A failure whose message is one line that says it all: the command prints it and exits 1."""


def one_line(what: BaseException | str) -> str:
    """A message on one line: ``what``'s text with its whitespace collapsed, redacted (an exception with no
    message gives its type's name)."""
    text = redact(" ".join(str(what).split()))
    return text or ("" if isinstance(what, str) else type(what).__name__)


def check(ok: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``ok``: how every config section's checks read."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
