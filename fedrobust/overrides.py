"""Command-line overrides before Hydra sees them: path keys, searched models, one error per bad override.

Keys whose values are file-system paths (:data:`PATH_KEYS`) bypass Hydra's
override grammar, so any name the file system allows (spaces, accents,
quotes, parentheses) works unquoted; so does ``model=searched:PATH`` (or
``model.name=``), whose path or JSON Hydra's grammar cannot take. Both are
set after composing (:func:`fedrobust.config.load_config`). Every other
override is parsed alone first, so that an error names the one at fault and
says how to quote it.
"""

from __future__ import annotations

from hydra.errors import HydraException
from omegaconf import DictConfig

from .errors import ConfigError, one_line
from .models.settings import is_searched, model_spec

__all__ = ["PATH_KEYS", "check_syntax", "inline_model_overrides", "names_searched_model", "split_path_overrides",
           "unquoted"]

PATH_KEYS = ("run_dir", "study_dir", "data.root", "attack.cache_dir")
_NULLABLE_PATHS = ("run_dir", "study_dir", "data.root")


def unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]  # quoted for Hydra, as its grammar would require
    return value


def names_searched_model(key: str, value: str) -> bool:
    """``model=searched:...`` or ``model.name=searched:...``: Hydra has no group option for the first, and
    its grammar takes neither an arbitrary path nor JSON, so both are set after composing, as paths are."""
    return key.lstrip("+") in ("model", "model.name") and is_searched(unquoted(value))


def split_path_overrides(overrides: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """The path (and searched-model) overrides as ``{key: value}``, and the rest for Hydra."""
    paths: dict[str, str | None] = {}
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and names_searched_model(key, value):
            paths["model.name"] = unquoted(value)
        elif sep and key.lstrip("+") in PATH_KEYS:
            value = unquoted(value)
            key = key.lstrip("+")
            paths[key] = None if key in _NULLABLE_PATHS and value in ("", "null") else value
        else:
            rest.append(item)
    return paths, rest


def check_syntax(overrides: list[str]) -> None:
    """Parse each override alone, so that an error names the one at fault and says how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except HydraException as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith(("See https", "Error parsing"))]
            reason = "an unexpected character" if not lines or "LexerNoViableAlt" in lines[0] else one_line(lines[0])
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"{item}: not an override (expected key=value)") from None
            quote = "'" if '"' in value else '"'
            raise ConfigError(f"{item}: Hydra cannot parse this value ({reason}); quote it, e.g. "
                              f"{key}={quote}{value}{quote} (with shell quotes around the whole override)") from None


def inline_model_overrides(overrides: list[str] | tuple[str, ...], cfg: DictConfig) -> list[str]:
    """``overrides`` with a searched model's genotype file replaced by its JSON (``cfg``'s), for a process
    on another machine that cannot read the file (a deployment's ServerApp)."""
    kept = [o for o in overrides if not names_searched_model(*o.partition("=")[::2])]
    if len(kept) == len(overrides):
        return list(overrides)
    return [*kept, f"model.name={model_spec(cfg)}"]
