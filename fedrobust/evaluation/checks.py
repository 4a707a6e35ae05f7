"""Checks of the ``attack`` config section, next to the stages that read it.

:func:`validate_attack` rejects values that are well-typed but impossible,
with a one-line :class:`~fedrobust.errors.ConfigError` naming the key. The
attack losses (``attack.transfer_loss``, ``attack.whitebox_loss``) may be a
built-in or registered name, or ``file:PATH``: the file is read and its
expression checked here, so that a bad one is refused before anything runs;
so is a searched surrogate's genotype file (``attack.surrogates=[cnn,searched:PATH]``).
The attack lists (``attack.transfer_attacks``, ``attack.query_attacks``,
``attack.whitebox``) may name any stage in the registry, plug-ins included.
Importing this module registers the check with
:func:`fedrobust.config.register_check` (:mod:`fedrobust.validation` imports
it), so that every config loaded in that process is checked against the
stages it knows.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..attacks.expression import LossExpressionError, load_loss_file, parse
from ..attacks.gradient import NONFINITE
from ..attacks.losses import BUILTIN, EXPR_PREFIX, FILE_PREFIX, LOSSES
from ..config import register_check
from ..errors import ConfigError, check, one_line
from ..models.settings import MODELS, is_searched, read_genotype
from ..nas.genotype import GenotypeError
from .settings import SPLITS
from .stages import stage_names

__all__ = ["INPUT_SIZES", "check_attack_loss", "check_attack_section", "validate_attack"]

# values per image of each dataset: the largest L2 distance between two [0, 1] images is sqrt of it
INPUT_SIZES = {"digits": 1 * 8 * 8, "mnist": 28 * 28, "fashion_mnist": 28 * 28, "cifar10": 3 * 32 * 32,
               "cifar100": 3 * 32 * 32}



def check_attack_loss(key: str, value: str) -> None:
    """``attack.<key>`` names a loss: a built-in or registered name, or ``file:PATH`` of a loss file
    that loads now (a :class:`~fedrobust.attacks.LossExpressionError` becomes a one-line ConfigError)."""
    if isinstance(value, str) and value.startswith(FILE_PREFIX):
        path = value[len(FILE_PREFIX):]
        check(bool(path), f"attack.{key}", "file: needs a path, e.g. file:losses/best.json")
        try:
            load_loss_file(path)
        except LossExpressionError as exc:
            raise ConfigError(f"attack.{key}: {exc}") from None
        return
    if isinstance(value, str) and value.startswith(EXPR_PREFIX):
        try:
            parse(value[len(EXPR_PREFIX):])
        except LossExpressionError as exc:
            raise ConfigError(f"attack.{key}: expression: {exc}") from None
        return
    names = tuple(dict.fromkeys((*BUILTIN, *LOSSES)))  # the built-ins first, then registered ones
    check(value in names, f"attack.{key}",
           f"unknown value '{value}' (choose from {', '.join(names)}, file:PATH or expr:TEXT)")


def validate_attack(a: DictConfig, data_name: str = "digits") -> None:
    def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
        check(value in allowed, f"attack.{key}", f"unknown value '{value}' (choose from {', '.join(allowed)})")

    check(0 < a.eps < 1, "attack.eps", f"must be in (0, 1): an L-inf budget in [0, 1] pixel units "
           f"(8/255 = 0.0314 is the paper's), got {a.eps}")
    l2_max = INPUT_SIZES.get(data_name, 3 * 32 * 32) ** 0.5
    check(0 < a.eps_l2 < l2_max, "attack.eps_l2", f"must be in (0, {l2_max:.4g}) for {data_name} "
           f"(the L2 diameter of its [0, 1] images), got {a.eps_l2}")
    check(a.num_samples >= 1, "attack.num_samples", f"must be >= 1, got {a.num_samples}")
    one_of("split", a.split, SPLITS)
    check(a.batch_size >= 1, "attack.batch_size", f"must be >= 1, got {a.batch_size}")
    if a.surrogates is not None:
        check(len(a.surrogates) > 0, "attack.surrogates",
               "must name at least one model, or be null for the dataset's default zoo")
        for name in a.surrogates:
            if is_searched(name):  # the genotype file is read now, so that a bad one is refused before anything runs
                try:
                    read_genotype(name)
                except GenotypeError as exc:
                    raise ConfigError(f"attack.surrogates: {one_line(exc)}") from None
            else:
                check(name in MODELS, "attack.surrogates",
                       f"unknown value '{name}' (choose from {', '.join(MODELS)}, or searched:PATH)")
    check(a.surrogate_epochs >= 1, "attack.surrogate_epochs", f"must be >= 1, got {a.surrogate_epochs}")
    # the registered stages (plug-ins included) are what the lists may name
    for group, key in (("transfer", "transfer_attacks"), ("query", "query_attacks"), ("whitebox", "whitebox")):
        names = stage_names(group)
        if key != "whitebox":
            check(len(a[key]) > 0, f"attack.{key}", f"must name at least one attack (from {', '.join(names)})")
        for name in a[key]:
            one_of(key, name, names)
    one_of("transfer", a.transfer, tuple(a.transfer_attacks))
    one_of("query", a.query, tuple(a.query_attacks))
    check_attack_loss("transfer_loss", a.transfer_loss)
    check_attack_loss("whitebox_loss", a.whitebox_loss)
    one_of("nonfinite", a.nonfinite, NONFINITE)
    one_of("square_loss", a.square_loss, ("margin", "ce"))
    check(a.queries >= 1, "attack.queries", f"must be >= 1, got {a.queries}")
    check(0 < a.p_init <= 1, "attack.p_init", f"must be in (0, 1], got {a.p_init}")
    for key in ("transfer_steps", "whitebox_steps", "apgd_steps", "tsr_steps", "power_iters", "restarts",
                "apgd_targets"):
        check(a[key] >= 1, f"attack.{key}", f"must be >= 1, got {a[key]}")
    check(a.hessian_samples >= 0, "attack.hessian_samples", f"must be >= 0, got {a.hessian_samples}")


def check_attack_section(cfg: DictConfig) -> None:
    """:func:`validate_attack` on a whole run config (the form :func:`fedrobust.config.register_check` takes)."""
    validate_attack(cfg.attack, cfg.data.name)


register_check("attack", check_attack_section)
