"""Strict JSON for the tests: every .json and .jsonl file under a folder parses with no NaN or Infinity."""

from __future__ import annotations

import json
from pathlib import Path


def _reject_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def loads_strict(text: str):
    return json.loads(text, parse_constant=_reject_constant)


def assert_strict_json(folder: Path) -> int:
    """Every .json and .jsonl file under ``folder`` parses strictly; returns how many there are."""
    files = [p for p in Path(folder).rglob("*") if p.suffix in (".json", ".jsonl")]
    for path in files:
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in filter(None, lines):
            try:
                loads_strict(line)
            except ValueError as exc:
                raise AssertionError(f"{path}: {exc}") from None
    return len(files)
