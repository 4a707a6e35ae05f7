"""What a trial's simulation child leaves beside its scratch folder, and how it is cleaned up from outside.

A trial on the simulation engine runs Flower in a child process of its own
session (:func:`fedrobust.engines.run_simulation`), which records its pid and
its private Ray folder in ``child.pid`` next to the trial's scratch folder
while it runs. A trial stopped from inside (a cancel, an error) ends the
child's group itself; when its Ray worker was killed outright, the tuner
(on the same machine) reads the file and kills the group, then removes the
Ray folder and the scratch folder (:func:`cleanup_work_dir`). The child also
dies with the worker's thread that started it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..sessions import stop_group

__all__ = ["PID_FILE", "cleanup_work_dir"]

PID_FILE = "child.pid"


def cleanup_work_dir(work: Path) -> None:
    """Stop the child recorded in ``work``/child.pid (if any), remove its Ray folder, then remove the
    scratch folder ``work``.

    Only a folder directly under this machine's scratch root is removed.
    """
    from .remote import scratch_root

    work = Path(work)
    try:
        pid_text, temp_dir, *_ = (work / PID_FILE).read_text().splitlines() + ["", ""]
        pid = int(pid_text.strip())
    except (OSError, ValueError):
        pid, temp_dir = None, ""
    if pid is not None and pid > 1:
        stop_group(pid, grace_s=0.0)  # killed outright, as the engine itself ends its child's group
    if temp_dir.strip() and Path(temp_dir.strip()).name.startswith("fr-ray-"):
        shutil.rmtree(temp_dir.strip(), ignore_errors=True)
    if work.parent.resolve() == scratch_root().resolve():
        shutil.rmtree(work, ignore_errors=True)
