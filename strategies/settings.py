"""The ``strategy`` config section: which strategy trains the members, and its keys.

Each built-in strategy's keys are a dataclass here (its defaults, with the
maths in ``DESIGN.md`` and the docs' Strategies page); a plug-in strategy's
are the fields of its ``Config`` dataclass, made a schema by
:func:`register_strategy_schema`. The schemas are stored in Hydra's
ConfigStore under group ``strategy``, so ``strategy=<name>`` composes and
``strategy.<key>=...`` is type-checked. :func:`check_strategy` holds the
range checks, built-in keys and plug-ins' keys of the same names alike.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from fedrobust.errors import ConfigError, check

__all__ = ["PEER_ROUNDS", "PEER_STRATEGIES", "STRATEGY_SCHEMAS", "AdversarialConfig", "CurvatureConfig",
           "DispersionConfig", "EDLCMConfig", "StrategyConfig", "check_strategy", "check_strategy_keys",
           "register_strategy_schema", "strategy_names"]


@dataclass
class StrategyConfig:
    name: str = "plain"  # plain | curvature | dispersion | edlcm | adversarial | a plug-in's name


@dataclass
class CurvatureConfig(StrategyConfig):
    name: str = "curvature"
    alpha: float = 1.0  # α: weight of the curvature penalty ‖∇ₓce(x+h·g) − ∇ₓce(x)‖² (EDLCM eq. 9)
    h: float | None = None  # finite-difference step; None: (8/255) * sqrt(input size), see strategies/hessian.py
    every: int = 1  # opt-in lazy regularisation: penalty on 1 batch in `every`, scaled by `every`
    grad: str = "fd"  # fd: four first-order passes (strategies/regulariser.py) | exact: double backpropagation
    clip_grad_norm: float | None = 2.0  # bound on the L2 norm of the weight gradient when a penalty is on; None: unbounded


@dataclass
class DispersionConfig(StrategyConfig):
    name: str = "dispersion"
    beta: float = 0.01  # β: weight of the dispersion term Σ_{i<j} cos(Hg_i, Hg_j) between members (EDLCM eq. 10)
    h: float | None = None  # finite-difference step h along g; None: (8/255) * sqrt(input size)
    every: int = 1  # opt-in lazy regularisation: penalty on 1 batch in `every`, scaled by `every`
    grad: str = "fd"  # fd: four first-order passes (strategies/regulariser.py) | exact: double backpropagation
    clip_grad_norm: float | None = 2.0  # bound on the L2 norm of the weight gradient when a penalty is on; None: unbounded


@dataclass
class EDLCMConfig(StrategyConfig):
    name: str = "edlcm"
    alpha: float = 1.0  # α: weight of the curvature penalty ‖∇ₓce(x+h·g) − ∇ₓce(x)‖² (EDLCM eq. 9)
    beta: float = 0.01  # β: weight of the dispersion term Σ_{i<j} cos(Hg_i, Hg_j) between members (EDLCM eq. 10)
    h: float | None = None  # finite-difference step h along g; None: (8/255) * sqrt(input size)
    every: int = 1  # opt-in lazy regularisation: penalty on 1 batch in `every`, scaled by `every`
    grad: str = "fd"  # fd: four first-order passes (strategies/regulariser.py) | exact: double backpropagation
    clip_grad_norm: float | None = 2.0  # bound on the L2 norm of the weight gradient when a penalty is on; None: unbounded


@dataclass
class AdversarialConfig(StrategyConfig):
    name: str = "adversarial"
    attack: str = "pgd"  # the training attack: pgd | fgsm
    eps: float = 8 / 255  # L-inf budget of the training attack, in [0, 1] pixel units
    steps: int = 7  # PGD steps of the training attack
    eps_start: float = 0.1  # the budget starts at eps_start * eps and rises linearly to eps


STRATEGY_SCHEMAS: dict[str, type] = {
    "plain": StrategyConfig,
    "curvature": CurvatureConfig,
    "dispersion": DispersionConfig,
    "edlcm": EDLCMConfig,
    "adversarial": AdversarialConfig,
}

PEER_STRATEGIES = ["dispersion", "edlcm"]  # plug-ins whose needs_peers is true join them
PEER_ROUNDS = 10  # train.rounds=null: the rounds of a strategy that exchanges peers (at most train.epochs)


def strategy_names() -> tuple[str, ...]:
    """The strategies a config may name: the built-in ones, then the plug-ins loaded in this process."""
    return tuple(STRATEGY_SCHEMAS)


def register_strategy_schema(name: str, params: type | None = None, *, needs_peers: bool = False) -> type:
    """Make ``strategy=<name>`` a config option whose keys are the fields of the dataclass ``params``.

    The schema is a :class:`StrategyConfig` with ``name`` defaulting to
    ``name`` and ``params``' fields (typed, with their defaults). It is stored
    in Hydra's ConfigStore under group ``strategy``, so ``strategy=<name>``
    composes without a YAML file and ``strategy.<field>=...`` is type-checked.
    ``needs_peers`` makes ``train.rounds`` default to the peer strategies'.
    Registering the same name again replaces it.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"strategy.name: '{name}' is not a valid strategy name (letters, digits and _)")
    fields: list[tuple[str, Any, Any]] = [("name", str, dataclasses.field(default=name))]
    if params is not None:
        if not dataclasses.is_dataclass(params):
            raise ConfigError(f"strategy.{name}: its Config must be a dataclass, got {params!r}")
        hints = typing.get_type_hints(params)
        for f in dataclasses.fields(params):
            if f.name == "name":
                continue
            default = (dataclasses.field(default_factory=f.default_factory)
                       if f.default_factory is not dataclasses.MISSING else dataclasses.field(default=f.default))
            fields.append((f.name, hints[f.name], default))
    schema = dataclasses.make_dataclass(f"{name.title().replace('_', '')}StrategyConfig", fields, bases=(StrategyConfig,))
    STRATEGY_SCHEMAS[name] = schema
    cs = ConfigStore.instance()
    cs.store(group="strategy", name=f"base_{name}", node=schema)
    cs.store(group="strategy", name=name, node=schema)
    if needs_peers and name not in PEER_STRATEGIES:
        PEER_STRATEGIES.append(name)
    return schema


def check_strategy_keys(st: Mapping[str, Any], prefix: str = "strategy") -> None:
    """Range checks of the strategy keys that built-in strategies share (a plug-in's keys of the same
    names are held to them too); ``prefix`` names the keys in the message."""
    def get(key: str) -> Any:
        return st[key] if key in st else None

    for key in ("alpha", "beta"):
        if get(key) is not None:
            check(get(key) >= 0, f"{prefix}.{key}", f"must be >= 0, got {get(key)}")
    if get("every") is not None:
        check(get("every") >= 1, f"{prefix}.every", f"must be >= 1, got {get('every')}")
    if get("grad") is not None:
        check(get("grad") in ("fd", "exact"), f"{prefix}.grad", f"unknown value '{get('grad')}' (choose from fd, exact)")
    if get("clip_grad_norm") is not None:
        check(get("clip_grad_norm") > 0, f"{prefix}.clip_grad_norm", f"must be > 0 or null, got {get('clip_grad_norm')}")
    if get("h") is not None:
        check(get("h") > 0, f"{prefix}.h", f"must be > 0, got {get('h')}")
    if get("name") == "adversarial":
        check(st["attack"] in ("pgd", "fgsm"), f"{prefix}.attack", f"unknown value '{st['attack']}' (choose from pgd, fgsm)")
        check(st["eps"] > 0, f"{prefix}.eps", f"must be > 0, got {st['eps']}")
        check(st["steps"] >= 1, f"{prefix}.steps", f"must be >= 1, got {st['steps']}")
        check(0 < st["eps_start"] <= 1, f"{prefix}.eps_start", f"must be in (0, 1], got {st['eps_start']}")


def check_strategy(cfg: DictConfig) -> None:
    check(cfg.strategy.name in STRATEGY_SCHEMAS, "strategy.name",
          f"unknown strategy '{cfg.strategy.name}' (choose from {', '.join(strategy_names())})")
    check_strategy_keys(cfg.strategy)
