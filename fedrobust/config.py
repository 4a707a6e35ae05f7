"""The whole config: its sections composed, loaded from ``conf/`` with overrides, and checked.

Each section's schema (a dataclass with its defaults), and its checks, live
next to the code that reads it:

========================  ===============================================
``data``                  :mod:`fedrobust.data_settings`
``model``                 :mod:`fedrobust.models.settings`
``deployment``            :mod:`fedrobust.deployment_settings`
``strategy``              :mod:`strategies.settings` (plug-ins add theirs)
``optimizer``, ``train``  :mod:`fedrobust.training_settings`
``engine``                :mod:`fedrobust.engine_settings`
``ensemble``              :mod:`fedrobust.ensemble_settings`
``attack``                :mod:`fedrobust.evaluation.settings`; the checks
                          that need the stage registry are
                          :mod:`fedrobust.evaluation.checks`
``tune``, ``ray``         :mod:`fedrobust.tuning.settings`
========================  ===============================================

This module composes them into :class:`Config`, registered in Hydra's
ConfigStore so that composing the YAML groups of ``conf/`` rejects unknown
keys and wrong types, and :func:`validate` dispatches to each section's
checks, then to those registered with :func:`register_check` (the attack
section's, by :mod:`fedrobust.validation`). Every failure is a one-line
:class:`~fedrobust.errors.ConfigError` that names the key. Nothing here
imports torch, the evaluation or the tuner; a node never imports it (its task
is checked by :func:`fedrobust.task.check_task`). The configuration
reference in the docs is generated from these schemas
(``docs/gen_config_reference.py``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conf import CONF_DIR
from strategies.settings import (PEER_ROUNDS, PEER_STRATEGIES, STRATEGY_SCHEMAS, StrategyConfig, check_strategy,
                                 strategy_names)

from .data_settings import DataConfig, check_data
from .deployment_settings import DeploymentConfig, check_deployment
from .engine_settings import EngineConfig, check_engine
from .ensemble_settings import EnsembleConfig, check_ensemble
from .errors import ConfigError, one_line
from .evaluation.settings import AttackConfig, resolve_loss_files
from .models.settings import ModelConfig, check_model, resolve_genotype
from .overrides import check_syntax, names_searched_model, split_path_overrides, unquoted
from .training_settings import OptimizerConfig, TrainConfig, check_optimizer, check_train
from .tuning.settings import RayConfig, TuneConfig, check_tune

__all__ = ["SECTIONS", "Config", "apply_overrides", "config_from_json", "config_to_json", "default_config",
           "load_config", "register_check", "resolve_defaults", "structured_base", "validate"]


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    evaluate: bool = False  # evaluate the ensemble at the end of training
    run_dir: str | None = None  # where a run is written; null: runs/<timestamp>
    tune: TuneConfig = field(default_factory=TuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    study_dir: str | None = None  # fedrobust tune: where the study, its trials and reports live


# section -> (its schema, its check); the order is the order validate() checks them in
SECTIONS: dict[str, tuple[type, Callable[[DictConfig], None]]] = {
    "data": (DataConfig, check_data),
    "model": (ModelConfig, check_model),
    "deployment": (DeploymentConfig, check_deployment),
    "strategy": (StrategyConfig, check_strategy),
    "optimizer": (OptimizerConfig, check_optimizer),
    "train": (TrainConfig, check_train),
    "engine": (EngineConfig, check_engine),
    "ensemble": (EnsembleConfig, check_ensemble),
    "attack": (AttackConfig, lambda cfg: None),  # its checks need the stage registry: fedrobust.validation
    "tune": (TuneConfig, check_tune),
    "ray": (RayConfig, lambda cfg: None),
}
_GROUPS = ("data", "model", "deployment", "strategy", "engine", "attack", "tune")  # the YAML groups of conf/


def _register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group in _GROUPS:
        cs.store(group=group, name=f"base_{group}", node=SECTIONS[group][0])
    for name, schema in STRATEGY_SCHEMAS.items():
        if name != "plain":
            cs.store(group="strategy", name=f"base_{name}", node=schema)


_register_schemas()


def _translate(exc: Exception) -> ConfigError:
    """Turn a Hydra/OmegaConf composition error into a one-line ConfigError."""
    if isinstance(exc, MissingConfigException):
        m = re.search(r"Could not find '([^/']+)/([^']+)'", str(exc))
        if m:
            group, value = m.groups()
            options = ", ".join(o for o in exc.options or [] if not o.startswith("base_"))
            return ConfigError(f"{group}: unknown value '{value}' (choose from {options})")
    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None)
        msg = str(exc).splitlines()[0]
        if key:
            return ConfigError(f"{key}: {msg}")
        return ConfigError(one_line(msg))
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OmegaConfBaseException):
        return _translate(cause)
    msg = str(exc)
    m = re.search(r"Key '([^']+)' is not in struct", msg) or re.search(
        r"Could not override '([^']+)'", msg
    )
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    if m and not first.startswith(m.group(1)):
        return ConfigError(f"{m.group(1)}: {one_line(first)}")
    return ConfigError(one_line(first))


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides and validate the result."""
    paths, overrides = split_path_overrides(list(overrides))
    for item in overrides:
        if item.partition("=")[0].lstrip("+~") == "model.genotype":
            raise ConfigError("model.genotype: read from model.name; name the genotype file there, "
                              "e.g. model=searched:searches/fmnist/genotype.json")
    check_syntax(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise _translate(exc) from None
    finally:
        GlobalHydra.instance().clear()
    for key, value in paths.items():
        if value is not None and "${" in value:
            raise ConfigError(f"{key}: '${{' is not allowed in a path (OmegaConf would read it as an interpolation)")
        OmegaConf.update(cfg, key, value, merge=False)
    resolve_defaults(cfg)
    resolve_genotype(cfg, reread=True)
    resolve_loss_files(cfg)
    validate(cfg)
    return cfg


@functools.cache
def default_config() -> DictConfig:
    """``load_config([])``, read-only, composed once per process: every run's HParams are the keys
    that differ from it, and Hydra takes about 0.3 s to compose it."""
    cfg = load_config([])
    OmegaConf.set_readonly(cfg, True)
    return cfg


def resolve_defaults(cfg: DictConfig) -> None:
    """Fill the values whose default depends on other keys, so that the saved config is concrete."""
    if cfg.train.rounds is None:
        rounds = PEER_ROUNDS if cfg.strategy.name in PEER_STRATEGIES else 1
        cfg.train.rounds = max(1, min(rounds, cfg.train.epochs))


def validate(cfg: DictConfig, *, sections: bool = True) -> None:
    """Reject values that are well-typed but impossible: each section's own checks (:data:`SECTIONS`), then
    (``sections``) the checks registered with :func:`register_check` (the attack section's)."""
    for _, check in SECTIONS.values():
        check(cfg)
    if sections:
        for check in _REGISTERED.values():
            check(cfg)


# section -> its check, registered by fedrobust.validation (see the module docstring)
_REGISTERED: dict[str, Callable[[DictConfig], None]] = {}


def register_check(section: str, check: Callable[[DictConfig], None]) -> None:
    """Have :func:`validate` (so :func:`load_config`) also run ``check(cfg)``, which raises a
    :class:`ConfigError` naming the key of ``section`` at fault. Registering a section again replaces it."""
    _REGISTERED[section] = check


def apply_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Apply ``key=value`` overrides to a composed config (no group switches), then validate."""
    reread = False
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"{item}: expected key=value")
            key, _, value = item.partition("=")
            if names_searched_model(key, value):  # any path or JSON, as load_config takes it
                cfg = OmegaConf.merge(cfg, {"model": {"name": unquoted(value)}})
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
            reread = reread or key.lstrip("+") in ("model", "model.name")
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None
    resolve_genotype(cfg, reread=reread)  # a run's saved genotype stands unless model.name is overridden
    resolve_loss_files(cfg)
    validate(cfg)
    return cfg


def structured_base(strategy: str = "plain") -> DictConfig:
    """The typed default config, with the schema of ``strategy`` in ``strategy``."""
    base = OmegaConf.structured(Config)
    schema = STRATEGY_SCHEMAS.get(strategy)
    if schema is None:
        raise ConfigError(f"strategy.name: unknown strategy '{strategy}' (choose from {', '.join(strategy_names())}; "
                          "a plug-in strategy's package must be installed)")
    if schema is not StrategyConfig:
        base = OmegaConf.merge(base, {"strategy": OmegaConf.structured(schema)})
    return base


def config_to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def config_from_json(text: str) -> DictConfig:
    """Rebuild a typed, validated config from :func:`config_to_json` output."""
    data: dict[str, Any] = json.loads(text)
    try:
        cfg = OmegaConf.merge(structured_base(data.get("strategy", {}).get("name", "plain")), data)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None
    validate(cfg)
    return cfg
