"""A real multi-node Ray cluster on 127.0.0.1 for tests, owned and torn down by process id.

Each node is one ``ray start --block`` process in its own session with its
own ``--temp-dir``. A node's processes are the descendants of that process
plus anything whose command line names the node's temp dir (Ray services
that were re-parented). They are stopped with SIGKILL by those ids only; no
machine-wide ``ray stop`` is ever run, so Ray instances that are not the
test's are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
TEMP_PREFIX = "frray-"  # every test node's temp dir starts with this (short: Ray's socket paths must fit 107 bytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent(pid: int) -> int:
    """The parent's process id (0 when ``pid`` is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ppid := parent(int(entry))):  # 0: gone since the listing
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def live_processes() -> dict[int, str]:
    """Every process on this machine but this one and zombies: pid -> command line."""
    pids = (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid())
    return {pid: cmd for pid in pids if _state(pid) not in ("Z", "") and (cmd := _cmdline(pid))}


def processes_mentioning(text: str) -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and text in _cmdline(int(p)) and int(p) != os.getpid()}


def descendants(pid: int) -> set[int]:
    tree, out, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class RayNode:
    """One ``ray start --block`` node; ``env`` adds to the environment its workers inherit."""

    def __init__(self, *, head_address: str | None, num_cpus: int, resources: dict[str, float],
                 env: dict[str, str] | None = None, name: str = "node") -> None:
        self.temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp")
        self.name = name
        self.resources = resources
        self.port = free_port() if head_address is None else None
        args = [RAY, "start", "--block", f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                f"--resources={json.dumps(resources)}", "--object-store-memory=150000000", "--disable-usage-stats",
                "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        if head_address is None:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            args += [f"--address={head_address}"]
        self.log = Path(self.temp_dir) / "ray-start.log"
        full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
        self.proc = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.known: set[int] = {self.proc.pid}
        self.node_id: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_started(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                self.pids()  # remember what runs now, in case the process tree changes later
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start ({self.name}) exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"ray start ({self.name}) did not start in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def pids(self) -> set[int]:
        """Every live process of this node (and remembered ones that may still live)."""
        now = {self.proc.pid} | descendants(self.proc.pid) | processes_mentioning(self.temp_dir)
        self.known |= now
        return {p for p in self.known if Path(f"/proc/{p}").exists()}

    def kill(self) -> None:
        """SIGKILL this node's processes, by id, until none is left."""
        for _ in range(50):
            alive = self.pids()
            if not alive:
                break
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # zombies of our own children are reaped above; anything else must be gone
        left = {p for p in self.pids() if _state(p) not in ("Z", "")}
        if left:
            raise RuntimeError(f"ray node {self.name}: processes {sorted(left)} survived SIGKILL")

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


class LocalCluster:
    """A head node and worker nodes on 127.0.0.1, each ``ray start`` a process of its own."""

    def __init__(self) -> None:
        self.nodes: list[RayNode] = []
        self.head: RayNode | None = None

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None, env: dict | None = None) -> RayNode:
        self.head = RayNode(head_address=None, num_cpus=num_cpus, resources=resources or {"head": 1}, env=env, name="head")
        self.nodes.append(self.head)
        self.head.wait_started()
        return self.head

    def add_worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None, env: dict | None = None,
                   name: str = "worker") -> RayNode:
        assert self.head is not None
        node = RayNode(head_address=self.head.address, num_cpus=num_cpus, resources=resources or {name: 1},
                       env=env, name=name)
        self.nodes.append(node)
        node.wait_started()
        return node

    @property
    def address(self) -> str:
        assert self.head is not None
        return self.head.address

    def node_ids(self, expect: int, timeout: float = 60) -> dict[str, str]:
        """Custom resource name -> Ray node id of every alive node, asked from a short-lived driver."""
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False, configure_logging=False); "
                "print(json.dumps({k: n['NodeID'] for n in ray.nodes() if n['Alive'] for k in n['Resources'] "
                "if k in %r})); ray.shutdown()")
        names = sorted({k for node in self.nodes for k in node.resources})
        deadline = time.time() + timeout
        found: dict[str, str] = {}
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", code % (self.address, names)], capture_output=True, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, timeout=120)
            if out.returncode == 0:
                found = json.loads(out.stdout.strip().splitlines()[-1])
                if len(found) >= expect:
                    return found
            time.sleep(1)
        raise TimeoutError(f"expected {expect} nodes, found {found}")

    def shutdown(self) -> None:
        errors = []
        for node in reversed(self.nodes):  # workers first, the head last
            try:
                node.remove()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        self.nodes.clear()
        if errors:
            raise errors[0]

