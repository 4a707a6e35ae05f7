"""Evaluate a trained run: transfer, query and white-box attacks, TSR, smoothness.

``evaluate_run(run_dir, cfg)`` adds to ``results.json`` (under ``ensemble``
and each member) and to TensorBoard. Every target sees the same evaluation
sample: ``attack.num_samples`` images drawn with ``attack.sample_seed`` from
the split ``attack.split`` names, the test set (``test``) or the union of the
nodes' validation splits (``validation``: what a study's trials are scored on,
so that nothing is selected on the test set). The sample is saved by index in
``eval_sample.json`` (its split, and indices into the test set or into the
training set), and ``results.json``'s ``images`` says which images each
figure was measured on. Surrogates and transfer examples come from the
content-addressed cache when they exist.

The evaluation is a short driver over the registered stages of
:mod:`.stages` (surrogates, each transfer, query and white-box attack, TSR,
smoothness). Each finished stage's part is kept in
``RUN_DIR/evaluation.partial.json`` as soon as it finishes, under a key
of the member checkpoints, the attack settings and the sample, so an
evaluation that was interrupted resumes at the next stage when run again
with the same settings. ``results.json`` is replaced atomically, once, at the
end; its training part is never lost.

Every image's fate under every attack is kept in ``fates/`` (one ``.npz``
per attack entry, :mod:`.fates`), and ``results.json`` gains the unions
built from them (``ensemble.unions``: ``whitebox`` and ``all``, each with
the attacks it covers; ``members[m].unions.all``). Every accuracy of the
evaluation carries its count of images and a 95% Wilson interval
(:mod:`fedrobust.stats`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..atomic import write_json
from ..attacks import accuracy, loss_identity, predict
from ..errors import ConfigError
from ..data import ImageDataset, dataset_of, to_float
from ..progress import interactive, progress as progress_bar
from ..runs.cache import content_key
from ..runs.images import Images, evaluation_images, held_out_images
from ..runs.members import check_complete, ensemble_rule, load_ensemble, member_numbers, members_digest
from ..training import resolve_device
from ..views import Board
from ..stats import interval_of
from .fates import FATES, figure, load_fates, save_fate, unions
from .stages import REGISTRY, Stage, TransferExamples, Zoo, build_stages
from .surrogates import load_or_train_zoo, zoo_cache_path

__all__ = ["PARTIAL", "evaluate_run", "prepare_transfer_artefacts", "read_results"]

log = logging.getLogger("fedrobust")


def prepare_transfer_artefacts(cfg: DictConfig, data: ImageDataset | None = None) -> list[Path]:
    """Train (or find) the surrogate zoo and craft (or find) every transfer attack's examples on the
    evaluation sample, so that every later evaluation on this data reuses them; their cache files."""
    a = cfg.attack
    device = resolve_device(cfg.train.device)
    data = data or dataset_of(cfg)
    zoo = Zoo(*load_or_train_zoo(cfg, data, device))
    images = evaluation_images(cfg, data)
    x, y = images.tensors(data)
    x, y = to_float(x).to(device), y.to(device)
    transfer = TransferExamples(a, images.indices, images.split)
    paths = [zoo_cache_path(cfg, zoo.key)]
    for name in a.transfer_attacks:
        transfer.get(name, zoo, REGISTRY["transfer"][name]().build(zoo.model, a), x, y)
        paths.append(transfer.path(name, zoo.key))
    return paths


PARTIAL = "evaluation.partial.json"


class _Inputs:
    """What stages read, by name (see :mod:`.stages`); each made on first use, once."""

    def __init__(self, cfg: DictConfig, data: ImageDataset, device: torch.device, target, images: Images,
                 board: Board) -> None:
        x, y = images.tensors(data)
        self._made: dict[str, Any] = {
            "attack": cfg.attack, "target": target, "members": list(target.members), "x": to_float(x).to(device),
            "y": y.to(device), "transfer": TransferExamples(cfg.attack, images.indices, images.split), "board": board,
            "progress": cfg.train.progress,
        }
        self._makers = {"zoo": lambda: Zoo(*load_or_train_zoo(cfg, data, device)), "clean": self._clean}

    def _clean(self) -> dict[str, Any]:
        """Per image of the sample: does the target, does each member classify it correctly at the clean point."""
        x, y = self["x"], self["y"]
        return {"ensemble": predict(self["target"], x) == y, "members": [predict(m, x) == y for m in self["members"]]}

    def __getitem__(self, name: str) -> Any:
        if name not in self._made:
            self._made[name] = self._makers[name]()
        return self._made[name]

    def for_stage(self, stage: Stage) -> dict[str, Any]:
        return {name: self[name] for name in stage.needs()}


def _merge(parts: list[dict], num_members: int) -> dict:
    """The stages' parts, gathered into results.json's pieces."""
    out = {"attacks": {}, "members": [{} for _ in range(num_members)], "ensemble": {}, "evaluation": {},
           "cache_hits": {"surrogates": False, "transfer": {}}, "histograms": {}}
    for part in parts:
        for key in ("attacks", "ensemble", "evaluation", "histograms"):
            out[key] |= part.get(key, {})
        for attack, ras in part.get("members", {}).items():
            for m, ra in enumerate(ras):
                out["members"][m][attack] = ra
        hits = part.get("cache_hits", {})
        out["cache_hits"]["surrogates"] = hits.get("surrogates", out["cache_hits"]["surrogates"])
        out["cache_hits"]["transfer"] |= hits.get("transfer", {})
    return out


def _evaluation_key(run_dir: Path, cfg: DictConfig, images: Images) -> str:
    """What an evaluation's results depend on: the members' bytes, the attack settings, the sample."""
    # where the cache lives and which files losses came from change no figure
    attack = {k: v for k, v in OmegaConf.to_container(cfg.attack, resolve=True).items()
              if k not in ("cache_dir", "loss_files")}
    for k in ("transfer_loss", "whitebox_loss"):  # a searched loss's expression, not its file's path
        attack[k] = loss_identity(attack[k])
    combine, trim = ensemble_rule(cfg)  # how the members combine changes every figure of the ensemble
    return content_key({"members": members_digest(run_dir), "attack": attack, "data": cfg.data.name, "split": images.split,
                        "indices": images.indices.tolist(), "version": 2,
                        **({"ensemble": {"combine": combine, "trim": trim}} if combine != "mean_logits" else {})})


def _rescore_clean(results: dict, run_dir: Path, target, data: ImageDataset, cfg: DictConfig, split: str,
                   device: torch.device) -> None:
    """Clean accuracy of the ensemble and its members on the whole of ``split``, where results.json holds
    it on another split's images (a study's trial, scored on validation images, evaluated on the test
    sample): every figure of the file is then measured on one split."""
    whole = held_out_images(cfg, data, split)
    x, y = whole.tensors(data)
    x, y = to_float(x).to(device), y.to(device)
    results["ensemble"]["clean_accuracy"] = accuracy(target, x, y)
    numbers = member_numbers(run_dir)
    by_member = {m.get("member"): m for m in results.get("members", [])}
    for number, model in zip(numbers, target.members):
        if number in by_member:
            by_member[number]["clean_accuracy"] = accuracy(model, x, y)
    results["images"]["clean_accuracy"] = whole.describe()


def _load_partial(path: Path, key: str) -> dict[str, dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("stages"), dict):
        return {}  # another evaluation's stages (other members or settings): start afresh
    return doc["stages"]


def read_results(run_dir: Path) -> dict:
    """A run's ``results.json``; a missing or unreadable one raises :class:`ConfigError`."""
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"run_dir: {path} is missing; the run's training did not finish") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"run_dir: {path} is not readable JSON ({type(exc).__name__}); the file is damaged, "
                          "train the run again") from None
    if not isinstance(results, dict) or not isinstance(results.get("ensemble"), dict):
        raise ConfigError(f"run_dir: {path} is not a results file of fedrobust train (no 'ensemble' object)")
    return results


def evaluate_run(run_dir: str | Path, cfg: DictConfig, data: ImageDataset | None = None, *,
                 into: str | None = None, reuse: bool = False) -> dict:
    """Attack the run's ensemble; update ``results.json`` and TensorBoard; return the results.

    Runs the registered stages (:func:`~fedrobust.evaluation.stages.build_stages`)
    in order, storing each one's part in ``evaluation.partial.json`` as soon
    as it finishes; stages that an interrupted evaluation of the same members
    and settings finished are reused. ``results.json`` is replaced atomically
    once, at the end, and keeps its training part.

    ``into`` names a folder of ``run_dir`` that receives this evaluation's
    files (``results.json`` with the run's training part, ``eval_sample.json``,
    TensorBoard) instead of ``run_dir`` itself: a study evaluates its front's
    trials on the test sample into ``test/``, next to their validation figures.
    With ``reuse``, a finished evaluation of the same members, settings and
    sample there is returned as it is.
    """
    run_dir = Path(run_dir)
    out = run_dir / into if into else run_dir
    t_start = time.perf_counter()
    a = cfg.attack
    check_complete(run_dir)
    results = read_results(run_dir)
    device = resolve_device(cfg.train.device)
    data = data or dataset_of(cfg)
    images = evaluation_images(cfg, data)
    key = _evaluation_key(run_dir, cfg, images)
    if reuse and out != run_dir and (out / "results.json").is_file():
        previous = read_results(out)
        if previous.get("evaluation", {}).get("key") == key:
            log.info("evaluation: reused %s (same members, settings and sample)", out / "results.json")
            return previous
    out.mkdir(parents=True, exist_ok=True)
    target = load_ensemble(run_dir, device, cfg)
    numbers = member_numbers(run_dir)  # a screened run's members need not be 0..M-1
    write_json(out / "eval_sample.json", {"split": images.split, "seed": a.sample_seed,
                                          "indices": images.indices.tolist(), "images": images.describe()["text"]})
    num_members = len(target.members)
    log.info("evaluation: %s; eps %.4f, %d member(s)", images.describe()["text"], a.eps, num_members)

    partial_path = out / PARTIAL
    done = _load_partial(partial_path, key)
    kept = load_fates(out, key)
    for stage_id, entry in list(done.items()):  # a finished stage whose fates are missing runs again
        if any(record not in kept for record in entry.get("fates", [])):
            del done[stage_id]
    stages = build_stages(a, num_members)
    reused = [s.id for s in stages if s.id in done]
    if reused:
        log.info("evaluation: resuming; %d finished stage(s) reused from %s: %s", len(reused), PARTIAL, ", ".join(reused))
    with Board(out) as board:
        inputs = _Inputs(cfg, data, device, target, images, board)
        bar = progress_bar(stages, desc="evaluate", enabled=cfg.train.progress)
        for stage in bar:
            if stage.id in done:
                log.info("%s: reused from the interrupted evaluation (%.1fs then)", stage.id, done[stage.id]["seconds"])
                continue
            bar.set_postfix_str(stage.id, refresh=interactive())
            t0 = time.perf_counter()
            part = stage.run(**inputs.for_stage(stage))
            fates = part.pop("fates", {})
            for record, arrays in fates.items():
                save_fate(out, record, key, images.split, images.indices, **arrays)
            done[stage.id] = {"part": part, "seconds": round(time.perf_counter() - t0, 3), "fates": sorted(fates)}
            write_json(partial_path, {"key": key, "stages": done})
            log.info("%s done in %.1fs", stage.id, done[stage.id]["seconds"])
        bar.close()

        merged = _merge([done[s.id]["part"] for s in stages], num_members)
        attacks, member_ra = merged["attacks"], merged["members"]
        clean = inputs["clean"]
        save_fate(out, "clean", key, images.split, images.indices, ensemble=clean["ensemble"].cpu().numpy(),
                  members=np.stack([c.cpu().numpy() for c in clean["members"]]) if clean["members"] else None)
        stored = load_fates(out, key)
        records = {r: stored[r] for s in stages for r in done[s.id].get("fates", []) if r in stored}  # stage order
        # one budget per union: the L-inf attacks at attack.eps; the L2 ones at attack.eps_l2 (names ending _l2),
        # where at least two of them ran
        ensemble_unions, member_unions = {}, []
        for suffix, norm, eps in (("", "linf", a.eps), ("_l2", "l2", a.eps_l2)):
            same_budget = {r: d for r, d in records.items()
                           if attacks.get(r, {}).get("norm", "linf") == norm and attacks.get(r, {}).get("eps") == eps}
            if suffix and len(same_budget) < 2:
                continue
            ens, mem = unions(same_budget)
            ensemble_unions |= {name + suffix: u for name, u in ens.items()}
            for m, u in enumerate(mem):
                if m == len(member_unions):
                    member_unions.append({})
                member_unions[m] |= {name + suffix: v for name, v in u.items()}
        transfer, query = attacks[f"transfer_{a.transfer}"], attacks[f"query_{a.query}"]
        clean_fig = figure(clean["ensemble"].cpu().numpy())
        ensemble = {
            "clean_accuracy_sample": clean_fig["robust_accuracy"],
            "robust_accuracy": {"transfer": transfer["robust_accuracy"], "query": query["robust_accuracy"]},
            # 95% Wilson intervals of the figures above, over the sample's images
            "intervals": {"clean_accuracy_sample": clean_fig["interval"], "transfer": transfer.get("interval"),
                          "query": query.get("interval")},
            "unions": ensemble_unions,
            "attacks": attacks,
            **merged["ensemble"],
        }
        evaluation = {
            "num_samples": len(images.indices), "sample_seed": a.sample_seed, "split": images.split, "key": key,
            "eps": a.eps, "primary_transfer": a.transfer,
            "primary_query": a.query, "surrogates": list(a.surrogates) if a.surrogates is not None else None,
            **merged["evaluation"], "cache_hits": merged["cache_hits"],
            "seconds": {s.id: done[s.id]["seconds"] for s in stages}, "resumed_stages": reused,
            "total_seconds": round(time.perf_counter() - t_start, 2),
        }
        results["ensemble"].update(ensemble)
        by_member = {m["member"]: m for m in results.get("members", [])}
        n = len(images.indices)
        for k, ras in enumerate(member_ra):  # k: the position among the loaded members; numbers[k] its number
            row = by_member.setdefault(numbers[k], {"member": numbers[k]})
            row["robust_accuracy"] = ras
            row["robust_accuracy_interval"] = {name: interval_of(ra, n) for name, ra in ras.items()}
            if k < len(member_unions):
                row["unions"] = member_unions[k]
        results["members"] = [by_member[k] for k in sorted(by_member)]
        results["evaluation"] = evaluation
        results["attack_config"] = OmegaConf.to_container(cfg.attack, resolve=True)
        # which images each figure was measured on: "evaluation" covers the sample's figures (clean and robust
        # accuracies on the sample, every attack, the members' robust accuracies, TSR, smoothness)
        results.setdefault("images", {})["evaluation"] = images.describe()
        rule = target.combine
        evaluation["combine"] = rule  # how the members were combined for every figure of the ensemble here
        if (results["images"].get("clean_accuracy", {}).get("split", images.split) != images.split
                or results["ensemble"].get("combine", "mean_logits") != rule):
            _rescore_clean(results, run_dir, target, data, cfg, images.split, device)
        results["ensemble"]["combine"] = rule
        results.setdefault("defence", {})["combine"] = rule
        write_json(out / "results.json", results)
        partial_path.unlink(missing_ok=True)
        for stale in (out / FATES).glob("*.npz"):  # records of an earlier evaluation with other settings
            if stale.stem not in records and stale.stem != "clean":
                stale.unlink(missing_ok=True)
        _tensorboard(board, ensemble, member_ra, merged["histograms"], numbers)
    log.info("evaluation: RA_T (%s) %.4f, RA_Q (%s) %.4f, clean %.4f on the sample; %.1fs",
             a.transfer, ensemble["robust_accuracy"]["transfer"], a.query, ensemble["robust_accuracy"]["query"],
             ensemble["clean_accuracy_sample"], evaluation["total_seconds"])
    log.info("\n%s", _table(ensemble, member_ra, numbers))
    log.info("\n%s", _timing_table(evaluation["seconds"], reused))
    return results


def _timing_table(seconds: dict[str, float], reused: list[str]) -> str:
    width = max(len(s) for s in seconds)
    lines = ["seconds per evaluation stage:"]
    lines += [f"  {s.ljust(width)}  {t:7.1f}" + ("  (reused)" if s in reused else "") for s, t in seconds.items()]
    return "\n".join(lines)


def _ci(entry: dict) -> str:
    ci = entry.get("interval")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def _table(ensemble: dict, member_ra: list[dict[str, float]], numbers: list[int]) -> str:
    names = list(ensemble["attacks"])
    head = ["attack", "ensemble RA", "95% interval"] + [f"member {numbers[k]}" for k in range(len(member_ra))]
    rows = [head]
    for n in names:
        e = ensemble["attacks"][n]
        rows.append([n, f"{e['robust_accuracy']:.4f}", _ci(e)] + [f"{r[n]:.4f}" if n in r else "-" for r in member_ra])
    for name, u in ensemble.get("unions", {}).items():
        rows.append([f"union: {name}", f"{u['robust_accuracy']:.4f}", _ci(u)] + ["-"] * len(member_ra))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, u in ensemble.get("unions", {}).items():
        lines.append(f"union {name}: robust only if no attack broke it, of {', '.join(u['attacks'])}")
    if "tsr" in ensemble:
        lines.append(f"TSR between members (PGD, EDLCM eq. 12): {ensemble['tsr']['value']:.2f}")
    if "smoothness" in ensemble:
        s = ensemble["smoothness"]
        lines.append(f"input-Hessian lambda_max: target median {s['lambda_max']['median']:.4g}, "
                     f"surrogates median {s['lambda_max_surrogates']['median']:.4g}; "
                     f"grad cosine surrogate/target mean {s['grad_cosine_surrogate_target']['mean']:.4f}")
    return "\n".join(lines)


def _tensorboard(board: Board, ensemble: dict, member_ra: list[dict[str, float]], histograms: dict[str, list[float]],
                 numbers: list[int]) -> None:
    tb = board.writer
    tb.add_scalar("robust_accuracy/transfer", ensemble["robust_accuracy"]["transfer"], 0)
    tb.add_scalar("robust_accuracy/query", ensemble["robust_accuracy"]["query"], 0)
    for name, e in ensemble["attacks"].items():
        tb.add_scalar(f"attack_ra/{name}", e["robust_accuracy"], 0)
        tb.add_scalar(f"attack_asr/{name}", e["asr"], 0)
        if "queries_used" in e:
            tb.add_scalar(f"queries_used/{name}", e["queries_used"]["mean"], 0)
    for k, ras in enumerate(member_ra):
        for name, ra in ras.items():
            tb.add_scalar(f"member_robust_accuracy/{name}_member{numbers[k]}", ra, 0)
    for name, u in ensemble.get("unions", {}).items():
        tb.add_scalar(f"union_ra/{name}", u["robust_accuracy"], 0)
    if "tsr" in ensemble:
        tb.add_scalar("tsr/members_pgd", ensemble["tsr"]["value"], 0)
    if "smoothness" in ensemble:
        smooth = ensemble["smoothness"]
        for tag, values in histograms.items():
            tb.add_histogram(tag, torch.tensor(values), 0)
        tb.add_scalar("smoothness/lambda_max_median", smooth["lambda_max"]["median"], 0)
        tb.add_scalar("smoothness/grad_cosine_mean", smooth["grad_cosine_surrogate_target"]["mean"], 0)
    board.hparam_metrics({"RA_T": ensemble["robust_accuracy"]["transfer"], "RA_Q": ensemble["robust_accuracy"]["query"],
                          **({"TSR": ensemble["tsr"]["value"]} if "tsr" in ensemble else {})})
