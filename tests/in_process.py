"""A simulation in the test's own process, for tests that patch Flower or Ray where the simulation runs.

``fedrobust train engine=simulation`` runs the simulation in a child process
(:func:`fedrobust.engines.run_simulation`), which a patch in the test's
process cannot reach; :func:`fedrobust.engines.simulate_in_process` is what
that child runs.
"""

from __future__ import annotations

from pathlib import Path


def simulate_here(overrides: list[str], run: Path) -> Path:
    """Prepare ``run`` as ``fedrobust train`` does and run the simulation here; the run directory."""
    from fedrobust.config import load_config
    from fedrobust.engines import simulate_in_process
    from fedrobust.run import prepare_run_dir

    import ray

    cfg = load_config(["engine=simulation", *overrides, f"run_dir={run}"])
    run_dir = prepare_run_dir(cfg, cfg.run_dir)
    try:
        simulate_in_process(cfg, run_dir)
    finally:  # after a failure the child's Ray is left to its parent to end; here, this is the parent
        if ray.is_initialized():
            ray.shutdown()
    return run_dir
