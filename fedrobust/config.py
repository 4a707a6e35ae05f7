"""Typed configuration: Hydra schemas, composition and validation.

The schemas below are registered in Hydra's ConfigStore, so composing the
YAML groups in ``conf/`` against them rejects unknown keys and wrong types.
:func:`validate` then rejects impossible values. Every failure is raised as a
:class:`ConfigError` whose message is one line that names the key.

The ``attack`` and ``tune`` sections are checked next to the code that reads
them (:mod:`fedrobust.evaluation.checks`, :mod:`fedrobust.tuning.checks`);
:mod:`fedrobust.validation` registers those checks here with
:func:`register_check`. This module never imports either package, so a node
can read its task without the evaluation or tuning code. Plug-in strategies
add their schema with :func:`register_strategy_schema`.

A searched architecture is a model like any other: ``model=searched:PATH``
(or ``model.name=``) names a genotype file, set after composing as path keys
are. :func:`resolve_genotype` copies the genotype into ``model.genotype``, so
that a run's saved config holds its architecture; :func:`model_spec` is the
form a node receives, ``searched:`` and the genotype's JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Callable, Mapping
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "CONF_DIR",
    "default_config",
    "load_config",
    "config_from_json",
    "config_to_json",
    "inline_model_overrides",
    "is_searched",
    "model_spec",
    "register_check",
    "register_strategy_schema",
    "resolve_genotype",
    "strategy_names",
    "validate",
]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
MODELS = ("cnn", "resnet18", "resnet34", "mobilenetv2", "vgg16", "resnet8", "vgg7", "mlp", "lenet", "convnet")
# model.name=searched:PATH (a genotype file, fedrobust search-arch) or searched:{...} (the genotype's JSON)
SEARCHED_PREFIX = "searched:"
DEPLOYMENTS = ("centralized", "deep_ensemble", "distributed_iid", "distributed_dirichlet")
STRATEGIES = ("plain", "curvature", "dispersion", "edlcm", "adversarial")  # built in; plug-ins: strategy_names()
ENGINES = ("simulation", "inline")


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = "data"  # null: the data set's standard install locations (mnist, fashion_mnist)
    train_subset: int | None = None  # keep this many training images (stratified, always the same); null: all
    augment: bool = False  # batched random crop (with padding) and horizontal flip
    crop_padding: int = 4
    val_fraction: float = 0.2  # of each node's shard, never augmented


@dataclass
class ModelConfig:
    name: str = "cnn"  # a hand-made model (MODELS), or searched:PATH (a genotype file) or searched:{...}
    # a searched model's genotype as canonical JSON: read from model.name when the config is loaded (and again
    # whenever model.name changes), so that a run's config.yaml holds its architecture, not only a path; null otherwise
    genotype: str | None = None


@dataclass
class DeploymentConfig:
    name: str = "distributed_dirichlet"
    num_nodes: int = 3
    alpha: float = 0.9  # Dirichlet concentration (distributed_dirichlet only)
    partition_seed: int = 123  # fixed independently of train.seed


@dataclass
class StrategyConfig:
    name: str = "plain"


@dataclass
class CurvatureConfig(StrategyConfig):
    name: str = "curvature"
    alpha: float = 1.0
    h: float | None = None  # None: (8/255) * sqrt(input size), see strategies/hessian.py
    every: int = 1  # opt-in lazy regularisation: penalty on 1 batch in `every`, scaled by `every`
    grad: str = "fd"  # fd: four first-order passes (strategies/regulariser.py) | exact: double backpropagation
    clip_grad_norm: float | None = 2.0  # bound on the L2 norm of the weight gradient when a penalty is on; None: unbounded


@dataclass
class DispersionConfig(StrategyConfig):
    name: str = "dispersion"
    beta: float = 0.01
    h: float | None = None
    every: int = 1  # opt-in lazy regularisation: penalty on 1 batch in `every`, scaled by `every`
    grad: str = "fd"  # fd: four first-order passes (strategies/regulariser.py) | exact: double backpropagation
    clip_grad_norm: float | None = 2.0  # bound on the L2 norm of the weight gradient when a penalty is on; None: unbounded


@dataclass
class EDLCMConfig(StrategyConfig):
    name: str = "edlcm"
    alpha: float = 1.0
    beta: float = 0.01
    h: float | None = None
    every: int = 1  # opt-in lazy regularisation: penalty on 1 batch in `every`, scaled by `every`
    grad: str = "fd"  # fd: four first-order passes (strategies/regulariser.py) | exact: double backpropagation
    clip_grad_norm: float | None = 2.0  # bound on the L2 norm of the weight gradient when a penalty is on; None: unbounded


@dataclass
class AdversarialConfig(StrategyConfig):
    name: str = "adversarial"
    attack: str = "pgd"  # pgd | fgsm
    eps: float = 8 / 255
    steps: int = 7
    eps_start: float = 0.1  # the budget starts at eps_start * eps and rises linearly to eps


STRATEGY_SCHEMAS = {
    "plain": StrategyConfig,
    "curvature": CurvatureConfig,
    "dispersion": DispersionConfig,
    "edlcm": EDLCMConfig,
    "adversarial": AdversarialConfig,
}


@dataclass
class OptimizerConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class TrainConfig:
    epochs: int = 40  # total local epochs, split evenly over the rounds
    rounds: int | None = None  # None: 1, or 10 (at most epochs) when the strategy exchanges peers
    batch_size: int = 128
    patience: int = 10  # early stopping on validation loss
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for training (fp16 with a grad scaler); attacks stay fp32
    progress: bool = True


@dataclass
class EngineConfig:
    name: str = "simulation"
    num_cpus: float = 1.0  # per client; torch threads are set to match
    num_gpus: float = 0.0  # per client (fractions share a GPU)
    timeout: float = 0.0  # seconds to wait for replies in a round (0 = no limit)
    on_missing: str = "fail"  # a node that does not reply in time: fail | min_members (finish without it)
    min_members: int = 1  # on_missing=min_members: the fewest members the ensemble may end with
    # simulation: join this Ray cluster (HOST:PORT, "auto", ray://...); None = a private local instance
    ray_address: str | None = None


TRANSFER_ATTACKS = ("cwa", "mifgsm", "pgd")
QUERY_ATTACKS = ("square_linf", "square_l2")
WHITEBOX_ATTACKS = ("fgsm", "bim", "pgd", "apgd")
ATTACK_LOSSES = ("ce", "margin", "dlr")
SPLITS = ("test", "validation")  # attack.split


@dataclass
class AttackConfig:
    eps: float = 8 / 255  # L-inf budget in [0, 1] pixel units
    eps_l2: float = 0.5  # L2 budget for square_l2, pgd_l2, apgd_l2 and apgd_t_l2
    num_samples: int = 1000  # evaluation sample (the whole split if smaller)
    sample_seed: int = 0
    # the held-out images a run is scored on: test (the test set) | validation (the union of the nodes'
    # validation splits: what a study's trials are scored on, so that nothing is selected on the test set)
    split: str = "test"
    batch_size: int = 500
    # surrogate zoo for transfer attacks; None = the dataset's default zoo
    surrogates: list[str] | None = None
    surrogate_epochs: int = 40
    surrogate_seed: int = 1000
    transfer: str = "cwa"  # primary transfer attack -> robust_accuracy.transfer
    transfer_attacks: list[str] = field(default_factory=lambda: list(TRANSFER_ATTACKS))
    transfer_steps: int = 10
    transfer_loss: str = "ce"
    query: str = "square_linf"  # primary query attack -> robust_accuracy.query
    query_attacks: list[str] = field(default_factory=lambda: list(QUERY_ATTACKS))
    queries: int = 500
    p_init: float = 0.8
    square_loss: str = "margin"  # margin | ce
    whitebox: list[str] = field(default_factory=lambda: list(WHITEBOX_ATTACKS))
    whitebox_loss: str = "ce"  # ce | margin | dlr | file:PATH | expr:TEXT | a registered name
    # the files that file:PATH losses were read from when the config was loaded (their expressions replace them
    # as expr:TEXT in transfer_loss/whitebox_loss): provenance only, never read again
    loss_files: dict[str, str] = field(default_factory=dict)
    # where a white-box loss's value or gradient is NaN/inf on an image: error (stop, one line) | ce (cross-entropy
    # stands in on those images, their number recorded)
    nonfinite: str = "error"
    whitebox_steps: int = 10
    apgd_steps: int = 100
    apgd_targets: int = 9  # apgd_t: how many classes after the true one it targets, in turn (AutoAttack: 9)
    restarts: int = 1  # pgd, apgd, apgd_t: runs from fresh random starts, each on the images still robust
    per_member: bool = True  # per-member RA (transfer replay and the primary query attack)
    tsr: bool = True
    tsr_steps: int = 10
    hessian_samples: int = 100
    power_iters: int = 20
    seed: int = 0
    cache_dir: str = ""  # "" = $FEDROBUST_CACHE or ~/.cache/fedrobust


def _paper_space() -> dict[str, Any]:
    """The main paper's search space (Table 1)."""
    return {
        "optimizer": {
            "lr": {"type": "float", "low": 1e-4, "high": 0.4, "log": True},
            "momentum": {"type": "float", "low": 0.8, "high": 0.99},
            "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        },
        "train": {"batch_size": {"type": "categorical", "choices": [32, 64, 128, 256, 512, 1024, 2048]}},
    }


@dataclass
class TuneConfig:
    n_trials: int = 100  # completed trials the study ends with
    population_size: int = 20  # NSGA-II population (the paper: 20 x 5 generations)
    max_concurrent: int = 2  # trials running at once
    seed: int = 0  # NSGA-II sampler seed
    objectives: str = "robustness"  # robustness: max (RA_T, RA_Q) | accuracy: max (val accuracy, min(RA_T, RA_Q))
    max_accuracy_drop: float = 0.05  # constraint: CA >= baseline CA - drop
    baseline_accuracy: float | None = None  # None: train the centralized baseline once per study
    storage: str = ""  # "" = sqlite:///<study_dir>/study.db, or any Optuna RDB URL
    study_name: str = "fedrobust"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 10  # stop when this many trials raised (not counting re-queued or diverged ones)
    # validation images each trial is attacked on, drawn with attack.sample_seed from the union of the
    # nodes' validation splits; None: attack.num_samples (the whole union if it is smaller)
    selection: int | None = None
    # config key -> {type: float|int|categorical, low, high, log, choices}; nested by group
    space: dict[str, Any] = field(default_factory=_paper_space)


@dataclass
class RayConfig:
    address: str | None = None  # None: a local Ray instance; "auto" or ray://host:port for a cluster


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    evaluate: bool = False  # evaluate the ensemble at the end of training
    run_dir: str | None = None
    tune: TuneConfig = field(default_factory=TuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    study_dir: str | None = None  # fedrobust tune: where the study, its trials and reports live


_GROUP_SCHEMAS = {
    "data": DataConfig,
    "model": ModelConfig,
    "deployment": DeploymentConfig,
    "strategy": StrategyConfig,
    "engine": EngineConfig,
    "attack": AttackConfig,
    "tune": TuneConfig,
}


def _register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in _GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    for name, schema in STRATEGY_SCHEMAS.items():
        if name != "plain":
            cs.store(group="strategy", name=f"base_{name}", node=schema)


_register_schemas()


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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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
        return ConfigError(_one_line(msg))
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OmegaConfBaseException):
        return _translate(cause)
    msg = str(exc)
    m = re.search(r"Key '([^']+)' is not in struct", msg) or re.search(
        r"Could not override '([^']+)'", msg
    )
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    if m and not first.startswith(m.group(1)):
        return ConfigError(f"{m.group(1)}: {_one_line(first)}")
    return ConfigError(_one_line(first))


# Keys whose values are file-system paths: they bypass Hydra's override grammar, so any name the file
# system allows (spaces, accents, quotes, parentheses) works unquoted.
PATH_KEYS = ("run_dir", "study_dir", "data.root", "attack.cache_dir")
_NULLABLE_PATHS = ("run_dir", "study_dir", "data.root")


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]  # quoted for Hydra, as its grammar would require
    return value


def _names_searched_model(key: str, value: str) -> bool:
    """``model=searched:...`` or ``model.name=searched:...``: Hydra has no group option for the first, and
    its grammar takes neither an arbitrary path nor JSON, so both are set after composing, as paths are."""
    return key.lstrip("+") in ("model", "model.name") and is_searched(_unquoted(value))


def _split_path_overrides(overrides: list[str]) -> tuple[dict[str, str | None], list[str]]:
    paths: dict[str, str | None] = {}
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and _names_searched_model(key, value):
            paths["model.name"] = _unquoted(value)
        elif sep and key.lstrip("+") in PATH_KEYS:
            value = _unquoted(value)
            key = key.lstrip("+")
            paths[key] = None if key in _NULLABLE_PATHS and value in ("", "null") else value
        else:
            rest.append(item)
    return paths, rest


def _check_syntax(overrides: list[str]) -> None:
    """Parse each override alone, so that an error names the one at fault and says how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except HydraException as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith(("See https", "Error parsing"))]
            reason = "an unexpected character" if not lines or "LexerNoViableAlt" in lines[0] else _one_line(lines[0])
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"{item}: not an override (expected key=value)") from None
            quote = "'" if '"' in value else '"'
            raise ConfigError(f"{item}: Hydra cannot parse this value ({reason}); quote it, e.g. "
                              f"{key}={quote}{value}{quote} (with shell quotes around the whole override)") from None


def inline_model_overrides(overrides: list[str] | tuple[str, ...], cfg: DictConfig) -> list[str]:
    """``overrides`` with a searched model's genotype file replaced by its JSON (``cfg``'s), for a process
    on another machine that cannot read the file (a deployment's ServerApp)."""
    kept = [o for o in overrides if not _names_searched_model(*o.partition("=")[::2])]
    if len(kept) == len(overrides):
        return list(overrides)
    return [*kept, f"model.name={model_spec(cfg)}"]


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides and validate the result."""
    paths, overrides = _split_path_overrides(list(overrides))
    for item in overrides:
        if item.partition("=")[0].lstrip("+~") == "model.genotype":
            raise ConfigError("model.genotype: read from model.name; name the genotype file there, "
                              "e.g. model=searched:searches/fmnist/genotype.json")
    _check_syntax(overrides)
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


PEER_STRATEGIES = ["dispersion", "edlcm"]  # plug-ins whose needs_peers is true join them
PEER_ROUNDS = 10


def resolve_defaults(cfg: DictConfig) -> None:
    """Fill the values whose default depends on other keys, so that the saved config is concrete."""
    if cfg.train.rounds is None:
        rounds = PEER_ROUNDS if cfg.strategy.name in PEER_STRATEGIES else 1
        cfg.train.rounds = max(1, min(rounds, cfg.train.epochs))


def is_searched(name: object) -> bool:
    """Whether a model name names a searched model: ``searched:PATH`` or ``searched:{...}``."""
    return isinstance(name, str) and name.startswith(SEARCHED_PREFIX)


def resolve_genotype(cfg: DictConfig, *, reread: bool = False) -> None:
    """Fill ``model.genotype`` from ``model.name``: null for a hand-made model; for a searched one, its
    genotype's canonical JSON, read from the file (or the JSON) that ``model.name`` names when ``reread``
    or when the config holds none yet. A genotype that cannot be read is a ConfigError naming model.name.
    (This imports torch, for a searched model only.)"""
    if not is_searched(cfg.model.name):
        cfg.model.genotype = None
        return
    if cfg.model.get("genotype") is not None and not reread:
        return  # the run's own copy: the file may have changed or gone since
    from .models import read_genotype
    from .nas import GenotypeError

    try:
        cfg.model.genotype = read_genotype(cfg.model.name).to_json()
    except GenotypeError as exc:
        raise ConfigError(f"model.name: {_one_line(exc)}") from None


LOSS_KEYS = ("transfer_loss", "whitebox_loss")


def resolve_loss_files(cfg: DictConfig) -> None:
    """Read each ``file:PATH`` attack loss once, now: its expression replaces it as ``expr:TEXT`` and the path
    goes to ``attack.loss_files`` (provenance). Trials, nodes and caches then use the expression, and a file
    changed or gone later changes nothing. A file that cannot be read is a ConfigError naming the key.
    (This imports torch, for a ``file:`` loss only.)"""
    attack = cfg.get("attack")
    if attack is None:
        return
    for key in LOSS_KEYS:
        value = attack.get(key)
        if not (isinstance(value, str) and value.startswith("file:")):
            continue
        from .attacks.expression import LossExpressionError, load_loss_file

        path = value[len("file:"):]
        if not path:
            raise ConfigError(f"attack.{key}: file: needs a path, e.g. file:losses/best.json")
        try:
            text = load_loss_file(path).text
        except LossExpressionError as exc:
            raise ConfigError(f"attack.{key}: {_one_line(str(exc))}") from None
        attack[key] = "expr:" + text
        files = dict(attack.get("loss_files") or {})
        files[key] = path
        with open_dict(attack):
            attack.loss_files = files


def model_spec(cfg: DictConfig) -> str:
    """The run's model as :func:`fedrobust.models.build_model` takes it and a node receives it: a hand-made
    model's name, or ``searched:`` and the genotype's JSON (a node never reads a file)."""
    if is_searched(cfg.model.name):
        return SEARCHED_PREFIX + str(cfg.model.genotype)
    return str(cfg.model.name)


def _check_model(m: DictConfig) -> None:
    if not is_searched(m.name):
        _check(m.name in MODELS, "model.name",
               f"unknown model '{m.name}' (choose from {', '.join(MODELS)}, or searched:PATH of a genotype file)")
        _check(m.get("genotype") is None, "model.genotype",
               "only a searched model has one (model.name=searched:PATH); must be null")
        return
    from .models import read_genotype
    from .nas import GenotypeError, parse_genotype

    _check(isinstance(m.get("genotype"), str), "model.genotype", "missing: a searched model's config holds its genotype")
    try:
        held = parse_genotype(m.genotype)
    except GenotypeError as exc:
        raise ConfigError(f"model.genotype: {_one_line(exc)}") from None
    if m.name[len(SEARCHED_PREFIX):].lstrip().startswith("{"):  # inline: the two must agree
        try:
            named = read_genotype(m.name)
        except GenotypeError as exc:
            raise ConfigError(f"model.name: {_one_line(exc)}") from None
        _check(named == held, "model.genotype", "differs from the genotype that model.name holds")


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: DictConfig, *, sections: bool = True) -> None:
    """Reject values that are well-typed but impossible: the run's own keys here, then (``sections``)
    the sections whose checks were registered with :func:`register_check` (attack, tune)."""
    _check(cfg.data.name in DATASETS, "data.name", f"unknown dataset '{cfg.data.name}' (choose from {', '.join(DATASETS)})")
    _check_model(cfg.model)
    _check(cfg.deployment.name in DEPLOYMENTS, "deployment.name", f"unknown deployment '{cfg.deployment.name}' (choose from {', '.join(DEPLOYMENTS)})")
    _check(cfg.strategy.name in STRATEGY_SCHEMAS, "strategy.name",
           f"unknown strategy '{cfg.strategy.name}' (choose from {', '.join(strategy_names())})")
    _check(cfg.engine.name in ENGINES, "engine.name", f"unknown engine '{cfg.engine.name}' (choose from {', '.join(ENGINES)})")
    _check(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.data.get("train_subset") is not None:
        _check(cfg.data.train_subset >= 10, "data.train_subset", f"must be >= 10 or null, got {cfg.data.train_subset}")
    _check(cfg.data.crop_padding >= 0, "data.crop_padding", f"must be >= 0, got {cfg.data.crop_padding}")
    _check(cfg.deployment.num_nodes >= 1, "deployment.num_nodes", f"must be >= 1, got {cfg.deployment.num_nodes}")
    _check(cfg.deployment.alpha > 0, "deployment.alpha", f"must be > 0, got {cfg.deployment.alpha}")
    _check(0 < cfg.optimizer.lr < math.inf, "optimizer.lr", f"must be > 0 and finite, got {cfg.optimizer.lr}")
    _check(0.0 <= cfg.optimizer.momentum < 1.0, "optimizer.momentum", f"must be in [0, 1), got {cfg.optimizer.momentum}")
    _check(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {cfg.optimizer.weight_decay}")
    _check(cfg.train.epochs >= 1, "train.epochs", f"must be >= 1, got {cfg.train.epochs}")
    _check(cfg.train.rounds >= 1, "train.rounds", f"must be >= 1, got {cfg.train.rounds}")
    _check(cfg.train.rounds <= cfg.train.epochs, "train.rounds", f"must be <= train.epochs ({cfg.train.epochs}), got {cfg.train.rounds}")
    _check(cfg.train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {cfg.train.batch_size}")
    _check(cfg.train.patience >= 1, "train.patience", f"must be >= 1, got {cfg.train.patience}")
    _check(cfg.train.seed >= 0, "train.seed", f"must be >= 0, got {cfg.train.seed}")
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.train.device) is not None,
        "train.device",
        f"must be auto, cpu, cuda, cuda:N or mps, got '{cfg.train.device}'",
    )
    _check(cfg.train.precision in ("fp32", "bf16", "fp16"), "train.precision",
           f"unknown value '{cfg.train.precision}' (choose from fp32, bf16, fp16)")
    _check(cfg.engine.num_cpus > 0, "engine.num_cpus", f"must be > 0, got {cfg.engine.num_cpus}")
    _check(cfg.engine.num_gpus >= 0, "engine.num_gpus", f"must be >= 0, got {cfg.engine.num_gpus}")
    _check(cfg.engine.timeout >= 0, "engine.timeout", f"must be >= 0, got {cfg.engine.timeout}")
    _check(cfg.engine.on_missing in ("fail", "min_members"), "engine.on_missing",
           f"unknown value '{cfg.engine.on_missing}' (choose from fail, min_members)")
    _check(cfg.engine.ray_address is None or str(cfg.engine.ray_address).strip() != "", "engine.ray_address",
           "must be HOST:PORT, auto or ray://HOST:PORT (or null for a private local Ray instance)")
    _check(cfg.engine.ray_address is None or cfg.engine.name == "simulation", "engine.ray_address",
           f"only the simulation engine runs on Ray (engine={cfg.engine.name})")
    _check(cfg.engine.min_members >= 1, "engine.min_members", f"must be >= 1, got {cfg.engine.min_members}")
    validate_strategy(cfg.strategy)
    if sections:
        for check in _SECTION_CHECKS.values():
            check(cfg)


# section -> its check, registered by fedrobust.validation (see the module docstring)
_SECTION_CHECKS: dict[str, Callable[[DictConfig], None]] = {}


def register_check(section: str, check: Callable[[DictConfig], None]) -> None:
    """Have :func:`validate` (so :func:`load_config`) also run ``check(cfg)``, which raises a
    :class:`ConfigError` naming the key of ``section`` at fault. Registering a section again replaces it."""
    _SECTION_CHECKS[section] = check


def validate_strategy(st: Mapping[str, Any], prefix: str = "strategy") -> None:
    """Range checks of the strategy keys that built-in strategies share (a plug-in's keys of the same
    names are held to them too); ``prefix`` names the keys in the message."""
    def get(key: str) -> Any:
        return st[key] if key in st else None

    for key in ("alpha", "beta"):
        if get(key) is not None:
            _check(get(key) >= 0, f"{prefix}.{key}", f"must be >= 0, got {get(key)}")
    if get("every") is not None:
        _check(get("every") >= 1, f"{prefix}.every", f"must be >= 1, got {get('every')}")
    if get("grad") is not None:
        _check(get("grad") in ("fd", "exact"), f"{prefix}.grad", f"unknown value '{get('grad')}' (choose from fd, exact)")
    if get("clip_grad_norm") is not None:
        _check(get("clip_grad_norm") > 0, f"{prefix}.clip_grad_norm", f"must be > 0 or null, got {get('clip_grad_norm')}")
    if get("h") is not None:
        _check(get("h") > 0, f"{prefix}.h", f"must be > 0, got {get('h')}")
    if get("name") == "adversarial":
        _check(st["attack"] in ("pgd", "fgsm"), f"{prefix}.attack", f"unknown value '{st['attack']}' (choose from pgd, fgsm)")
        _check(st["eps"] > 0, f"{prefix}.eps", f"must be > 0, got {st['eps']}")
        _check(st["steps"] >= 1, f"{prefix}.steps", f"must be >= 1, got {st['steps']}")
        _check(0 < st["eps_start"] <= 1, f"{prefix}.eps_start", f"must be in (0, 1], got {st['eps_start']}")


def apply_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Apply ``key=value`` overrides to a composed config (no group switches), then validate."""
    reread = False
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"{item}: expected key=value")
            key, _, value = item.partition("=")
            if _names_searched_model(key, value):  # any path or JSON, as load_config takes it
                cfg = OmegaConf.merge(cfg, {"model": {"name": _unquoted(value)}})
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
