"""The simulation engine's child process (:func:`fedrobust.engines.run_simulation` starts it).

``python -m fedrobust.simprocess RUN_DIR CPUS RAY_TEMP_DIR RESULT_FD``, the
config as JSON on its standard input. It runs Flower and Ray
(:func:`fedrobust.engines.simulate_in_process`) and exits 0, or writes
``{"message": ONE_LINE, "config_error": BOOL}`` to ``RESULT_FD`` and exits 1.
It leads a session of its own and takes no signal from a terminal; its parent
ends it (and Ray with it) with SIGKILL to its process group, and it is killed
if its parent dies first. It ends with ``os._exit`` once its logs are flushed:
after a failure, Flower's threads may still be blocked in Ray, and nothing may
join them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from .sessions import die_with_parent


def main(argv: list[str]) -> int:
    run_dir, cpus, temp_dir, result_fd = Path(argv[0]), int(argv[1]), argv[2] or None, int(argv[3])
    os.set_inheritable(result_fd, False)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from .config import config_from_json
        from .engines import simulate_in_process
        from .plugins import load_plugins
        from .run import setup_logging

        # the nodes' strategies and (simulated) behaviours; the evaluation runs in the parent
        load_plugins("strategies", "losses", "behaviours")
        cfg = config_from_json(sys.stdin.read())
        setup_logging(run_dir)
        simulate_in_process(cfg, run_dir, num_cpus=cpus or None, temp_dir=temp_dir)
        return 0
    except BaseException as exc:
        from .errors import ConfigError, one_line

        logging.getLogger("fedrobust").debug("simulation failed", exc_info=True)
        from .training import DivergedError

        os.write(result_fd, json.dumps({"message": one_line(exc), "config_error": isinstance(exc, ConfigError),
                                        "diverged": isinstance(exc, DivergedError)}).encode())
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
