"""A private local Ray instance, in a child process of its own session (:class:`fedrobust.rayinit.RaySession` starts it).

``python -m fedrobust.rayhead READY_FD``, ``ray.init``'s arguments as JSON on
its standard input. It starts Ray (``ray.init(address="local", ...)``), writes
``{"address": GCS_ADDRESS}`` to ``READY_FD`` (or ``{"error": ONE_LINE}``, and
exits 1), then waits to be killed. The command that started it connects to
that address as a driver of its own. Its parent ends it, Ray's services and
workers with it, with one SIGKILL to its process group, at any moment (Ray
may be half-started); it is killed if its parent dies first.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from .sessions import die_with_parent


def main(argv: list[str]) -> int:
    ready_fd = int(argv[0])
    os.set_inheritable(ready_fd, False)
    die_with_parent()
    # Python's own SIGINT handler, whatever this process inherited: Ray's workers inherit the disposition, and
    # a task's cancel (ray.cancel) is a KeyboardInterrupt that an ignored SIGINT would swallow. (It leads a
    # session of its own: no terminal's Ctrl-C reaches it.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        init_args = json.loads(sys.stdin.read())
        import ray

        from .interrupt import hold

        ray.init(address="local", **init_args)
        hold("ray-head")  # test hook: Ray is up, the parent still waits
        os.write(ready_fd, json.dumps({"address": ray.get_runtime_context().gcs_address}).encode())
    except BaseException as exc:
        from .errors import one_line

        os.write(ready_fd, json.dumps({"error": one_line(exc)}).encode())
        return 1
    os.close(ready_fd)
    while True:  # until the parent's SIGKILL
        time.sleep(3600)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
