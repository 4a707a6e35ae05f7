"""The stages of an evaluation, and the registry that orders them.

A stage is a small object with a ``group`` and a ``name`` (together its id,
``group:name``, e.g. ``transfer:cwa``) and a ``run`` method whose
keyword-only parameters name the inputs it reads, as pytest fixtures do:

==============  ============================================================
``attack``      the ``attack`` config section
``x``, ``y``    the evaluation sample (``attack.num_samples`` test images)
``target``      the run's :class:`~fedrobust.ensemble.LogitAverageEnsemble`
``members``     its members, in order
``clean``       per image of the sample, whether the target (``"ensemble"``)
                and each member (``"members"``) classify it correctly
``zoo``         the surrogate zoo (:class:`Zoo`); loaded or trained on first use
``transfer``    the content-addressed cache of transfer examples
``board``       the run's TensorBoard, for images (:class:`~fedrobust.views.Board`)
``progress``    whether to show progress bars
==============  ============================================================

``run`` returns the stage's own part of ``results.json`` as JSON-able data:
``attacks`` (entries of ``ensemble.attacks``), ``members`` (attack name ->
robust accuracy per member), ``ensemble`` (other ensemble entries),
``evaluation`` and ``cache_hits`` (bookkeeping), ``histograms`` (values
for TensorBoard) and ``fates``: per attack entry, each image's fate
(``ensemble``: robust or not, per image; ``members``: one row per member;
``queries``; see :mod:`.fates`). The driver
(:func:`fedrobust.evaluation.evaluate_run`) stores each part as soon as its
stage finishes, the fates in ``fates/``.

An image counts as robust only if the model classifies it correctly at
the clean point too: transfer examples are scored with the clean
predictions (``clean``), and the attacks that query the model classify the
clean images first (:mod:`fedrobust.attacks.worst_case`).

Groups run in the order they were registered. Within the groups that the
config lists by name (``attack.transfer_attacks``, ``attack.query_attacks``,
``attack.whitebox``), stages run in the config's order; the other groups'
stages run when their ``wanted`` says so. Adding an attack is one new class
and one config entry::

    @register
    class CWL2Whitebox(WhiteboxStage):
        name = "cw"

        def build(self, target, attack):
            return CarliniWagner(target, ...)

and ``attack.whitebox=[fgsm,bim,pgd,apgd,cw]``. From a shell, the class comes
from an installed package: an entry point of group ``fedrobust.attacks``
names it, and :func:`fedrobust.plugins.load_plugins` registers it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig

from ..attacks import (CWA, MIFGSM, PGD, SearchedLoss, SquareAttack, accuracy, attack_loss, build_gradient_attack,
                       loss_identity, predict, robust_images, transferability)
from ..attacks.smoothness import gradient_cosine, hessian_lambda_max
from ..ensemble import LogitAverageEnsemble
from ..runs.cache import cache_root, content_key, load_tensors, save_tensors
from ..plugins import PluginError, add_group, where
from .fates import figure

__all__ = ["REGISTRY", "Stage", "TransferExamples", "Zoo", "build_stages", "register", "stage_names"]

log = logging.getLogger("fedrobust")

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Zoo:
    """The surrogate ensemble, its content key and whether it came from the cache."""

    model: LogitAverageEnsemble
    key: str
    cached: bool


def loss_entry(attack: DictConfig, key: str) -> dict[str, str]:
    """A result entry's loss (``attack.<key>``): the name as configured and, for a searched one, the expression
    it stood for and the file it was read from, if any (:func:`fedrobust.evaluation.settings.resolve_loss_files`)."""
    loss = attack[key]
    fn = attack_loss(loss)
    if not isinstance(fn, SearchedLoss):
        return {"loss": loss}
    source = (attack.get("loss_files") or {}).get(key)
    return {"loss": loss, "loss_expression": fn.text, **({"loss_file": source} if source else {})}


def batched(attack: Attack, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([attack(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class TransferExamples:
    """Transfer adversarial examples on the sample, cached by (attack, zoo, sample, settings).

    The sample is its split and its indices: ``test`` indices index the test
    set, ``validation`` ones the training set, so the same numbers are other
    images.
    """

    def __init__(self, attack: DictConfig, indices: np.ndarray, split: str = "test") -> None:
        self.a, self.indices, self.split = attack, indices, split

    def path(self, name: str, zoo_key: str) -> Path:
        a = self.a
        key = content_key({
            "kind": "transfer", "attack": name, "zoo": zoo_key, "split": self.split, "indices": self.indices.tolist(),
            # a searched loss by its expression, not by its file's path
            "eps": a.eps, "steps": a.transfer_steps, "loss": loss_identity(a.transfer_loss), "seed": a.seed, "version": 2,
        })
        return cache_root(a.cache_dir) / "transfer" / f"{key}.pt"

    def get(self, name: str, zoo: Zoo, craft: Attack, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The cached examples if they exist, else ``craft``'s, stored; and whether they were cached."""
        path = self.path(name, zoo.key)
        cached = load_tensors(path)
        if cached is not None and cached["x_adv"].shape == x.shape:
            return cached["x_adv"].to(x.device), True
        x_adv = batched(craft, x, y, self.a.batch_size)
        save_tensors(path, {"x_adv": x_adv}, {"attack": name, "zoo": zoo.key, "eps": self.a.eps, "n": len(self.indices)})
        return x_adv, False


class Stage:
    """One step of an evaluation. Subclasses set ``group`` and ``name`` and define ``run``."""

    group: ClassVar[str]
    name: ClassVar[str] = ""
    # the attack config key that lists this group's stages by name; None: ``wanted`` decides
    listed_by: ClassVar[str | None] = None

    @property
    def id(self) -> str:
        return f"{self.group}:{self.name}" if self.name else self.group

    @classmethod
    def needs(cls) -> tuple[str, ...]:
        """The inputs ``run`` reads: its keyword-only parameters."""
        params = inspect.signature(cls.run).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @classmethod
    def wanted(cls, attack: DictConfig, num_members: int) -> bool:
        return True

    def run(self, **inputs: Any) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<stage {self.id}>"


REGISTRY: dict[str, dict[str, type[Stage]]] = {}  # group -> name -> class, in registration order


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add a stage to :data:`REGISTRY` (its group is created on first use)."""
    REGISTRY.setdefault(cls.group, {})[cls.name] = cls
    return cls


def stage_names(group: str) -> tuple[str, ...]:
    """The names a group's stages are registered under (what its config list may hold)."""
    return tuple(REGISTRY.get(group, {}))


def build_stages(attack: DictConfig, num_members: int) -> list[Stage]:
    """The stages an evaluation runs, in order."""
    from ..errors import ConfigError

    stages: list[Stage] = []
    for classes in REGISTRY.values():
        key = next(iter(classes.values())).listed_by
        names = list(attack[key]) if key else [n for n, c in classes.items() if c.wanted(attack, num_members)]
        for n in names:
            if n not in classes:  # a config checked before a plug-in's stage was unregistered
                raise ConfigError(f"attack.{key}: unknown value '{n}' (choose from {', '.join(classes)})")
        stages += [classes[n]() for n in names]
    return stages


# ------------------------------------------------------------------ stages --


@register
class Surrogates(Stage):
    """The surrogate zoo, trained or found in the cache, and its clean accuracy on the sample."""

    group = "surrogates"

    def run(self, *, zoo, x, y):
        return {"evaluation": {"surrogate_zoo": zoo.key, "surrogate_clean_accuracy": accuracy(zoo.model, x, y)},
                "cache_hits": {"surrogates": zoo.cached}}


class TransferStage(Stage):
    """Examples crafted on the surrogate zoo (cached), replayed on the target and on each member."""

    group = "transfer"
    listed_by = "transfer_attacks"

    def build(self, zoo: LogitAverageEnsemble, attack: DictConfig) -> Attack:
        raise NotImplementedError

    def run(self, *, attack, zoo, transfer, target, members, clean, x, y, board):
        a = attack
        x_adv, hit = transfer.get(self.name, zoo, self.build(zoo.model, a), x, y)
        if hit:
            log.info("transfer %s: reused cached adversarial examples", self.name)
        robust = (predict(target, x_adv) == y) & clean["ensemble"]  # never robust where wrong at the clean point
        on_members = [(predict(m, x_adv) == y) & c for m, c in zip(members, clean["members"])]
        fig = figure(_np(robust))
        if self.name == a.transfer:
            board.adversarial_grid(f"transfer_{self.name}", target, x, x_adv, y)
        record = f"transfer_{self.name}"
        entry = {"kind": "transfer", **fig, "asr": 1 - fig["robust_accuracy"], "eps": a.eps, "norm": "linf",
                 "steps": a.transfer_steps, **loss_entry(a, "transfer_loss"), "surrogates": len(zoo.model.members),
                 "surrogate_accuracy": accuracy(zoo.model, x_adv, y), "cached": hit}
        fates = {"ensemble": _np(robust)}
        if on_members:
            fates["members"] = np.stack([_np(r) for r in on_members])
        return {"attacks": {record: entry},
                "members": {record: [float(r.float().mean()) for r in on_members]},
                "cache_hits": {"transfer": {self.name: hit}}, "fates": {record: fates}}


@register
class CWATransfer(TransferStage):
    name = "cwa"

    def build(self, zoo, attack):
        return CWA(list(zoo.members), attack.eps, attack.transfer_steps, loss=attack.transfer_loss)


@register
class MIFGSMTransfer(TransferStage):
    name = "mifgsm"

    def build(self, zoo, attack):
        return MIFGSM(zoo, attack.eps, attack.transfer_steps, loss=attack.transfer_loss, worst_case=False)


@register
class PGDTransfer(TransferStage):
    name = "pgd"

    def build(self, zoo, attack):
        return PGD(zoo, attack.eps, attack.transfer_steps, loss=attack.transfer_loss, seed=attack.seed,
                   worst_case=False)


class SquareStage(Stage):
    """Square on the target, with honest query counts; on each member too for the primary query attack."""

    group = "query"
    listed_by = "query_attacks"
    norm: ClassVar[str]

    def eps(self, attack: DictConfig) -> float:
        return attack.eps if self.norm == "linf" else attack.eps_l2

    def _square(self, model, attack: DictConfig) -> SquareAttack:
        return SquareAttack(model, self.eps(attack), self.norm, attack.queries, attack.p_init, attack.square_loss,
                            seed=attack.seed)

    def run(self, *, attack, target, members, clean, x, y, board, progress):
        a, bs = attack, attack.batch_size
        square = self._square(target, a)
        parts = [square.run(x[i : i + bs], y[i : i + bs], progress=progress) for i in range(0, len(x), bs)]
        x_adv, queries = torch.cat([r.x_adv for r in parts]), torch.cat([r.queries for r in parts])
        # the attack classified the clean images first, so a clean-misclassified image is among the fooled
        fooled = (predict(target, x_adv) != y) | torch.cat([r.success for r in parts]) | ~clean["ensemble"]
        fig = figure(_np(~fooled))
        if self.name == a.query:
            board.adversarial_grid(f"query_{self.name}", target, x, x_adv, y)
        record = f"query_{self.name}"
        entry = {"kind": "query", **fig, "asr": 1 - fig["robust_accuracy"], "eps": self.eps(a), "norm": self.norm,
                 "queries": a.queries, "loss": a.square_loss, "p_init": a.p_init,
                 "queries_used": {"mean": float(queries.float().mean()), "median": float(queries.float().median()),
                                  "mean_successful": float(queries[fooled].float().mean()) if fooled.any() else None,
                                  "max": int(queries.max())}}
        fates = {"ensemble": _np(~fooled), "queries": _np(queries)}
        part = {"attacks": {record: entry}}
        if a.per_member and self.name == a.query:
            on_members = [robust_images(m, self._square(m, a), x, y, bs).robust for m in members]
            part["members"] = {record: [float(r.float().mean()) for r in on_members]}
            fates["members"] = np.stack([_np(r) for r in on_members])
        part["fates"] = {record: fates}
        return part


@register
class SquareLinf(SquareStage):
    name, norm = "square_linf", "linf"


@register
class SquareL2(SquareStage):
    name, norm = "square_l2", "l2"


class WhiteboxStage(Stage):
    """A gradient attack on the target ensemble itself.

    An image counts as broken if the attack's answer is misclassified, or if
    the attack reports (``run(x, y).success``) that it saw a point inside the
    budget misclassified: the figure is the worst case over every point the
    attack evaluated, even where re-classifying its answer in another batch
    would round a near-tie the other way. A ``build`` that returns a plain
    ``(x, y) -> x_adv`` callable is scored on its answers alone.
    """

    group = "whitebox"
    listed_by = "whitebox"
    norm: ClassVar[str] = "linf"  # "l2": at attack.eps_l2

    def eps(self, attack: DictConfig) -> float:
        return attack.eps if self.norm == "linf" else attack.eps_l2

    def steps(self, attack: DictConfig) -> int:
        return attack.whitebox_steps

    def build(self, target, attack: DictConfig) -> Attack:
        return build_gradient_attack(self.name, target, self.eps(attack), self.steps(attack), attack.whitebox_loss,
                                     seed=attack.seed, nonfinite=attack.get("nonfinite", "error"),
                                     restarts=attack.get("restarts", 1), targets=attack.get("apgd_targets", 9))

    def loss(self, attack: DictConfig) -> dict:
        return loss_entry(attack, "whitebox_loss")

    def run(self, *, attack, target, x, y):
        a = attack
        res = robust_images(target, self.build(target, a), x, y, a.batch_size)
        fig = figure(_np(res.robust))
        record = f"whitebox_{self.name}"
        entry = {"kind": "whitebox", **fig, "asr": 1 - fig["robust_accuracy"], "eps": self.eps(a), "norm": self.norm,
                 "steps": self.steps(a), **self.loss(a)}
        if self.name.removesuffix("_l2") in ("pgd", "apgd", "apgd_t"):
            entry["restarts"] = a.get("restarts", 1)
        fates = {"ensemble": _np(res.robust)}
        if bool(res.fallback.any()):
            entry["nonfinite_fallback_images"] = int(res.fallback.sum())
            fates["fallback"] = _np(res.fallback)
            log.warning("%s: cross-entropy stood in for a non-finite loss on %d image(s) (attack.nonfinite=ce)",
                        record, int(res.fallback.sum()))
        return {"attacks": {record: entry}, "fates": {record: fates}}


@register
class FGSMWhitebox(WhiteboxStage):
    name = "fgsm"

    def steps(self, attack):
        return 1


@register
class BIMWhitebox(WhiteboxStage):
    name = "bim"


@register
class PGDWhitebox(WhiteboxStage):
    name = "pgd"


@register
class APGDWhitebox(WhiteboxStage):
    name = "apgd"

    def steps(self, attack):
        return attack.apgd_steps


@register
class APGDTWhitebox(WhiteboxStage):
    """APGD-T: the targeted DLR loss towards each of ``attack.apgd_targets`` classes in turn (AutoAttack's)."""

    name = "apgd_t"

    def steps(self, attack):
        return attack.apgd_steps

    def loss(self, attack):
        return {"loss": "dlr-targeted", "targets": attack.get("apgd_targets", 9)}


@register
class PGDL2Whitebox(PGDWhitebox):
    """PGD in L2, at ``attack.eps_l2``."""

    name, norm = "pgd_l2", "l2"


@register
class APGDL2Whitebox(APGDWhitebox):
    """APGD-CE in L2, at ``attack.eps_l2`` (AutoAttack's L2 suite)."""

    name, norm = "apgd_l2", "l2"


@register
class APGDTL2Whitebox(APGDTWhitebox):
    """APGD-T in L2, at ``attack.eps_l2`` (AutoAttack's L2 suite)."""

    name, norm = "apgd_t_l2", "l2"


@register
class TSR(Stage):
    """Transferability between members (EDLCM eq. 12), PGD crafted on each member alone."""

    group = "tsr"

    @classmethod
    def wanted(cls, attack, num_members):
        return bool(attack.tsr) and num_members > 1

    def run(self, *, attack, members, x, y):
        a = attack
        tsr, matrix = transferability(
            members, x, y, lambda src: (lambda xb, yb: batched(
                PGD(src, a.eps, a.tsr_steps, seed=a.seed, worst_case=False), xb, yb, a.batch_size)))
        return {"ensemble": {"tsr": {"value": tsr, "matrix": matrix, "attack": "pgd", "steps": a.tsr_steps,
                                     "eps": a.eps}}}


def _summary(values: torch.Tensor) -> dict:
    v = values.detach().cpu().double()
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist() if len(v) else [0, 0, 0]
    return {"mean": float(v.mean()), "p10": q[0], "median": q[1], "p90": q[2], "n": len(v)}


@register
class Smoothness(Stage):
    """Input-Hessian lambda_max of target and zoo, and the surrogate/target gradient cosine (main paper Fig. 1)."""

    group = "smoothness"

    @classmethod
    def wanted(cls, attack, num_members):
        return attack.hessian_samples > 0

    def run(self, *, attack, target, zoo, x, y):
        a = attack
        n = min(a.hessian_samples, len(x))
        x, y = x[:n], y[:n]
        lam_t = hessian_lambda_max(target, x, y, a.power_iters, generator=torch.Generator().manual_seed(a.seed))
        lam_s = hessian_lambda_max(zoo.model, x, y, a.power_iters, generator=torch.Generator().manual_seed(a.seed))
        cos = gradient_cosine(zoo.model, target, x, y)
        smooth = {"lambda_max": _summary(lam_t), "lambda_max_surrogates": _summary(lam_s),
                  "grad_cosine_surrogate_target": _summary(cos), "power_iters": a.power_iters}
        return {"ensemble": {"smoothness": smooth},
                "histograms": {"smoothness/lambda_max": lam_t.cpu().tolist(),
                               "smoothness/grad_cosine": cos.cpu().tolist()}}


# ------------------------------------------------------------------ plug-ins --

def _add_plugin(ep: EntryPoint, cls: object) -> None:
    """Register an installed plug-in stage (entry-point group ``fedrobust.attacks``, :mod:`fedrobust.plugins`)."""
    if not (isinstance(cls, type) and issubclass(cls, Stage) and getattr(cls, "group", None)):
        raise PluginError(f"{where(ep)}: {cls!r} is not a fedrobust.evaluation.stages.Stage subclass with a group")
    if (cls.name or cls.group) != ep.name:
        raise PluginError(f"{where(ep)}: the entry point's name must be the stage's name, '{cls.name or cls.group}'")
    taken = REGISTRY.get(cls.group, {}).get(cls.name)
    if taken is not None and taken is not cls:
        raise PluginError(f"{where(ep)}: stage {cls.group}:{cls.name} is already registered by "
                          f"{taken.__module__}.{taken.__qualname__}")
    register(cls)


add_group("attacks", _add_plugin)
