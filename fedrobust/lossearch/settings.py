"""``loss_search.*``: the settings of ``fedrobust search-loss`` and their checks.

The defaults are the paper's (Table IV); ``loss_search=small`` (the preset
in ``conf/loss_search/small.yaml``) is a search that fits a 2-core machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ..errors import check
from ..searchdir import load_group

__all__ = ["PRESETS", "LossSearchConfig", "load_settings", "validate_loss_search"]


@dataclass
class LossSearchConfig:
    generations: int = 100  # gn
    population: int = 200  # ps
    tournament: int = 3  # ts
    selections: int = 200  # st: parents drawn per generation (the next population's size)
    crossover: float = 0.5  # cp
    mutation: float = 0.3  # mp
    max_depth: int = 25  # md (DEAP's height: a lone terminal is 0)
    init_min_depth: int = 1  # ramped half-and-half initialisation
    init_max_depth: int = 4  # ... up to this height
    mutation_depth: int = 2  # height of a mutation's new subtree (at most)
    # start the population from ce, margin and DLR written as trees (the rest random); the paper starts at random
    hand_made_start: bool = False
    seed: int = 0  # the genetic program's seed
    eps: float | None = None  # L-inf budget of the fitness's PGD; null: attack.eps of the run
    steps: int = 10  # PGD-10 (the paper's m)
    attack_seed: int = 0  # PGD's random start, the same for every candidate
    split: str = "validation"  # search images: the union of the nodes' validation splits (never the test set)
    num_images: int = 1000  # drawn with sample_seed (all of them if fewer)
    sample_seed: int = 0  # the seed the search images are drawn with
    target: str = "ensemble"  # ensemble | member:K (the K-th member alone)
    hall_of_fame: int = 10  # the best distinct losses kept (hall_of_fame.json), each scored on the held-out images
    # held-out measurement on test images no search saw: attack.num_samples drawn with attack.sample_seed
    test: bool = True
    test_images: int | None = None  # null: attack.num_samples
    long_steps: int = 100  # PGD-100 in the held-out table
    apgd_steps: int = 100  # APGD-100 in the held-out table
    test_eps: list[float] | None = None  # other budgets for the transfer table; null: eps/2 and 2 eps
    ray_address: str | None = None  # evaluate candidates on Ray: "local", "auto" or host:port; null: in process
    out_dir: str | None = None  # null: RUN_DIR/loss_search


def _check(ok: bool, key: str, msg: str) -> None:
    check(ok, f"loss_search.{key}", msg)


def validate_loss_search(s: DictConfig, num_members: int) -> None:
    """One-line :class:`ConfigError` naming the first key at fault."""
    for key in ("generations", "tournament", "steps", "long_steps", "apgd_steps", "num_images"):
        _check(s[key] >= 1, key, f"must be >= 1, got {s[key]}")
    _check(s.population >= 2, "population", f"must be >= 2, got {s.population}")
    if s.hand_made_start:
        _check(s.population >= 4, "population", f"must be >= 4 with hand_made_start (3 hand-made + 1), got {s.population}")
    _check(s.selections >= 2, "selections", f"must be >= 2, got {s.selections}")
    _check(s.tournament <= s.population, "tournament", f"must be <= population ({s.population}), got {s.tournament}")
    for key in ("crossover", "mutation"):
        _check(0 <= s[key] <= 1, key, f"must be a probability in [0, 1], got {s[key]}")
    from ..attacks.expression import MAX_DEPTH

    _check(1 <= s.max_depth <= MAX_DEPTH, "max_depth", f"must be in [1, {MAX_DEPTH}], got {s.max_depth}")
    _check(0 <= s.init_min_depth <= s.init_max_depth <= s.max_depth, "init_max_depth",
           f"need 0 <= init_min_depth <= init_max_depth <= max_depth, got {s.init_min_depth}, "
           f"{s.init_max_depth}, {s.max_depth}")
    _check(0 <= s.mutation_depth <= s.max_depth, "mutation_depth", f"must be in [0, max_depth], got {s.mutation_depth}")
    if s.eps is not None:
        _check(0 < s.eps < 1, "eps", f"must be in (0, 1) ([0, 1] pixel units), got {s.eps}")
    _check(s.split == "validation", "split", f"must be validation (the search never sees the test set), got {s.split}")
    _check(s.hall_of_fame >= 1, "hall_of_fame", f"must be >= 1, got {s.hall_of_fame}")
    if s.test_images is not None:
        _check(s.test_images >= 1, "test_images", f"must be >= 1, got {s.test_images}")
    for e in s.test_eps or []:
        _check(0 < e < 1, "test_eps", f"each budget must be in (0, 1), got {e}")
    t = s.target
    if t != "ensemble":
        ok = t.startswith("member:") and t[7:].isdigit() and int(t[7:]) < num_members
        _check(ok, "target", f"must be ensemble or member:K with K < {num_members}, got '{t}'")


PRESETS = ("paper", "small")  # paper: the defaults above; small: conf/loss_search/small.yaml


def load_settings(overrides: list[str], num_members: int) -> DictConfig:
    """``loss_search`` settings: the defaults, a preset (``loss_search=small``), then ``loss_search.KEY=VALUE``;
    checked (``loss_search.target`` against the run's ``num_members``)."""
    s = load_group(LossSearchConfig, "loss_search", PRESETS, overrides,
                   usage="search-loss takes loss_search=PRESET and loss_search.KEY=VALUE overrides only "
                         "(the run's own settings are the ones it was trained and evaluated with)")
    validate_loss_search(s, num_members)
    return s
