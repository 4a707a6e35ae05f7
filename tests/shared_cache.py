"""A fedrobust cache folder for a test, whose node partitions are the whole run's.

Entries of ``$FEDROBUST_CACHE/shards`` are named by their content and checked
when read (fedrobust/partition.py), so sharing them lets no test see another's
state; it spares each process a test starts the import of flwr-datasets (about
4 s) to compute them again. Everything else in the folder is the test's own.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARDS_ENV = "FEDROBUST_TEST_SHARDS"  # set by tests/conftest.py: the run's partition folder


def cache_dir(path: Path) -> Path:
    """Create ``path`` as a cache folder whose ``shards`` is the run's partition folder; return it."""
    path.mkdir(parents=True, exist_ok=True)
    link = path / "shards"
    if not link.is_symlink():
        link.symlink_to(os.environ[SHARDS_ENV], target_is_directory=True)
    return path
