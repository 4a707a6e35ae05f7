import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest-xdist's workers share the cores. A worker runs torch with one intra-op thread per core it has.
    # The processes the tests start keep torch's default threads (the golden figures depend on them), but
    # their OpenMP threads sleep rather than spin while they wait, so as not to steal the other workers' cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


_RAY_MARKERS = ("raylet", "gcs_server", "ray::", "default_worker.py", "ray start", "frray-")  # frray-: tests/raycluster.py


def _ray_processes() -> dict[int, str]:
    """Live Ray processes on this machine: pid -> command line."""
    from raycluster import live_processes

    return {pid: cmd for pid, cmd in live_processes().items() if any(m in cmd for m in _RAY_MARKERS)}


# Every process the suite starts inherits this mark, so the leak check below can tell this session's
# Ray processes from anyone else's even after pytest-xdist's workers have exited.
SESSION_MARK = "FEDROBUST_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{time.time_ns()}")
_BEFORE = pytest.StashKey[set]()  # the Ray processes that ran when the session started


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")  # pytest-xdist's workers have it; a serial run is its own controller


def _ours(pid: int, cmd: str) -> bool:
    """Started by this session: a test cluster's node, or the mark in its environment or an ancestor's
    (Ray's agents rename themselves over their environment, so their parent raylet vouches for them)."""
    from raycluster import TEMP_PREFIX, parent

    if TEMP_PREFIX in cmd:
        return True
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    while pid > 1:
        try:
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            return False
        pid = parent(pid)
    return False


def pytest_collection_modifyitems(session, config, items):
    """The expensive tests first: slow ones, and those sharing a module's fixture (an xdist_group).
    pytest-xdist hands out work in this order, so the long units start early and the many short
    tests fill in at the end, and the workers finish together (a stable sort: the same order on every
    worker, as xdist requires)."""
    def cheap(item) -> bool:
        return item.get_closest_marker("slow") is None and item.get_closest_marker("xdist_group") is None

    items.sort(key=cheap)


_START = pytest.StashKey[tuple]()  # (monotonic time, busy CPU-s of the machine) when the session started


def _busy_cpu_s() -> float | None:
    """CPU-seconds the whole machine has spent busy since boot (Linux's /proc/stat; None elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user, nice, system, irq, softirq: not idle, iowait, nor steal (time the hypervisor gave to others)
    busy = sum(fields[:3]) + sum(fields[5:7])
    return busy / os.sysconf("SC_CLK_TCK")


def pytest_sessionstart(session):
    if _is_controller(session.config):
        session.config.stash[_BEFORE] = set(_ray_processes())
        session.config.stash[_START] = (time.monotonic(), _busy_cpu_s())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A line to read the suite's time against. The suite is CPU-bound and starts many fresh
    processes that import torch (commands, Ray workers, Flower's actors), so the same commit takes minutes
    more or less as the machine is faster or slower: say how fast (a fresh ``import torch``, in CPU-s) and
    how busy the machine was over the run (busy well under 100 % with pytest-xdist: waits, not CPU)."""
    if not _is_controller(config) or _START not in config.stash:
        return
    try:
        import resource  # Unix only
    except ImportError:
        return
    start, busy_at_start = config.stash[_START]
    wall = time.monotonic() - start
    busy_now = _busy_cpu_s()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import torch"], check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    torch_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpus = os.cpu_count() or 1
    busy = (f"the machine's {cpus} CPU(s) {(busy_now - busy_at_start) / (wall * cpus):.0%} busy over the run"
            if busy_now is not None and busy_at_start is not None and wall > 0 else f"{cpus} CPU(s)")
    terminalreporter.write_line(f"machine: {busy}; a fresh `import torch` took {torch_s:.2f} CPU-s")


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a Ray process started during it still runs at the end, and stop those this
    session started, by id. Checked once, in the controller, after every worker has finished: a
    worker's own check would see the Ray processes of tests still running on the other workers."""
    if not _is_controller(session.config) or _BEFORE not in session.config.stash:
        return
    before = session.config.stash[_BEFORE]
    deadline = time.time() + 30  # a local instance's services take a moment to exit after ray.shutdown()
    left = {}
    while time.time() < deadline:
        left = {p: c for p, c in _ray_processes().items() if p not in before}
        if not left:
            return
        time.sleep(0.5)
    ours = {p for p, c in left.items() if _ours(p, c)}
    for pid in ours:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    message = ("Ray processes started during the tests still ran at the end (this session's now killed): "
               + "; ".join(f"{p}{'' if p in ours else ' (not ours)'}: {c[:120]}" for p, c in sorted(left.items())))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One partition folder for the whole run (shared by pytest-xdist's workers; tests/shared_cache.py),
    and a cache for the module and session fixtures, which run before a test's own cache is set."""
    from shared_cache import SHARDS_ENV, cache_dir

    root = tmp_path_factory.getbasetemp()
    shards = (root.parent if "PYTEST_XDIST_WORKER" in os.environ else root) / "shards"  # the run's folder
    shards.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SHARDS_ENV, str(shards))
        mp.setenv("FEDROBUST_CACHE", str(cache_dir(root / "fedrobust-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own cache, so nothing touches the repo or ~/.cache;
    only the node partitions are the run's (tests/shared_cache.py)."""
    from shared_cache import cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDROBUST_CACHE", str(cache_dir(tmp_path / "fedrobust-cache")))


def write_cifar(root: Path, name: str = "cifar10", n_train_per_file: int = 6, n_test: int = 8, as_tarball: bool = False, seed: int = 0) -> Path:
    """Write a tiny CIFAR archive in the real python format (pickled dicts of bytes keys)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, label_key, n_classes = "cifar-10-batches-py", b"labels", 10
        files = {f"data_batch_{i}": n_train_per_file for i in range(1, 6)} | {"test_batch": n_test}
        meta = {"batches.meta": {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}}
    else:
        folder, label_key, n_classes = "cifar-100-python", b"fine_labels", 100
        files = {"train": 5 * n_train_per_file, "test": n_test}
        meta = {"meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}}
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    for fname, n in files.items():
        batch = {
            b"batch_label": fname.encode(),
            label_key: [int(v) for v in rng.integers(0, n_classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = [int(v) // 5 for v in batch[label_key]]
        with open(base / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    for fname, obj in meta.items():
        with open(base / fname, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    if as_tarball:
        tar_name = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        with tarfile.open(root / tar_name, "w:gz") as tar:
            tar.add(base, arcname=folder)
        for p in base.iterdir():
            p.unlink()
        base.rmdir()
        return root / tar_name
    return base


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format: magic 0x0000_08_ndim, big-endian sizes, the bytes."""
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """The four files of an MNIST-style data set in the real IDX format; labels cycle through the 10 classes,
    and each class has its own mean brightness, so that a model can learn them."""
    import gzip

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for n in (n_train, n_test):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = np.clip(rng.normal(25.0 * y[:, None, None], 30.0, (n, 28, 28)), 0, 255).astype(np.uint8)
        arrays += [x, y]
    for stem, array in zip(IDX_STEMS, arrays):
        blob = idx_bytes(array)
        (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(blob) if gz else blob)
    return folder
