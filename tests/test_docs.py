"""The docs: the configuration reference is what its script writes from the schemas, the README stays short
and its links resolve, and every page of docs/ is in the site's navigation.

``bash run.sh docs`` (run by ``.ci/run``) builds the site with ``mkdocs build --strict``, which also fails on a
broken link or anchor inside the site.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "gen_config_reference.py"


def _check(page: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--page", str(page)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_the_configuration_reference_is_what_the_script_writes():
    proc = _check(ROOT / "docs" / "reference" / "configuration.md")
    assert proc.returncode == 0, proc.stderr


def test_a_stale_configuration_reference_is_refused(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text((ROOT / "docs" / "reference" / "configuration.md").read_text().replace("`0.1`", "`0.2`", 1))
    proc = _check(stale)
    assert proc.returncode == 1 and "is stale" in proc.stderr


def test_the_reference_documents_every_key_of_every_section():
    from fedrobust.config import load_config

    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    cfg = load_config([])
    keys = [f"{section}.{key}" for section, value in cfg.items() if hasattr(value, "keys") for key in value.keys()]
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert not missing, missing
    undocumented = re.findall(r"^\| `([^`]+)` \|[^\n]*\|  \|$", page, re.M)
    assert not undocumented, f"keys without a doc line: {undocumented}"


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links to its docs"
    broken = [link for link in local if not (ROOT / link).exists()]
    assert not broken, broken


def test_every_docs_page_is_in_the_navigation():
    def pages(nav) -> list[str]:
        out = []
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out += pages(value) if isinstance(value, list) else [value]
        return out

    class _Loader(yaml.SafeLoader):  # mkdocs.yml may hold !!python/name tags (pymdownx's slugify)
        pass

    _Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    listed = set(pages(yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)["nav"]))
    present = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert present == listed, (sorted(present - listed), sorted(listed - present))
