"""The search space: config keys and their Optuna distributions.

``tune.space`` nests by config group, e.g. ``{optimizer: {lr: {type: float,
low: 1e-4, high: 0.4, log: true}}}``; any key of the composed config can be
searched, strategy hyperparameters included
(``+tune.space.strategy.alpha={type:float,low:0.1,high:10,log:true}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError

__all__ = ["SearchSpace", "SHORT_NAMES"]

# Column names in tables and plots.
SHORT_NAMES = {"optimizer.lr": "lr", "optimizer.momentum": "momentum", "optimizer.weight_decay": "weight_decay",
               "train.batch_size": "batch_size", "train.epochs": "epochs"}


def _leaves(node: Mapping, prefix: str = "") -> dict[str, Mapping]:
    out: dict[str, Mapping] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if not isinstance(value, Mapping):
            raise ConfigError(f"tune.space.{path}: expected a mapping with 'type', got {value!r}")
        if "type" in value:
            out[path] = value
        else:
            out.update(_leaves(value, path + "."))
    return out


def _distribution(path: str, spec: Mapping) -> optuna.distributions.BaseDistribution:
    key = f"tune.space.{path}"
    kind = spec["type"]
    try:
        if kind == "categorical":
            choices = list(spec["choices"])
            if not choices:
                raise ConfigError(f"{key}: 'choices' is empty")
            return optuna.distributions.CategoricalDistribution(choices)
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if kind == "float":
            return optuna.distributions.FloatDistribution(float(low), float(high), log=log)
        if kind == "int":
            return optuna.distributions.IntDistribution(int(low), int(high), log=log)
    except KeyError as exc:
        raise ConfigError(f"{key}: missing {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ConfigError(f"{key}: {' '.join(str(exc).split())}") from None
    raise ConfigError(f"{key}: unknown type '{kind}' (choose from float, int, categorical)")


@dataclass(frozen=True)
class SearchSpace:
    distributions: dict[str, optuna.distributions.BaseDistribution]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SearchSpace:
        """Build and check the space: every key must name a config value of a compatible type."""
        space = OmegaConf.to_container(cfg.tune.space, resolve=True)
        dists = {path: _distribution(path, spec) for path, spec in _leaves(space).items()}
        if not dists:
            raise ConfigError("tune.space: empty; name at least one config key to search")
        for path, dist in dists.items():
            if OmegaConf.select(cfg, path, default="__missing__") == "__missing__":
                raise ConfigError(f"tune.space.{path}: '{path}' is not a key of the config (strategy '{cfg.strategy.name}')")
            current = OmegaConf.select(cfg, path)
            if isinstance(current, (DictConfig, list)) or (current is not None and not isinstance(current, (int, float, str, bool))):
                raise ConfigError(f"tune.space.{path}: '{path}' is not a single value")
        return cls(dists)

    @property
    def names(self) -> list[str]:
        return list(self.distributions)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample one configuration: config key -> value."""
        values: dict[str, Any] = {}
        for path, d in self.distributions.items():
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                values[path] = trial.suggest_categorical(path, d.choices)
            elif isinstance(d, optuna.distributions.IntDistribution):
                values[path] = trial.suggest_int(path, d.low, d.high, log=d.log)
            else:
                values[path] = trial.suggest_float(path, d.low, d.high, log=d.log)
        return values
