"""Write the configuration reference (docs/reference/configuration.md) from the config's schemas.

    .venv/bin/python docs/gen_config_reference.py          # write the page
    .venv/bin/python docs/gen_config_reference.py --check  # exit 1 if the committed page differs

Every key of every section: its type, its default and its doc line, read from
the dataclass that is the section's schema (the comment on the field's line,
or the comment lines just above it). Each section names the module that owns
it and the presets of its YAML group in ``conf/``. ``tests/test_docs.py``
runs ``--check``, so the page cannot go stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conf import CONF_DIR  # noqa: E402
from fedrobust.behaviours import BUILT_IN  # noqa: E402
from fedrobust.config import SECTIONS, Config  # noqa: E402
from fedrobust.lossearch.settings import LossSearchConfig  # noqa: E402
from fedrobust.nas.settings import ArchSearchConfig  # noqa: E402
from strategies.settings import STRATEGY_SCHEMAS  # noqa: E402

PAGE = ROOT / "docs" / "reference" / "configuration.md"

INTRO = {
    "data": "Which data set, where it lives, how each node's shard is split and augmented.",
    "model": "The members' architecture: a hand-made model, or a searched one (`model=searched:PATH`).",
    "deployment": "How many nodes there are, how the training set is split between them (and the images the "
                  "server keeps), and which nodes cheat in a simulation.",
    "strategy": "How each member is trained: its loss. Each strategy has keys of its own (below).",
    "optimizer": "SGD, for every member.",
    "train": "Local training of each member.",
    "engine": "Where the nodes run, and what a run does when one does not answer.",
    "ensemble": "How the server combines the members, and which members it screens out on its own images.",
    "attack": "The evaluation: which images, which attacks, their budgets and losses.",
    "tune": "A study (`fedrobust tune`): its trials, its sampler (NSGA-II by default), its multi-fidelity scheduler, "
            "the accuracy constraint, the search space.",
    "ray": "The Ray instance a study's trials run on.",
}


def _comments(cls: type) -> dict[str, str]:
    """field -> its doc line: the comment on the field's line, or the comment lines just above it."""
    source = inspect.getsource(cls)
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.lineno
            text = by_line.get(line, "")
            above, k = [], line - 1
            while k >= 1 and lines[k - 1].strip().startswith("#"):
                above.insert(0, by_line[k])
                k -= 1
            docs[node.target.id] = " ".join(filter(None, [*above, text]))
    return docs


def _default_sources(cls: type) -> dict[str, str]:
    """field -> its default as written, where that is an expression (8 / 255) rather than a literal."""
    out = {}
    for node in ast.parse(inspect.getsource(cls)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.BinOp):
            out[node.target.id] = ast.unparse(node.value)
    return out


def _yaml(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value) if value == "" else value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _type_name(hint: object) -> str:
    """``int | None`` as "int or null" (a table cell cannot hold a bare |), ``list[str]`` as it is."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join([*(_type_name(a) for a in rest), "null"])
    return getattr(hint, "__name__", None) if not args else str(hint).replace("typing.", "")


def _default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _rows(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    docs, exprs = _comments(cls), _default_sources(cls)
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            docs = {**_comments(base), **docs}
    hints = typing.get_type_hints(cls)
    rows, long = [], []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hints[f.name]) and not prefix:
            continue  # a section: its own heading
        if dataclasses.is_dataclass(hints[f.name]):  # a group of keys inside a section: its own table
            doc = docs.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | group | (below) | {doc} |")
            long.append(f"`{prefix}{f.name}`, its keys:\n\n" + _table(hints[f.name], f"{prefix}{f.name}."))
            continue
        kind = _type_name(hints[f.name])
        value = _default(f)
        shown = _yaml(value)
        if f.name in exprs:
            shown = f"{exprs[f.name]} = {value:.6g}"
        if len(shown) > 48:
            long.append(f"`{prefix}{f.name}` defaults to:\n\n```yaml\n{json.dumps(value, indent=2)}\n```\n")
            shown = "(below)"
        doc = docs.get(f.name, "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{prefix}{f.name}` | {kind} | `{shown}` | {doc} |")
    return rows, long


def _table(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> str:
    rows, long = _rows(cls, prefix, skip)
    out = ["| key | type | default | what it is |", "|---|---|---|---|", *rows, ""]
    return "\n".join(out + long)


def _presets(group: str) -> str:
    folder = CONF_DIR / group
    if not folder.is_dir():
        return ""
    names = []
    for path in sorted(folder.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        names.append(f"- `{group}={path.stem}`" + (f": {first}" if first else ""))
    return f"Presets (`conf/{group}/`):\n\n" + "\n".join(names) + "\n"


def render() -> str:
    parts = ["""# Configuration reference

<!-- Generated by docs/gen_config_reference.py from the config's schemas: do not edit by hand.
     tests/test_docs.py fails when this page differs from what the script writes. -->

Every key a run's config holds, by section: its type, its default, and what it is. Set any of them on the
command line as a Hydra override (`fedrobust train optimizer.lr=0.05 deployment.num_nodes=5`), or pick a
section's preset (`data=fashion_mnist`, `strategy=edlcm`). A key that does not exist, or a value of the
wrong type or out of range, is refused with one line naming the key, before anything runs.

Each section's schema and checks live next to the code that reads it (the module named under each heading);
`fedrobust/config.py` composes them.
"""]
    parts.append("## Top-level keys\n\n" + _table(Config, ""))
    for name, (schema, _) in SECTIONS.items():
        module = schema.__module__
        head = [f"## `{name}`\n", INTRO[name] + f" Schema: `{schema.__name__}` in `{module}`.\n"]
        if name == "strategy":
            head.append(_table(schema, "strategy."))
            for sname, sschema in STRATEGY_SCHEMAS.items():
                if sname == "plain":
                    continue
                head.append(f"### `strategy={sname}`\n\n" + _table(sschema, "strategy.", skip=("name",)))
        else:
            head.append(_table(schema, f"{name}."))
        if name == "deployment":
            head.append("A `deployment.malicious` entry is `{node: N, behaviour: NAME, KEY: VALUE, ...}`, its other "
                        "keys the behaviour's parameters (`fedrobust/behaviours.py`; plug-ins add theirs):\n")
            for bname, cls in BUILT_IN.items():
                fields = _table(cls.Config, "") if dataclasses.fields(cls.Config) else "No parameters.\n"
                head.append(f"### `behaviour: {bname}`\n\n{(cls.__doc__ or '').strip()}\n\n" + fields)
        presets = _presets(name)
        if presets:
            head.append(presets)
        parts.append("\n".join(head))
    for title, schema, command, group in (
            ("Loss search", LossSearchConfig, "fedrobust search-loss RUN_DIR", "loss_search"),
            ("Architecture search", ArchSearchConfig, "fedrobust search-arch OUT_DIR", "arch_search")):
        parts.append("\n".join([
            f"## `{group}` ({title.lower()})\n",
            f"The settings of `{command}`, given as `{group}.KEY=VALUE` on its command line (not part of a run's "
            f"config). Schema: `{schema.__name__}` in `{schema.__module__}`.\n",
            _table(schema, f"{group}."), _presets(group)]))
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed page differs")
    parser.add_argument("--page", type=Path, default=PAGE, help=argparse.SUPPRESS)  # the tests' stale copy
    args = parser.parse_args()
    text = render()
    if args.check:
        if not args.page.is_file() or args.page.read_text() != text:
            print(f"{args.page} is stale: run .venv/bin/python docs/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    args.page.parent.mkdir(parents=True, exist_ok=True)
    args.page.write_text(text)
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
