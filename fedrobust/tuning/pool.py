"""Run trials as Ray tasks, a bounded number at a time."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["TrialPool"]

log = logging.getLogger("fedrobust")


class TrialPool:
    """Ray tasks with per-task resources; local Ray unless ``address`` names a cluster.

    Ray is started for the pool and stopped with it (a local instance) or
    disconnected (a cluster). Task output stays in the trials' own logs.
    """

    def __init__(self, fn: Callable, *, address: str | None, cpus: float, gpus: float, max_concurrent: int) -> None:
        import ray

        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                kwargs["address"] = address
            else:  # a new local instance, even if another one runs on this machine
                kwargs["address"] = "local"
                kwargs["num_cpus"] = max(os.cpu_count() or 1, int(cpus * max_concurrent + 0.999))
                kwargs["num_gpus"] = int(gpus * max_concurrent + 0.999) if gpus else None
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
            ray.init(**{k: v for k, v in kwargs.items() if v is not None})
        self._remote = ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        self.max_concurrent = max_concurrent
        self.running: dict[Any, Any] = {}  # ray ref -> key

    @property
    def free(self) -> int:
        return self.max_concurrent - len(self.running)

    def submit(self, key: Any, *args: Any, **kwargs: Any) -> None:
        self.running[self._remote.remote(*args, **kwargs)] = key

    def wait(self, timeout: float | None = None) -> list[tuple[Any, Any, BaseException | None]]:
        """Finished tasks as (key, result, error)."""
        if not self.running:
            return []
        ready, _ = self._ray.wait(list(self.running), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            key = self.running.pop(ref)
            try:
                out.append((key, self._ray.get(ref), None))
            except Exception as exc:  # the trial raised (RayTaskError wraps it) or its worker died
                cause = getattr(exc, "cause", None) or exc
                out.append((key, None, cause))
        return out

    def close(self) -> None:
        for ref in list(self.running):
            self._ray.cancel(ref, force=True)
        self.running.clear()
        if self._owned:
            self._ray.shutdown()
