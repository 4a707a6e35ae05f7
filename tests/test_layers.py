"""The import arrows point down: strategies and the attacks library never reach up into evaluation or runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("folder, package, forbidden", [
    ("strategies", "strategies", ("fedrobust.evaluation",)),
    ("fedrobust/attacks", "fedrobust.attacks", ("fedrobust.evaluation", "fedrobust.config", "fedrobust.run",
                                                "fedrobust.tuning", "omegaconf", "hydra", "strategies")),
])
def test_lower_layers_import_nothing_from_higher_ones(folder, package, forbidden):
    for path in sorted((ROOT / folder).glob("*.py")):
        for name in _imports(path, package):
            assert not name.startswith(forbidden), f"{path.relative_to(ROOT)} imports {name}"


def test_the_check_sees_relative_imports():
    assert "fedrobust.runs.cache" in _imports(ROOT / "fedrobust/evaluation/stages.py", "fedrobust.evaluation")
    assert "fedrobust.attacks" in _imports(ROOT / "strategies/adversarial.py", "strategies")
