"""The ``attack`` config section: the evaluation's images, attacks, budgets and losses.

Its schema and defaults, next to the evaluation that reads it. The checks
that need the stage registry (attack names, plug-ins included) and the loss
registry are :mod:`.checks`; this module imports neither, nor torch, so the
whole config's schema loads without them (a node never imports it at all:
its task carries no attack section).

The default attack lists are defaults, not the names there are: every
registered stage may be named (``fedrobust.evaluation.stages.stage_names``).
``mifgsm`` is a transfer attack only (from the surrogate zoo); the white-box
attacks are ``fgsm``, ``bim``, ``pgd``, ``apgd``, ``apgd_t`` and their L2
forms ``pgd_l2``, ``apgd_l2``, ``apgd_t_l2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, open_dict

from ..errors import ConfigError, one_line

__all__ = ["DEFAULT_QUERY", "DEFAULT_TRANSFER", "DEFAULT_WHITEBOX", "LOSS_KEYS", "SPLITS", "AttackConfig",
           "resolve_loss_files"]

DEFAULT_TRANSFER = ("cwa", "mifgsm", "pgd")
DEFAULT_QUERY = ("square_linf", "square_l2")
DEFAULT_WHITEBOX = ("fgsm", "bim", "pgd", "apgd")
SPLITS = ("test", "validation")  # attack.split
LOSS_KEYS = ("transfer_loss", "whitebox_loss")  # the keys that name an attack loss


@dataclass
class AttackConfig:
    eps: float = 8 / 255  # L-inf budget in [0, 1] pixel units
    eps_l2: float = 0.5  # L2 budget for square_l2, pgd_l2, apgd_l2 and apgd_t_l2
    num_samples: int = 1000  # evaluation sample (the whole split if smaller)
    sample_seed: int = 0  # the seed the evaluation sample is drawn with
    # the held-out images a run is scored on: test (the test set) | validation (the union of the nodes'
    # validation splits: what a study's trials are scored on, so that nothing is selected on the test set)
    split: str = "test"
    batch_size: int = 500  # images per attack batch
    # surrogate zoo for transfer attacks; None = the dataset's default zoo
    surrogates: list[str] | None = None
    surrogate_epochs: int = 40  # epochs each surrogate trains for
    surrogate_seed: int = 1000  # the surrogates' training seed
    transfer: str = "cwa"  # primary transfer attack -> robust_accuracy.transfer
    transfer_attacks: list[str] = field(default_factory=lambda: list(DEFAULT_TRANSFER))  # transfer attacks to run
    transfer_steps: int = 10  # iterations of each transfer attack on the surrogates
    transfer_loss: str = "ce"  # the transfer attacks' loss: ce | margin | dlr | file:PATH | expr:TEXT | a registered name
    query: str = "square_linf"  # primary query attack -> robust_accuracy.query
    query_attacks: list[str] = field(default_factory=lambda: list(DEFAULT_QUERY))  # query attacks to run
    queries: int = 500  # Square's query budget per image
    p_init: float = 0.8  # Square's initial fraction of pixels changed per square
    square_loss: str = "margin"  # margin | ce
    whitebox: list[str] = field(default_factory=lambda: list(DEFAULT_WHITEBOX))  # white-box attacks to run
    whitebox_loss: str = "ce"  # ce | margin | dlr | file:PATH | expr:TEXT | a registered name
    # the files that file:PATH losses were read from when the config was loaded (their expressions replace them
    # as expr:TEXT in transfer_loss/whitebox_loss): provenance only, never read again
    loss_files: dict[str, str] = field(default_factory=dict)
    # where a white-box loss's value or gradient is NaN/inf on an image: error (stop, one line) | ce (cross-entropy
    # stands in on those images, their number recorded)
    nonfinite: str = "error"
    whitebox_steps: int = 10  # iterations of bim, pgd and pgd_l2 (fgsm takes one step)
    apgd_steps: int = 100  # iterations of apgd and apgd_t
    apgd_targets: int = 9  # apgd_t: how many classes after the true one it targets, in turn (AutoAttack: 9)
    restarts: int = 1  # pgd, apgd, apgd_t: runs from fresh random starts, each on the images still robust
    per_member: bool = True  # per-member RA (transfer replay and the primary query attack)
    tsr: bool = True  # transfer success rate between members
    tsr_steps: int = 10  # PGD steps of the TSR attack
    hessian_samples: int = 100  # images the smoothness diagnostics use
    power_iters: int = 20  # power iterations for the Hessian's largest eigenvalue
    seed: int = 0  # the attacks' random starts and Square's draws, the TSR attack's and the power iterations' starts
    cache_dir: str = ""  # "" = $FEDROBUST_CACHE or ~/.cache/fedrobust


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
        from ..attacks.expression import LossExpressionError, load_loss_file

        path = value[len("file:"):]
        if not path:
            raise ConfigError(f"attack.{key}: file: needs a path, e.g. file:losses/best.json")
        try:
            text = load_loss_file(path).text
        except LossExpressionError as exc:
            raise ConfigError(f"attack.{key}: {one_line(exc)}") from None
        attack[key] = "expr:" + text
        files = dict(attack.get("loss_files") or {})
        files[key] = path
        with open_dict(attack):
            attack.loss_files = files
