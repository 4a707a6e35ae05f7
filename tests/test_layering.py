"""Layering: a node, and the config's schema, never reach up into the evaluation or tuning code.

Statically: the modules below import nothing from ``fedrobust.evaluation`` or
``fedrobust.tuning``, at module level or inside a function. Dynamically: a
fresh process that imports the ClientApp, and has it train on a task, holds
neither package in ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPPER = ("fedrobust.evaluation", "fedrobust.tuning")
# the schema, and what a node runs: the ClientApp and the modules that read its task
NODE_SIDE = [ROOT / "fedrobust" / "config.py", ROOT / "fedrobust" / "task.py", ROOT / "fedrobust" / "protocol.py",
             ROOT / "fedrobust" / "node.py", *sorted((ROOT / "clients").glob("*.py"))]


def imported_modules(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute names, relative ones resolved in ``package``, by default
    its own), with its line; function-level imports and ``importlib.import_module("...")`` /
    ``__import__("...")`` with a literal name included."""
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".") if node.level else []
            if node.level > 1:
                base = base[: len(base) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]  # from . import evaluation
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _upper(module: str) -> bool:
    return any(module == u or module.startswith(u + ".") for u in UPPER)


def test_the_import_parser_sees_relative_and_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"  # read as a module of fedrobust, never imported
    probe.write_text("def f():\n    from .evaluation.stages import stage_names\n    from . import tuning\n"
                     "    import importlib\n    importlib.import_module('fedrobust.evaluation')\n")
    modules = [m for _, m in imported_modules(probe, "fedrobust")]
    assert "fedrobust.evaluation.stages" in modules and "fedrobust.tuning" in modules
    assert modules.count("fedrobust.evaluation") == 1


@pytest.mark.parametrize("path", NODE_SIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_node_side_modules_import_nothing_from_evaluation_or_tuning(path):
    bad = [f"{path.relative_to(ROOT)}:{line}: {m}" for line, m in imported_modules(path) if _upper(m)]
    assert not bad, bad


_CLIENT = r"""
import json, sys
upper = lambda: sorted(m for m in sys.modules if m.split(".")[:2] in (["fedrobust", "evaluation"], ["fedrobust", "tuning"]))
from clients.client_app import app
after_import = upper()

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for attr in ("_run_id", "_task_id", "_node_id"):
    setattr(TaskIdentity, attr, 1)
from fedrobust.config import load_config
from fedrobust.protocol import decode_reply, encode_task
from fedrobust.task import node_task

cfg = load_config(["train.epochs=1", "train.progress=false", "train.batch_size=256", "deployment=distributed_iid",
                   "deployment.num_nodes=2"])
msg = Message(content=encode_task(node_task(cfg), 0, {}), dst_node_id=100, message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=100, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
              run_config={})
(u,) = decode_reply(app(msg, ctx).content, "node 1")
print(json.dumps({"after_import": after_import, "after_round": upper(), "member": u.member}))
"""


def test_a_client_app_never_imports_evaluation_or_tuning():
    proc = subprocess.run([sys.executable, "-c", _CLIENT], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"after_import": [], "after_round": [], "member": 1}
