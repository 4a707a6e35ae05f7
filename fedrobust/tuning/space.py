"""The search space: config keys and their Optuna distributions.

``tune.space`` nests by config group, e.g. ``{optimizer: {lr: {type: float,
low: 1e-4, high: 0.4, log: true}}}``; any key of the composed config can be
searched, strategy hyperparameters included
(``+tune.space.strategy.alpha={type:float,low:0.1,high:10,log:true}``).

``model.name`` may choose among hand-made and searched models
(``'tune.space.model.name={type:categorical,choices:[cnn,"searched:PATH"]}'``):
each genotype file is read once, when the space is built, and a trial is
sent its genotype with the name (:meth:`SearchSpace.config_values`), so that
it reads no file wherever it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, one_line
from ..models.settings import is_searched

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
        raise ConfigError(f"{key}: {one_line(exc)}") from None
    raise ConfigError(f"{key}: unknown type '{kind}' (choose from float, int, categorical)")


def _genotypes(dists: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, str]:
    """Each searched ``model.name`` choice -> its genotype's canonical JSON, read now."""
    d = dists.get("model.name")
    names = [c for c in getattr(d, "choices", ()) if is_searched(c)]
    if not names:
        return {}
    from ..models import read_genotype
    from ..nas import GenotypeError

    out = {}
    for name in names:
        try:
            out[name] = read_genotype(name).to_json()
        except GenotypeError as exc:
            raise ConfigError(f"tune.space.model.name: {one_line(exc)}") from None
    return out


@dataclass(frozen=True)
class SearchSpace:
    distributions: dict[str, optuna.distributions.BaseDistribution]
    genotypes: dict[str, str] = field(default_factory=dict)  # searched model.name choice -> its genotype's JSON

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
        if "model.genotype" in dists:
            raise ConfigError("tune.space.model.genotype: searched through model.name (e.g. choices "
                              "[cnn, \"searched:PATH\"]), whose genotype files are read for it")
        return cls(dists, _genotypes(dists))

    def config_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """A trial's config keys: ``values`` and, for a searched model, its genotype (``model.genotype``)."""
        name = values.get("model.name")
        if name in self.genotypes:
            return {**values, "model.genotype": self.genotypes[name]}
        return dict(values)

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
