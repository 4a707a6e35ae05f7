"""Secrets never written: a URL's password becomes ``***`` wherever a config is written or shown.

``tune.storage=postgresql://user:pass@host/db`` must reach Optuna, in the
tuner, and nothing else: every config file (``config.yaml``,
``study_config.json``, a trial's config), TensorBoard's text tab and
hyperparameters, and every log line get the redacted form. Nodes never need
the storage; their task does not carry it (:mod:`fedrobust.task`).

Any string in the config is redacted, not a list of known keys, so that a
URL with credentials given elsewhere (a Ray client address, a plug-in's key)
is covered too.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import redact

__all__ = ["redact", "redacted", "redacted_container"]


def _walk(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _walk(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v) for v in value]
    return value


def redacted_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, every URL password redacted."""
    return _walk(OmegaConf.to_container(cfg, resolve=True))


def redacted(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` (same types) with every URL password redacted; ``cfg`` is unchanged."""
    out = OmegaConf.merge(cfg, {})
    for key, value in _paths(OmegaConf.to_container(cfg, resolve=True)):
        new = _walk(value)
        if new != value:
            OmegaConf.update(out, key, new, merge=False)
    return out


def _paths(value: Any, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, f"{prefix}{k}.")
    else:  # a list is a leaf, replaced whole
        yield prefix.rstrip("."), value
