"""The ``model`` config section: a hand-made model's name, or a searched architecture's genotype.

A searched architecture is a model like any other: ``model=searched:PATH``
(or ``model.name=``) names a genotype file, set after composing as path keys
are (:mod:`fedrobust.overrides`). :func:`resolve_genotype` copies the
genotype into ``model.genotype``, so that a run's saved config holds its
architecture; :func:`model_spec` is the form a node receives, ``searched:``
and the genotype's JSON. Reading a genotype imports torch (:mod:`fedrobust.nas`),
for a searched model only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from ..errors import ConfigError, check, one_line

if TYPE_CHECKING:
    from ..nas import Genotype

__all__ = ["MODELS", "SEARCHED_PREFIX", "ModelConfig", "check_model", "is_searched", "model_spec", "read_genotype",
           "resolve_genotype"]

# the hand-made models (fedrobust.models.zoo.MODEL_BUILDERS builds them)
MODELS = ("cnn", "resnet18", "resnet34", "mobilenetv2", "vgg16", "resnet8", "vgg7", "mlp", "lenet", "convnet")
# model.name=searched:PATH (a genotype file, fedrobust search-arch) or searched:{...} (the genotype's JSON)
SEARCHED_PREFIX = "searched:"


@dataclass
class ModelConfig:
    name: str = "cnn"  # a hand-made model (cnn, lenet, resnet18, ...), or searched:PATH (a genotype file) or searched:{...}
    # a searched model's genotype as canonical JSON: read from model.name when the config is loaded (and again
    # whenever model.name changes), so that a run's config.yaml holds its architecture, not only a path; null otherwise
    genotype: str | None = None


def is_searched(name: object) -> bool:
    """Whether a model name names a searched model: ``searched:PATH`` or ``searched:{...}``."""
    return isinstance(name, str) and name.startswith(SEARCHED_PREFIX)


@functools.lru_cache(maxsize=32)
def _parsed(text: str) -> Genotype:
    from ..nas.genotype import parse_genotype

    return parse_genotype(text)


def read_genotype(name: str) -> Genotype:
    """The genotype of a searched model's name: ``searched:{...}`` holds it, ``searched:PATH`` names its
    file (read now: a path that starts with ``{`` is written ``./{...}``)."""
    from ..nas.genotype import GenotypeError, load_genotype

    if not is_searched(name):
        raise GenotypeError(f"'{name:.60}' is not a searched model (searched:PATH or searched:{{...}})")
    spec = name[len(SEARCHED_PREFIX):]
    if spec.lstrip().startswith("{"):
        return _parsed(spec)
    if not spec:
        raise GenotypeError("searched: needs a genotype file, e.g. searched:searches/fmnist/genotype.json")
    return load_genotype(spec)


def resolve_genotype(cfg: DictConfig, *, reread: bool = False) -> None:
    """Fill ``model.genotype`` from ``model.name``: null for a hand-made model; for a searched one, its
    genotype's canonical JSON, read from the file (or the JSON) that ``model.name`` names when ``reread``
    or when the config holds none yet. A genotype that cannot be read is a ConfigError naming model.name."""
    if not is_searched(cfg.model.name):
        cfg.model.genotype = None
        return
    if cfg.model.get("genotype") is not None and not reread:
        return  # the run's own copy: the file may have changed or gone since
    from ..nas.genotype import GenotypeError

    try:
        cfg.model.genotype = read_genotype(cfg.model.name).to_json()
    except GenotypeError as exc:
        raise ConfigError(f"model.name: {one_line(exc)}") from None


def model_spec(cfg: DictConfig) -> str:
    """The run's model as :func:`fedrobust.models.build_model` takes it and a node receives it: a hand-made
    model's name, or ``searched:`` and the genotype's JSON (a node never reads a file)."""
    if is_searched(cfg.model.name):
        return SEARCHED_PREFIX + str(cfg.model.genotype)
    return str(cfg.model.name)


def check_model(cfg: DictConfig) -> None:
    m = cfg.model
    if not is_searched(m.name):
        check(m.name in MODELS, "model.name",
              f"unknown model '{m.name}' (choose from {', '.join(MODELS)}, or searched:PATH of a genotype file)")
        check(m.get("genotype") is None, "model.genotype",
              "only a searched model has one (model.name=searched:PATH); must be null")
        return
    from ..nas.genotype import GenotypeError, parse_genotype

    check(isinstance(m.get("genotype"), str), "model.genotype", "missing: a searched model's config holds its genotype")
    try:
        held = parse_genotype(m.genotype)
    except GenotypeError as exc:
        raise ConfigError(f"model.genotype: {one_line(exc)}") from None
    if m.name[len(SEARCHED_PREFIX):].lstrip().startswith("{"):  # inline: the two must agree
        try:
            named = read_genotype(m.name)
        except GenotypeError as exc:
            raise ConfigError(f"model.name: {one_line(exc)}") from None
        check(named == held, "model.genotype", "differs from the genotype that model.name holds")
