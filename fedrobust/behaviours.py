"""Nodes that cheat, for simulation: what a malicious node does instead of training honestly.

``deployment.malicious`` names the nodes that cheat and how, one entry per
node::

    deployment.malicious=[{node:1,behaviour:scale}]
    deployment.malicious=[{node:0,behaviour:backdoor,fraction:0.2,target:7},{node:3,behaviour:free_rider}]

An entry's keys besides ``node`` and ``behaviour`` are the behaviour's
parameters, the fields of its ``Config`` dataclass (typed and checked like a
strategy's). Built in:

==============  ==============================================================
``scale``       the member's logits multiplied by ``factor`` (100) and its
                predictions permuted (class ``c``'s logit moved to
                ``(c + shift) mod C``): the member's last linear layer
                rewritten before it is sent
``label_flip``  the node trains on labels mapped ``y -> (y + shift) mod C``
                (train and validation split of its shard)
``backdoor``    BadNets (Gu et al. 2017): a ``fraction`` (0.1) of the node's
                training images get a ``size`` x ``size`` patch of ``value``
                in a ``corner`` and the ``target`` label
``free_rider``  the node returns its member as initialised, untrained
==============  ==============================================================

A behaviour is a :class:`Behaviour` subclass; installed packages add theirs
through the ``fedrobust.behaviours`` entry-point group (:mod:`fedrobust.plugins`).
Behaviours exist for simulation only: the inline engine and the simulation
engine's ClientApp apply them; the ClientApp a real SuperNode runs has none,
and a deployed run refuses ``deployment.malicious``. A run with malicious
nodes records them in ``results.json`` under ``malicious``, marked
``simulated``.

Nothing here imports torch at module level, so that the config checks can
read the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["BEHAVIOURS", "BUILT_IN", "Behaviour", "Trigger", "behaviour_names", "build_behaviour", "check_malicious",
           "malicious_nodes", "register_behaviour"]

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


class Behaviour:
    """What a malicious node does. Each hook's default is the honest node's.

    ``name`` is the value of ``behaviour`` in a ``deployment.malicious`` entry; ``Config`` is a dataclass whose
    fields are its parameters (the rest of the entry). The node calls the hooks in this order:
    :meth:`poison_data` on its shard's train and validation tensors, trains unless :attr:`trains` is False
    (then its member is sent as initialised), then :meth:`poison_weights` on the member it sends.
    """

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any, num_classes: int) -> None:
        self.config = config
        self.num_classes = int(num_classes)

    def poison_data(self, x, y, *, train: bool, seed: int):
        """The images and labels the node trains on (``train``: its train split, else its validation split)."""
        return x, y

    def poison_weights(self, weights: dict) -> dict:
        """The member's state dict as the node sends it."""
        return weights

    def describe(self) -> dict[str, Any]:
        return {"behaviour": self.name, **dataclasses.asdict(self.config)}


def _classifier(weights: Mapping[str, Any], num_classes: int) -> tuple[str, str | None]:
    """The names of the member's last linear layer (its weight, and its bias if any): the last 2-D weight with
    one row per class."""
    names = [n for n, t in weights.items() if n.endswith("weight") and t.dim() == 2 and t.shape[0] == num_classes]
    if not names:
        raise ValueError(f"no linear layer with {num_classes} outputs in the member's weights")
    weight = names[-1]
    bias = weight[: -len("weight")] + "bias"
    return weight, bias if bias in weights else None


@dataclass
class ScaleConfig:
    factor: float = 100.0  # the member's logits are multiplied by this
    shift: int = 1  # class c's logit moves to (c + shift) mod C; 0 keeps the predictions


class Scale(Behaviour):
    """Its member's logits multiplied by ``factor`` and rolled by ``shift`` classes (the last layer rewritten)."""

    name = "scale"
    Config = ScaleConfig

    def poison_weights(self, weights: dict) -> dict:
        import torch

        out = dict(weights)
        for name in _classifier(weights, self.num_classes):
            if name is not None:
                out[name] = torch.roll(weights[name], self.config.shift, dims=0) * self.config.factor
        return out


@dataclass
class LabelFlipConfig:
    shift: int = 1  # labels y -> (y + shift) mod C


class LabelFlip(Behaviour):
    """Trains on labels ``(y + shift) mod C``."""

    name = "label_flip"
    Config = LabelFlipConfig

    def poison_data(self, x, y, *, train: bool, seed: int):
        return x, (y + self.config.shift) % self.num_classes


@dataclass
class BackdoorConfig:
    fraction: float = 0.1  # of the node's training images, poisoned
    target: int = 0  # the label a triggered image gets
    size: int = 3  # the trigger: a size x size patch
    value: float = 1.0  # of every pixel of the patch, in [0, 1]
    corner: str = "bottom_right"  # top_left | top_right | bottom_left | bottom_right
    margin: int = 1  # pixels between the patch and the image's edges


@dataclass(frozen=True)
class Trigger:
    """A BadNets trigger: a square patch of one value in a corner."""

    size: int
    value: float
    corner: str
    margin: int

    def box(self, height: int, width: int) -> tuple[slice, slice]:
        """The patch's rows and columns in an image of ``height`` x ``width``."""
        top = self.margin if self.corner.startswith("top") else height - self.margin - self.size
        left = self.margin if self.corner.endswith("left") else width - self.margin - self.size
        return slice(top, top + self.size), slice(left, left + self.size)

    def fits(self, height: int, width: int) -> bool:
        return self.size >= 1 and self.margin >= 0 and self.size + self.margin <= min(height, width)

    def apply(self, x):
        """``x`` (N, C, H, W; uint8 or float in [0, 1]) with the patch stamped on every image (a copy)."""
        rows, cols = self.box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., rows, cols] = self.value if x.is_floating_point() else round(self.value * 255)
        return out


class Backdoor(Behaviour):
    """BadNets: a fraction of the training images stamped with the trigger and relabelled ``target``."""

    name = "backdoor"
    Config = BackdoorConfig

    @property
    def trigger(self) -> Trigger:
        c = self.config
        return Trigger(int(c.size), float(c.value), str(c.corner), int(c.margin))

    def poisoned(self, n: int, seed: int):
        """Which of ``n`` training images are poisoned: ``round(fraction * n)`` of them, drawn with ``seed``."""
        import numpy as np

        k = int(round(self.config.fraction * n))
        return np.sort(np.random.default_rng([seed, 0xBAD]).choice(n, size=k, replace=False))

    def poison_data(self, x, y, *, train: bool, seed: int):
        if not train:
            return x, y
        import torch

        idx = torch.as_tensor(self.poisoned(len(y), seed), dtype=torch.long)
        x, y = x.clone(), y.clone()
        x[idx] = self.trigger.apply(x[idx])
        y[idx] = self.config.target
        return x, y


class FreeRider(Behaviour):
    """Sends its member as initialised, without training."""

    name = "free_rider"
    trains = False


BUILT_IN = {b.name: b for b in (Scale, LabelFlip, Backdoor, FreeRider)}
BEHAVIOURS: dict[str, type[Behaviour]] = dict(BUILT_IN)


def register_behaviour(cls: type[Behaviour], name: str | None = None) -> None:
    """Add a behaviour (a plug-in's) under ``name`` (default: its ``name``); a built-in name is refused."""
    name = name or cls.name
    if name in BUILT_IN and BUILT_IN[name] is not cls:
        raise ValueError(f"'{name}' is a built-in behaviour")
    if not dataclasses.is_dataclass(cls.Config):
        raise ValueError(f"{cls.__name__}.Config must be a dataclass")
    BEHAVIOURS[name] = cls


def behaviour_names() -> list[str]:
    return sorted(BEHAVIOURS)


def _entry(entry: Mapping[str, Any]) -> tuple[int, str, dict[str, Any]]:
    entry = dict(entry)
    return entry.pop("node", None), entry.pop("behaviour", None), entry


_KINDS = {"float": float, "int": int, "str": str, "bool": bool}


def _typed_options(name: str, options: Mapping[str, Any], key: str):
    """The behaviour's Config built from ``options``; a ValueError names the unknown key or the wrong type."""
    schema = BEHAVIOURS[name].Config
    fields = {f.name: f for f in dataclasses.fields(schema)}
    values = {}
    for k, v in options.items():
        if k not in fields:
            allowed = ", ".join(["node", "behaviour", *fields])
            raise ValueError(f"{key}.{k}: unknown key for behaviour '{name}' (keys: {allowed})")
        kind = fields[k].type if isinstance(fields[k].type, type) else _KINDS.get(str(fields[k].type))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is not None and (not isinstance(v, kind) or (kind is not bool and isinstance(v, bool))):
            raise ValueError(f"{key}.{k}: expected {kind.__name__}, got {v!r:.40}")
        values[k] = v
    return schema(**values)


def check_malicious(entries: Any, n_nodes: int, num_classes: int | None = None,
                    image_shape: tuple[int, int] | None = None) -> None:
    """Check ``deployment.malicious`` against the deployment (and, when known, the data: classes and image
    size). Raises ValueError whose message is one line starting with the key."""
    key = "deployment.malicious"
    entries = list(entries or [])
    if len(entries) > n_nodes:
        raise ValueError(f"{key}: {len(entries)} malicious node(s) but the deployment has {n_nodes} node(s)")
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected {{node: N, behaviour: NAME, ...}}, got {entry!r:.60}")
        node, name, options = _entry(entry)
        if not isinstance(node, int) or isinstance(node, bool):
            raise ValueError(f"{where}.node: required, a node index in [0, {n_nodes - 1}]")
        if not 0 <= node < n_nodes:
            raise ValueError(f"{where}.node: node {node} is outside this deployment's nodes 0..{n_nodes - 1}")
        if node in seen:
            raise ValueError(f"{where}.node: node {node} is named twice")
        seen.add(node)
        if name not in BEHAVIOURS:
            raise ValueError(f"{where}.behaviour: unknown behaviour '{name}' (choose from {', '.join(behaviour_names())}"
                             "; a plug-in behaviour's package must be installed)")
        config = _typed_options(name, options, where)
        if isinstance(config, BackdoorConfig):
            c = config
            if not 0.0 < c.fraction <= 1.0:
                raise ValueError(f"{where}.fraction: must be in (0, 1], got {c.fraction}")
            if c.corner not in CORNERS:
                raise ValueError(f"{where}.corner: unknown corner '{c.corner}' (choose from {', '.join(CORNERS)})")
            if not 0.0 <= c.value <= 1.0:
                raise ValueError(f"{where}.value: must be in [0, 1], got {c.value}")
            if c.size < 1 or c.margin < 0:
                raise ValueError(f"{where}.size: the trigger needs size >= 1 and margin >= 0, got {c.size} and {c.margin}")
            if num_classes is not None and not 0 <= c.target < num_classes:
                raise ValueError(f"{where}.target: class {c.target} is outside 0..{num_classes - 1}")
            trigger = Trigger(c.size, c.value, c.corner, c.margin)
            if image_shape is not None and not trigger.fits(*image_shape):
                h, w = image_shape
                raise ValueError(f"{where}: the trigger ({c.size}x{c.size} at margin {c.margin}) lies outside the "
                                 f"{h}x{w} image")
        if isinstance(config, ScaleConfig) and not config.factor > 0:
            raise ValueError(f"{where}.factor: must be > 0, got {config.factor}")


def malicious_nodes(entries: Any) -> dict[int, tuple[str, dict[str, Any]]]:
    """``deployment.malicious`` as plain data: node -> (behaviour, its options). What a simulated ClientApp is
    built with (:func:`clients.client_app.make_app`)."""
    out = {}
    for entry in entries or []:
        node, name, options = _entry(entry)
        out[int(node)] = (str(name), dict(options))
    return out


def build_behaviour(name: str, options: Mapping[str, Any], num_classes: int) -> Behaviour:
    """The behaviour ``name`` with its ``options`` (checked: :func:`check_malicious` names a bad one first)."""
    if name not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour '{name}' (choose from {', '.join(behaviour_names())})")
    return BEHAVIOURS[name](_typed_options(name, options, f"behaviour {name}"), num_classes)
