"""What the resumable searches (``search-loss``, ``search-arch``) share: settings and an output folder.

Settings are a dataclass's defaults (the paper's), then a preset named by
``GROUP=PRESET`` (``conf/GROUP/PRESET.yaml``; ``paper`` is the defaults), then
``GROUP.KEY=VALUE`` overrides, whatever order they came in. The caller checks
the values.

A search's folder holds one search: ``search.json`` names it by a content
key of everything that shapes its trajectory. Running the same command again
finds the key and resumes from the checkpoint; a command with other settings
is refused, naming the settings that differ, rather than mixed into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conf import CONF_DIR

from .atomic import write_json
from .errors import ConfigError, one_line

__all__ = ["claim_folder", "load_group"]


def _preset(group: str, name: str, presets: tuple[str, ...]) -> DictConfig:
    if name not in presets:
        raise ConfigError(f"{group}: unknown preset '{name}' (choose from {', '.join(presets)})")
    if name == "paper":
        return OmegaConf.create({})
    return OmegaConf.load(CONF_DIR / group / f"{name}.yaml")


def load_group(schema: type, group: str, presets: tuple[str, ...], overrides: list[str], *, usage: str) -> DictConfig:
    """``schema``'s defaults, then ``GROUP=PRESET``, then each ``GROUP.KEY=VALUE`` of ``overrides``.

    Anything else in ``overrides`` is a ``ConfigError``: ``{item}: {usage}``.
    """
    s = OmegaConf.structured(schema)
    prefix = group + "."
    dotlist = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key == group:
            s = OmegaConf.merge(s, _preset(group, value, presets))
        elif sep and key.startswith(prefix) and len(key) > len(prefix):
            dotlist.append((key, value))
        else:
            raise ConfigError(f"{key if sep else item}: {usage}")
    for key, value in dotlist:
        try:
            s = OmegaConf.merge(s, OmegaConf.from_dotlist([f"{key[len(prefix):]}={value}"]))
        except OmegaConfBaseException as exc:
            msg = one_line(str(exc).splitlines()[0])
            raise ConfigError(f"{key}: {msg}") from None
    return s


def claim_folder(out: Path, description: dict[str, Any], checkpoint: str, *, kind: str, label: str = "",
                 elsewhere: str = "give another folder", other: str = "other data") -> bool:
    """Create ``out`` for the search ``description`` names (its ``key`` and ``settings``), or check that it
    holds that search. True when ``out/checkpoint`` is there to resume from.

    ``kind`` names the search in messages ("loss search"), ``label`` prefixes them ("loss_search.out_dir: "),
    ``elsewhere`` says where else to go, ``other`` what else may differ when no setting does.
    """
    path = out / "search.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{label}{path} is damaged; remove {out} to start over") from None
        if not isinstance(saved, dict) or saved.get("key") != description["key"]:
            had = saved.get("settings") if isinstance(saved, dict) and isinstance(saved.get("settings"), dict) else {}
            differ = [k for k, v in description["settings"].items() if k in had and had[k] != v]
            what = f"differing: {', '.join(differ)}" if differ else other
            raise ConfigError(f"{label}{out} holds a search with other settings ({what}); "
                              f"{elsewhere}, or remove it to start over")
        return (out / checkpoint).is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        article = "an" if kind[:1] in "aeiou" else "a"
        raise ConfigError(f"{label}{out} exists and is not {article} {kind} folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, description)
    return False
