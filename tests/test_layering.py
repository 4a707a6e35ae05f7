"""Layering: the import graph of every module under ``fedrobust/``, ``strategies/`` and ``clients/`` has no
cycle, and every import points down the layer order declared below.

The graph is built statically with ``ast``: module-level and function-level
imports, relative ones resolved, ``importlib.import_module("...")`` /
``__import__("...")`` with a literal name. Importing ``a.b.c`` runs the
``__init__`` of ``a`` and ``a.b`` first, so it counts as importing those
packages too (a package's own modules are exempt from importing it: Python
has already begun it). A package whose ``__init__`` must stay light
(``fedrobust``, ``fedrobust.tuning``, ...) names its contents lazily (PEP 562),
which the graph sees as no import at all, as Python does.

Dynamically: a fresh process that imports the ClientApp, and has it train on
a task (made in another process, as the server makes it), holds nothing of
``fedrobust.evaluation`` or ``fedrobust.tuning``, nor the whole config: a node
reads its task, checked against the sections it needs.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedrobust", "strategies", "clients")

# The layer order, lowest first. A module may import modules of its own layer or of a lower one, never of a
# higher one. Entries are dotted module names or fnmatch patterns on them; a module named exactly belongs to
# that layer, any other to the first layer with a pattern that matches it. Every module must have a layer.
LAYERS: list[tuple[str, list[str]]] = [
    # errors, files, signals, processes, statistics, views; and the packages whose __init__ names its
    # contents lazily (fedrobust.lazy): beginning one imports nothing
    ("foundation", ["fedrobust", "fedrobust.errors", "fedrobust.lazy", "fedrobust.atomic", "fedrobust.interrupt",
                    "fedrobust.progress", "fedrobust.stats", "fedrobust.views", "fedrobust.redact",
                    "fedrobust.sessions", "fedrobust.rayhead", "fedrobust.rayinit", "fedrobust.augment",
                    "fedrobust.idx", "fedrobust.ensemble", "fedrobust.ensemble_settings", "conf",
                    "fedrobust.models", "strategies", "fedrobust.evaluation", "fedrobust.tuning"]),
    # what trains and attacks a model, knowing nothing of runs; and each config section's schema, defaults
    # and checks (a *settings module next to the code that reads the section)
    ("core", ["fedrobust.data", "fedrobust.partition", "fedrobust.attacks", "fedrobust.attacks.*",
              "fedrobust.models.*", "fedrobust.nas", "fedrobust.nas.ops", "fedrobust.nas.genotype",
              "fedrobust.nas.network", "fedrobust.nas.supernet", "fedrobust.nas.penalty", "strategies.*",
              "fedrobust.training", "fedrobust.data_settings", "fedrobust.deployment_settings", "fedrobust.behaviours",
              "fedrobust.training_settings", "fedrobust.engine_settings", "fedrobust.evaluation.settings",
              "fedrobust.tuning.settings"]),
    # the whole config: the sections composed, overrides, the plug-ins that add strategies, losses, stages
    ("config", ["fedrobust.overrides", "fedrobust.config", "fedrobust.plugins"]),
    # what a node runs: its task, its training round, the messages
    ("node", ["fedrobust.task", "fedrobust.resume", "fedrobust.node", "fedrobust.protocol", "fedrobust.federation",
              "clients",
              "clients.*"]),
    # a trained run as everything above reads it: members, digests, held-out images, content keys
    ("runs", ["fedrobust.runs", "fedrobust.runs.*"]),
    # training a run: its directory, the server's rounds, the engines, deployment helpers, output folders
    ("training runs", ["fedrobust.run", "fedrobust.rounds", "fedrobust.engines", "fedrobust.simprocess",
                       "fedrobust.deploy", "fedrobust.searchdir", "fedrobust.screening", "fedrobust.poisoning"]),
    # the searches over a trained run: the attack loss (AutoLoss-AR) and the architecture (AdvRush)
    ("searches", ["fedrobust.lossearch", "fedrobust.lossearch.*", "fedrobust.nas.search", "fedrobust.nas.settings"]),
    # attacking a run; and every section's checks together (the attack section's need the stage registry)
    ("evaluation", ["fedrobust.evaluation.*", "fedrobust.validation"]),
    # studies and sweeps over runs
    ("tuning", ["fedrobust.tuning.*"]),
    # entry points: the command line, the deployment's ServerApp
    ("commands", ["fedrobust.cli", "fedrobust.server_app"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _walk(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (read by type checkers, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo += child.orelse
                continue
            todo.append(child)


def imported_modules(path: Path, package: str | None = None, known: frozenset[str] | set[str] = frozenset()
                     ) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute names, relative ones resolved in ``package``, by default
    its own), with its line; function-level imports and ``importlib.import_module("...")`` /
    ``__import__("...")`` with a literal name included. ``from P import n`` imports ``P.n`` when that is a
    module in ``known`` (``P`` itself is then only begun, as a parent), else ``P``."""
    if package is None:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".") if node.level else []
            if node.level > 1:
                base = base[: len(base) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
            subs = [f"{module}.{a.name}" for a in node.names]
            found += [(node.lineno, s) for s in subs if s in known or not known]  # from . import evaluation
            if not known or any(s not in known for s in subs):
                found.append((node.lineno, module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: first line}, with the packages each import begins."""
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        own = set(_ancestors(name))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, target in imported_modules(path, package, known):
            while target and target not in known:  # from fedrobust.config import X: the module, not X
                target = target.rpartition(".")[0]
            if not target:
                continue
            for t in [*_ancestors(target), target]:
                if t != name and t not in own and t in known:
                    edges.setdefault(t, line)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def layer_of(module: str, layers: list[tuple[str, list[str]]] = LAYERS) -> int:
    for i, (_, entries) in enumerate(layers):
        if module in entries:
            return i
    for i, (_, entries) in enumerate(layers):
        if any(fnmatch.fnmatchcase(module, p) for p in entries if any(c in p for c in "*?[")):
            return i
    raise LookupError(module)


def upward_imports(graph: dict[str, dict[str, int]], modules: dict[str, Path],
                   layers: list[tuple[str, list[str]]] = LAYERS) -> list[str]:
    bad = []
    for name, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            if layer_of(target, layers) > layer_of(name, layers):
                where = modules[name].relative_to(ROOT) if modules[name].is_relative_to(ROOT) else modules[name].name
                bad.append(f"{where}:{line}: {name} ({layers[layer_of(name, layers)][0]}) "
                           f"imports {target} ({layers[layer_of(target, layers)][0]})")
    return bad


@pytest.fixture(scope="module")
def tree():
    modules = all_modules()
    return modules, import_graph(modules)


def test_every_module_has_a_layer(tree):
    modules, _ = tree
    unplaced = []
    for name in modules:
        try:
            layer_of(name)
        except LookupError:
            unplaced.append(name)
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_there_is_no_import_cycle(tree):
    _, graph = tree
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer(tree):
    modules, graph = tree
    bad = upward_imports(graph, modules)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


# ---------------------------------------------------------------- the checks themselves can fail ----

def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    """Write a throwaway package tree under ``tmp_path`` (read, never imported) and name its modules."""
    out = {}
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
        parts = Path(rel).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def test_the_parser_sees_relative_function_level_and_literal_dynamic_imports(tmp_path):
    probe = tmp_path / "probe.py"  # read as a module of fedrobust, never imported
    probe.write_text("def f():\n    from .evaluation.stages import stage_names\n    from . import tuning\n"
                     "    import importlib\n    importlib.import_module('fedrobust.evaluation')\n")
    modules = [m for _, m in imported_modules(probe, "fedrobust")]
    assert "fedrobust.evaluation.stages" in modules and "fedrobust.tuning" in modules
    assert modules.count("fedrobust.evaluation") == 1


def test_a_reintroduced_cycle_is_found(tmp_path):
    """config <-> models as it once was: a function-level import one way, a module-level one the other."""
    modules = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/config.py": "def f():\n    from .models import read_genotype\n",
        "pkg/models/__init__.py": "from ..config import SEARCHED_PREFIX\n",
    })
    cycle = find_cycle(import_graph(modules))
    assert cycle is not None and set(cycle) == {"pkg.config", "pkg.models"}


def test_importing_a_submodule_begins_its_package(tmp_path):
    """Importing pkg.low.schema runs pkg/low/__init__.py, which imports pkg.high: that is an upward import."""
    modules = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "from .low.schema import X\n",
        "pkg/low/__init__.py": "from ..high import Y\n",
        "pkg/low/schema.py": "X = 1\n",
        "pkg/high.py": "Y = 2\n",
    })
    graph = import_graph(modules)
    assert "pkg.low" in graph["pkg.base"] and "pkg.low.schema" in graph["pkg.base"]
    layers = [("bottom", ["pkg", "pkg.base", "pkg.low*"]), ("top", ["pkg.high"])]
    bad = upward_imports(graph, modules, layers)
    assert len(bad) == 1 and "pkg.low (bottom) imports pkg.high (top)" in bad[0]
    assert find_cycle(graph) is None


def test_an_import_against_the_layers_is_found(tmp_path):
    """The runs layer reaching up into evaluation, as evaluate <-> run once did."""
    modules = _package(tmp_path, {
        "fedrobust/__init__.py": "",
        "fedrobust/runs/__init__.py": "",
        "fedrobust/runs/images.py": "def f():\n    from ..evaluation.evaluate import evaluate_run\n",
        "fedrobust/evaluation/__init__.py": "",
        "fedrobust/evaluation/evaluate.py": "from ..runs.images import f\n",
    })
    bad = upward_imports(import_graph(modules), modules)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "fedrobust.runs.images (runs) imports fedrobust.evaluation.evaluate (evaluation)"]


# ---------------------------------------------------------------- a node, in a process ----

_TASK = r"""
import sys
from flwr.common.serde import recorddict_to_proto
from fedrobust.config import load_config
from fedrobust.protocol import encode_task
from fedrobust.task import node_task

cfg = load_config(["train.epochs=1", "train.progress=false", "train.batch_size=256", "deployment=distributed_iid",
                   "deployment.num_nodes=2"])
sys.stdout.buffer.write(recorddict_to_proto(encode_task(node_task(cfg), 0, {})).SerializeToString())
"""

# the ClientApp, given that message as a node is: it never reads the run's config
_CLIENT = r"""
import json, sys
upper = lambda: sorted(m for m in sys.modules if m.split(".")[:2] in (["fedrobust", "evaluation"], ["fedrobust", "tuning"]))
from clients.client_app import app
after_import = upper()

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity
for attr in ("_run_id", "_task_id", "_node_id"):
    setattr(TaskIdentity, attr, 1)
from fedrobust.protocol import decode_reply

proto = ProtoRecordDict()
proto.ParseFromString(sys.stdin.buffer.read())
msg = Message(content=recorddict_from_proto(proto), dst_node_id=100, message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=100, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
              run_config={})
(u,) = decode_reply(app(msg, ctx).content, "node 1")
print(json.dumps({"after_import": after_import, "after_round": upper(), "config": "fedrobust.config" in sys.modules,
                  "member": u.member}))
"""


def test_a_client_app_never_imports_evaluation_or_tuning():
    task = subprocess.run([sys.executable, "-c", _TASK], capture_output=True, timeout=300, cwd=ROOT)
    assert task.returncode == 0, task.stderr.decode()[-3000:]
    proc = subprocess.run([sys.executable, "-c", _CLIENT], input=task.stdout, capture_output=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    got = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert got == {"after_import": [], "after_round": [], "config": False, "member": 1}
