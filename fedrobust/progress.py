"""Progress bars that stay readable off a terminal (Ray actors, CI logs, redirected output)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

__all__ = ["interactive", "progress"]


def interactive() -> bool:
    """Whether stderr is a terminal (or, in the simulation engine's child, its parent's stderr is)."""
    return sys.stderr.isatty() or os.environ.get("FEDROBUST_TTY") == "1"


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True, leave: bool = True,
             initial: int = 0) -> tqdm:
    tty = interactive()
    return tqdm(
        iterable, total=total, desc=desc, disable=not enabled, leave=leave, initial=initial,
        dynamic_ncols=tty, mininterval=0.1 if tty else 10.0,
    )
