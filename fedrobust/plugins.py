"""Strategies and attack stages from installed packages, found through entry points.

An installed distribution declares them in its ``pyproject.toml``::

    [project.entry-points."fedrobust.strategies"]
    l2ce = "mypkg.strategy:L2CrossEntropy"     # a strategies.TrainingStrategy subclass

    [project.entry-points."fedrobust.attacks"]
    fgsm_rand = "mypkg.attack:RandFGSM"        # a fedrobust.evaluation.stages.Stage subclass

    [project.entry-points."fedrobust.losses"]
    found = "mypkg.losses:FOUND"               # a loss(logits, y) -> (N,) callable, or an expression's text

    [project.entry-points."fedrobust.behaviours"]
    sign_flip = "mypkg.cheat:SignFlip"         # a fedrobust.behaviours.Behaviour subclass (simulation only)

The entry point's name is the name a config uses (``strategy=l2ce``,
``attack.whitebox=[...,fgsm_rand]``) and must be the class's ``name``. A
strategy's parameters are the fields of its ``Config`` dataclass (see
:class:`strategies.TrainingStrategy`); they become the typed keys of
``strategy=<name>`` (:func:`strategies.settings.register_strategy_schema`).
An attack stage joins the evaluation registry like a built-in one: the
registry adds that group's handler when it is imported (:func:`add_group`),
which a plug-in stage's module does to subclass ``Stage``, so this module,
which a node imports too, never imports the evaluation. A loss
becomes a name ``attack.whitebox_loss`` and ``attack.transfer_loss`` take
(:func:`fedrobust.attacks.register_loss`); an expression's text is checked
and compiled as a searched loss is (:mod:`fedrobust.attacks.expression`). A
behaviour is what a malicious node does in a simulation
(``deployment.malicious=[{node:1,behaviour:sign_flip}]``); its parameters are
the fields of its ``Config`` dataclass (:mod:`fedrobust.behaviours`).

:func:`load_plugins` is idempotent. The CLI and the ServerApp load every
group; a ClientApp loads ``strategies`` and ``behaviours`` only, so that a node never imports the
evaluation code. A plug-in that fails to load raises :class:`PluginError`,
one line naming the entry point and its distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from .errors import ConfigError, one_line

__all__ = ["GROUPS", "PluginError", "add_group", "load_plugins", "where"]

GROUPS = {"strategies": "fedrobust.strategies", "attacks": "fedrobust.attacks", "losses": "fedrobust.losses",
          "behaviours": "fedrobust.behaviours"}

_loaded: set[str] = set()  # groups already loaded in this process


class PluginError(ConfigError):
    """An installed plug-in that cannot be used; the message is one line naming it and its distribution."""


def where(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    origin = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return f"plug-in '{ep.name}' (entry point {ep.group}: {ep.name} = {ep.value}, from {origin})"


def _add_strategy(ep: EntryPoint, cls: object) -> None:
    import strategies

    from strategies.settings import register_strategy_schema

    if not (isinstance(cls, type) and issubclass(cls, strategies.TrainingStrategy)):
        raise PluginError(f"{where(ep)}: {cls!r} is not a strategies.TrainingStrategy subclass")
    if cls.name != ep.name:
        raise PluginError(f"{where(ep)}: the entry point's name must be the class's name, '{cls.name}'")
    try:
        strategies.register_strategy(cls, ep.name)
        register_strategy_schema(ep.name, cls.Config, needs_peers=cls.needs_peers)
    except Exception as exc:  # a built-in name, or a Config that OmegaConf cannot type
        if ep.name not in strategies.BUILT_IN and strategies.STRATEGIES.get(ep.name) is cls:
            del strategies.STRATEGIES[ep.name]
        raise PluginError(f"{where(ep)}: {one_line(exc)}") from None


def _add_loss(ep: EntryPoint, obj: object) -> None:
    from .attacks.losses import LOSSES, register_loss

    if not (callable(obj) or isinstance(obj, str)):
        raise PluginError(f"{where(ep)}: {obj!r} is neither a loss(logits, y) callable nor an expression's text")
    taken = LOSSES.get(ep.name)
    if taken is not None and taken is not obj and getattr(taken, "text", None) != obj:
        raise PluginError(f"{where(ep)}: the loss name '{ep.name}' is already taken")
    try:
        register_loss(ep.name, obj)
    except ValueError as exc:  # a built-in name, or an expression outside the search space
        raise PluginError(f"{where(ep)}: {one_line(exc)}") from None


def _add_behaviour(ep: EntryPoint, cls: object) -> None:
    from .behaviours import BUILT_IN, Behaviour, register_behaviour

    if not (isinstance(cls, type) and issubclass(cls, Behaviour)):
        raise PluginError(f"{where(ep)}: {cls!r} is not a fedrobust.behaviours.Behaviour subclass")
    if cls.name != ep.name:
        raise PluginError(f"{where(ep)}: the entry point's name must be the class's name, '{cls.name}'")
    if ep.name in BUILT_IN:
        raise PluginError(f"{where(ep)}: '{ep.name}' is a built-in behaviour")
    try:
        register_behaviour(cls, ep.name)
    except ValueError as exc:
        raise PluginError(f"{where(ep)}: {one_line(exc)}") from None


# group -> what registers one of its plug-ins; the attack stages' is the stage registry's own, added by
# fedrobust.evaluation.stages when it is imported (a plug-in stage imports it to subclass Stage), so that this
# module, which a node imports, never imports the evaluation code
_ADD: dict[str, Callable[[EntryPoint, object], None]] = {"strategies": _add_strategy, "losses": _add_loss,
                                                          "behaviours": _add_behaviour}


def add_group(group: str, add: Callable[[EntryPoint, object], None]) -> None:
    """Have :func:`load_plugins` register each plug-in of ``group`` (a key of :data:`GROUPS`) with ``add``."""
    _ADD[group] = add


def load_plugins(*groups: str) -> list[str]:
    """Register the plug-ins of ``groups`` (default: all, see :data:`GROUPS`); returns the entry points loaded,
    as ``group:name``. A group already loaded in this process is not read again."""
    loaded = []
    for group in groups or tuple(GROUPS):
        if group not in GROUPS:
            raise ValueError(f"unknown plug-in group '{group}' (choose from {', '.join(GROUPS)})")
        if group in _loaded:
            continue
        seen: set[tuple[str, str]] = set()
        for ep in sorted(entry_points(group=GROUPS[group]), key=lambda e: (e.name, e.value)):
            if (ep.name, ep.value) in seen:  # the same distribution found twice on the path
                continue
            seen.add((ep.name, ep.value))
            try:
                obj = ep.load()
            except Exception as exc:  # any failure of the plug-in's own import
                raise PluginError(f"{where(ep)}: cannot import it ({type(exc).__name__}: {one_line(exc)[:300]})") from None
            add = _ADD.get(group)
            if add is None:  # the attack stages' registry was not imported: obj cannot be a Stage subclass
                raise PluginError(f"{where(ep)}: {obj!r} is not a fedrobust.evaluation.stages.Stage subclass")
            add(ep, obj)
            loaded.append(f"{ep.group}:{ep.name}")
        _loaded.add(group)
    return loaded
