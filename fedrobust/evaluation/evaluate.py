"""Evaluate a trained run: transfer, query and white-box attacks, TSR, smoothness.

``evaluate_run(run_dir, cfg)`` adds to ``results.json`` (under ``ensemble``
and each member) and to TensorBoard. Every target sees the same evaluation
sample (``attack.num_samples`` test images drawn with ``attack.sample_seed``,
saved by index in ``eval_sample.json``). Surrogates and transfer examples
come from the content-addressed cache when they exist.

The evaluation runs as stages (:func:`evaluation_stages`). Each finished
stage's results are kept in ``RUN_DIR/evaluation.partial.json``, under a key
of the member checkpoints, the attack settings and the sample, so an
evaluation that was interrupted resumes at the next stage when run again
with the same settings. ``results.json`` is replaced atomically, once, at the
end; its training part is never lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..atomic import write_json
from ..config import ConfigError
from ..data import ImageDataset, load_dataset, to_float
from ..progress import interactive, progress as progress_bar
from ..run import check_complete, load_ensemble, member_files
from ..training import resolve_device
from .cache import cache_root, content_key, load_tensors, save_tensors
from .gradient import CWA, MIFGSM, PGD, build_gradient_attack
from .metrics import accuracy, predict, transferability
from .smoothness import gradient_cosine, hessian_lambda_max
from .square import SquareAttack
from .surrogates import load_or_train_zoo, zoo_cache_path

__all__ = ["evaluate_run", "evaluation_sample", "evaluation_stages", "prepare_transfer_artefacts", "read_results"]

log = logging.getLogger("fedrobust")


def evaluation_sample(num_test: int, num_samples: int, seed: int) -> np.ndarray:
    """Fixed test indices: ``num_samples`` drawn without replacement (all of them if fewer), sorted."""
    if num_samples >= num_test:
        return np.arange(num_test)
    return np.sort(np.random.default_rng(seed).choice(num_test, size=num_samples, replace=False))


def _batched(fn, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _transfer_attack(name: str, zoo, a: DictConfig):
    if name == "cwa":
        return CWA(list(zoo.members), a.eps, a.transfer_steps, loss=a.transfer_loss)
    if name == "mifgsm":
        return MIFGSM(zoo, a.eps, a.transfer_steps, loss=a.transfer_loss)
    return PGD(zoo, a.eps, a.transfer_steps, loss=a.transfer_loss, seed=a.seed)


def _transfer_cache_path(name: str, zoo_key: str, idx: np.ndarray, cfg: DictConfig) -> Path:
    a = cfg.attack
    key = content_key({
        "kind": "transfer", "attack": name, "zoo": zoo_key, "indices": idx.tolist(), "eps": a.eps,
        "steps": a.transfer_steps, "loss": a.transfer_loss, "seed": a.seed, "version": 1,
    })
    return cache_root(a.cache_dir) / "transfer" / f"{key}.pt"


def _transfer_examples(name, zoo, zoo_key, x, y, idx, cfg) -> tuple[torch.Tensor, bool]:
    a = cfg.attack
    path = _transfer_cache_path(name, zoo_key, idx, cfg)
    cached = load_tensors(path)
    if cached is not None and cached["x_adv"].shape == x.shape:
        return cached["x_adv"].to(x.device), True
    x_adv = _batched(_transfer_attack(name, zoo, a), x, y, a.batch_size)
    save_tensors(path, {"x_adv": x_adv}, {"attack": name, "zoo": zoo_key, "eps": a.eps, "n": len(idx)})
    return x_adv, False


def prepare_transfer_artefacts(cfg: DictConfig, data: ImageDataset | None = None) -> list[Path]:
    """Train (or find) the surrogate zoo and craft (or find) every transfer attack's examples on the
    evaluation sample, so that every later evaluation on this data reuses them; their cache files."""
    a = cfg.attack
    device = resolve_device(cfg.train.device)
    data = data or load_dataset(cfg.data.name, cfg.data.root)
    zoo, zoo_key, _ = load_or_train_zoo(cfg, data, device)
    idx = evaluation_sample(len(data.y_test), a.num_samples, a.sample_seed)
    x, y = to_float(data.x_test[idx]).to(device), data.y_test[idx].to(device)
    paths = [zoo_cache_path(cfg, zoo_key)]
    for name in a.transfer_attacks:
        _transfer_examples(name, zoo, zoo_key, x, y, idx, cfg)
        paths.append(_transfer_cache_path(name, zoo_key, idx, cfg))
    return paths


def _summary(values: torch.Tensor) -> dict:
    v = values.detach().cpu().double()
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist() if len(v) else [0, 0, 0]
    return {"mean": float(v.mean()), "p10": q[0], "median": q[1], "p90": q[2], "n": len(v)}


# ---------------------------------------------------------------------------
# Stages. Each takes the evaluation context and returns its own part of the
# results, as JSON: ``attacks`` (entries of results.json's ensemble.attacks),
# ``members`` (attack name -> robust accuracy per member), ``ensemble`` (other
# ensemble entries), ``evaluation`` and ``cache_hits`` (bookkeeping), and
# ``histograms`` (values for TensorBoard). A finished stage's part is kept in
# ``evaluation.partial.json`` at once, so an interrupted evaluation resumes at
# the next stage.
# ---------------------------------------------------------------------------

PARTIAL = "evaluation.partial.json"


class _Context:
    """What the stages read: config, data, target, sample; the zoo is loaded (or trained) once, on first use."""

    def __init__(self, cfg: DictConfig, data: ImageDataset, device: torch.device, target, idx: np.ndarray) -> None:
        self.cfg, self.a, self.data, self.device, self.target, self.idx = cfg, cfg.attack, data, device, target, idx
        self.members = list(target.members)
        self.x = to_float(data.x_test[idx]).to(device)
        self.y = data.y_test[idx].to(device)
        self._zoo = None

    def zoo(self):
        if self._zoo is None:
            self._zoo = load_or_train_zoo(self.cfg, self.data, self.device)
        return self._zoo


def _stage_surrogates(ctx: _Context, _name: str) -> dict:
    zoo, key, hit = ctx.zoo()
    return {"evaluation": {"surrogate_zoo": key, "surrogate_clean_accuracy": accuracy(zoo, ctx.x, ctx.y)},
            "cache_hits": {"surrogates": hit}}


def _stage_transfer(ctx: _Context, name: str) -> dict:
    a, (zoo, zoo_key, _) = ctx.a, ctx.zoo()
    x_adv, hit = _transfer_examples(name, zoo, zoo_key, ctx.x, ctx.y, ctx.idx, ctx.cfg)
    if hit:
        log.info("transfer %s: reused cached adversarial examples", name)
    ra = accuracy(ctx.target, x_adv, ctx.y)
    entry = {"kind": "transfer", "robust_accuracy": ra, "asr": 1 - ra, "eps": a.eps, "norm": "linf",
             "steps": a.transfer_steps, "loss": a.transfer_loss, "surrogates": len(zoo.members),
             "surrogate_accuracy": accuracy(zoo, x_adv, ctx.y), "cached": hit}
    return {"attacks": {f"transfer_{name}": entry},
            "members": {f"transfer_{name}": [accuracy(m, x_adv, ctx.y) for m in ctx.members]},
            "cache_hits": {"transfer": {name: hit}}}


def _stage_query(ctx: _Context, name: str) -> dict:
    a, x, y = ctx.a, ctx.x, ctx.y
    norm = name.split("_")[1]
    eps = a.eps if norm == "linf" else a.eps_l2
    attack = SquareAttack(ctx.target, eps, norm, a.queries, a.p_init, a.square_loss, seed=a.seed)
    parts = [attack.run(x[i : i + a.batch_size], y[i : i + a.batch_size], progress=ctx.cfg.train.progress)
             for i in range(0, len(x), a.batch_size)]
    x_adv, queries = torch.cat([r.x_adv for r in parts]), torch.cat([r.queries for r in parts])
    fooled = predict(ctx.target, x_adv) != y
    ra = 1.0 - float(fooled.float().mean())
    entry = {"kind": "query", "robust_accuracy": ra, "asr": 1 - ra, "eps": eps, "norm": norm,
             "queries": a.queries, "loss": a.square_loss, "p_init": a.p_init,
             "queries_used": {"mean": float(queries.float().mean()), "median": float(queries.float().median()),
                              "mean_successful": float(queries[fooled].float().mean()) if fooled.any() else None,
                              "max": int(queries.max())}}
    part = {"attacks": {f"query_{name}": entry}}
    if a.per_member and name == a.query:
        ras = []
        for model in ctx.members:
            sq = SquareAttack(model, eps, norm, a.queries, a.p_init, a.square_loss, seed=a.seed)
            ras.append(accuracy(model, _batched(sq, x, y, a.batch_size), y))
        part["members"] = {f"query_{name}": ras}
    return part


def _stage_whitebox(ctx: _Context, name: str) -> dict:
    a = ctx.a
    steps = a.apgd_steps if name == "apgd" else a.whitebox_steps
    attack = build_gradient_attack(name, ctx.target, a.eps, steps, a.whitebox_loss, seed=a.seed)
    ra = accuracy(ctx.target, _batched(attack, ctx.x, ctx.y, a.batch_size), ctx.y)
    return {"attacks": {f"whitebox_{name}": {"kind": "whitebox", "robust_accuracy": ra, "asr": 1 - ra, "eps": a.eps,
                                             "norm": "linf", "steps": 1 if name == "fgsm" else steps,
                                             "loss": a.whitebox_loss}}}


def _stage_tsr(ctx: _Context, _name: str) -> dict:
    a = ctx.a
    tsr, matrix = transferability(
        ctx.members, ctx.x, ctx.y,
        lambda src: (lambda xb, yb: _batched(PGD(src, a.eps, a.tsr_steps, seed=a.seed), xb, yb, a.batch_size)))
    return {"ensemble": {"tsr": {"value": tsr, "matrix": matrix, "attack": "pgd", "steps": a.tsr_steps, "eps": a.eps}}}


def _stage_smoothness(ctx: _Context, _name: str) -> dict:
    a, (zoo, _, _) = ctx.a, ctx.zoo()
    n = min(a.hessian_samples, len(ctx.x))
    x, y = ctx.x[:n], ctx.y[:n]
    lam_t = hessian_lambda_max(ctx.target, x, y, a.power_iters, generator=torch.Generator().manual_seed(a.seed))
    lam_s = hessian_lambda_max(zoo, x, y, a.power_iters, generator=torch.Generator().manual_seed(a.seed))
    cos = gradient_cosine(zoo, ctx.target, x, y)
    smooth = {"lambda_max": _summary(lam_t), "lambda_max_surrogates": _summary(lam_s),
              "grad_cosine_surrogate_target": _summary(cos), "power_iters": a.power_iters}
    return {"ensemble": {"smoothness": smooth},
            "histograms": {"smoothness/lambda_max": lam_t.cpu().tolist(), "smoothness/grad_cosine": cos.cpu().tolist()}}


_STAGES = {"surrogates": _stage_surrogates, "transfer": _stage_transfer, "query": _stage_query,
           "whitebox": _stage_whitebox, "tsr": _stage_tsr, "smoothness": _stage_smoothness}


def evaluation_stages(a: DictConfig, num_members: int) -> list[str]:
    """The stages an evaluation runs, in order."""
    return ["surrogates", *(f"transfer:{n}" for n in a.transfer_attacks), *(f"query:{n}" for n in a.query_attacks),
            *(f"whitebox:{n}" for n in a.whitebox)] + (["tsr"] if a.tsr and num_members > 1 else []) + (
            ["smoothness"] if a.hessian_samples > 0 else [])


def _evaluation_key(run_dir: Path, cfg: DictConfig, idx: np.ndarray) -> str:
    """What an evaluation's results depend on: the members' bytes, the attack settings, the sample."""
    h = hashlib.sha256()
    for path in member_files(run_dir):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    attack = {k: v for k, v in OmegaConf.to_container(cfg.attack, resolve=True).items() if k != "cache_dir"}
    return content_key({"members": h.hexdigest(), "attack": attack, "data": cfg.data.name, "indices": idx.tolist(),
                        "version": 1})


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


def evaluate_run(run_dir: str | Path, cfg: DictConfig, data: ImageDataset | None = None) -> dict:
    """Attack the run's ensemble; update ``results.json`` and TensorBoard; return the results.

    Stages that an interrupted evaluation of the same members and settings
    finished are reused (``evaluation.partial.json``). ``results.json`` is
    replaced atomically once, at the end, and keeps its training part.
    """
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    a = cfg.attack
    check_complete(run_dir)
    results = read_results(run_dir)
    device = resolve_device(cfg.train.device)
    data = data or load_dataset(cfg.data.name, cfg.data.root)
    target = load_ensemble(run_dir, device, cfg)
    idx = evaluation_sample(len(data.y_test), a.num_samples, a.sample_seed)
    write_json(run_dir / "eval_sample.json", {"seed": a.sample_seed, "indices": idx.tolist()})
    ctx = _Context(cfg, data, device, target, idx)
    log.info("evaluation: %d test images (seed %d), eps %.4f, %d member(s)", len(idx), a.sample_seed, a.eps,
             len(ctx.members))

    key = _evaluation_key(run_dir, cfg, idx)
    partial_path = run_dir / PARTIAL
    done = _load_partial(partial_path, key)
    stages = evaluation_stages(a, len(ctx.members))
    reused = [s for s in stages if s in done]
    if reused:
        log.info("evaluation: resuming; %d finished stage(s) reused from %s: %s", len(reused), PARTIAL, ", ".join(reused))
    bar = progress_bar(stages, desc="evaluate", enabled=cfg.train.progress)
    for stage in bar:
        if stage in done:
            log.info("%s: reused from the interrupted evaluation (%.1fs then)", stage, done[stage]["seconds"])
            continue
        bar.set_postfix_str(stage, refresh=interactive())
        t0 = time.perf_counter()
        kind, _, name = stage.partition(":")
        part = _STAGES[kind](ctx, name)
        done[stage] = {"part": part, "seconds": round(time.perf_counter() - t0, 3)}
        write_json(partial_path, {"key": key, "stages": done})
        log.info("%s done in %.1fs", stage, done[stage]["seconds"])
    bar.close()

    attacks: dict[str, dict] = {}
    member_ra: list[dict[str, float]] = [{} for _ in ctx.members]
    ensemble_extra: dict = {}
    evaluation_extra: dict = {}
    cache_hits: dict = {"surrogates": False, "transfer": {}}
    histograms: dict[str, list[float]] = {}
    for stage in stages:
        part = done[stage]["part"]
        attacks |= part.get("attacks", {})
        for attack, ras in part.get("members", {}).items():
            for m, ra in enumerate(ras):
                member_ra[m][attack] = ra
        ensemble_extra |= part.get("ensemble", {})
        evaluation_extra |= part.get("evaluation", {})
        hits = part.get("cache_hits", {})
        cache_hits["surrogates"] = hits.get("surrogates", cache_hits["surrogates"])
        cache_hits["transfer"] |= hits.get("transfer", {})
        histograms |= part.get("histograms", {})

    ensemble = {
        "clean_accuracy_sample": accuracy(target, ctx.x, ctx.y),
        "robust_accuracy": {
            "transfer": attacks[f"transfer_{a.transfer}"]["robust_accuracy"],
            "query": attacks[f"query_{a.query}"]["robust_accuracy"],
        },
        "attacks": attacks,
        **ensemble_extra,
    }
    evaluation = {
        "num_samples": len(idx), "sample_seed": a.sample_seed, "eps": a.eps, "primary_transfer": a.transfer,
        "primary_query": a.query, "surrogates": list(a.surrogates) if a.surrogates is not None else None,
        **evaluation_extra, "cache_hits": cache_hits,
        "seconds": {s: done[s]["seconds"] for s in stages}, "resumed_stages": reused,
        "total_seconds": round(time.perf_counter() - t_start, 2),
    }
    results["ensemble"].update(ensemble)
    by_member = {m["member"]: m for m in results.get("members", [])}
    for m, ras in enumerate(member_ra):
        by_member.setdefault(m, {"member": m})["robust_accuracy"] = ras
    results["members"] = [by_member[k] for k in sorted(by_member)]
    results["evaluation"] = evaluation
    results["attack_config"] = OmegaConf.to_container(cfg.attack, resolve=True)
    write_json(run_dir / "results.json", results)
    partial_path.unlink(missing_ok=True)
    _tensorboard(run_dir, ensemble, member_ra, histograms)
    log.info("evaluation: RA_T (%s) %.4f, RA_Q (%s) %.4f, clean %.4f on the sample; %.1fs",
             a.transfer, ensemble["robust_accuracy"]["transfer"], a.query, ensemble["robust_accuracy"]["query"],
             ensemble["clean_accuracy_sample"], evaluation["total_seconds"])
    log.info("\n%s", _table(ensemble, member_ra))
    log.info("\n%s", _timing_table(evaluation["seconds"], reused))
    return results


def _timing_table(seconds: dict[str, float], reused: list[str]) -> str:
    width = max(len(s) for s in seconds)
    lines = ["seconds per evaluation stage:"]
    lines += [f"  {s.ljust(width)}  {t:7.1f}" + ("  (reused)" if s in reused else "") for s, t in seconds.items()]
    return "\n".join(lines)


def _table(ensemble: dict, member_ra: list[dict[str, float]]) -> str:
    names = list(ensemble["attacks"])
    head = ["attack", "ensemble RA"] + [f"member {m}" for m in range(len(member_ra))]
    rows = [head]
    for n in names:
        e = ensemble["attacks"][n]
        rows.append([n, f"{e['robust_accuracy']:.4f}"] + [f"{r[n]:.4f}" if n in r else "-" for r in member_ra])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "tsr" in ensemble:
        lines.append(f"TSR between members (PGD, EDLCM eq. 12): {ensemble['tsr']['value']:.2f}")
    if "smoothness" in ensemble:
        s = ensemble["smoothness"]
        lines.append(f"input-Hessian lambda_max: target median {s['lambda_max']['median']:.4g}, "
                     f"surrogates median {s['lambda_max_surrogates']['median']:.4g}; "
                     f"grad cosine surrogate/target mean {s['grad_cosine_surrogate_target']['mean']:.4f}")
    return "\n".join(lines)


def _tensorboard(run_dir: Path, ensemble: dict, member_ra: list[dict[str, float]], histograms: dict[str, list[float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as tb:
        tb.add_scalar("robust_accuracy/transfer", ensemble["robust_accuracy"]["transfer"], 0)
        tb.add_scalar("robust_accuracy/query", ensemble["robust_accuracy"]["query"], 0)
        for name, e in ensemble["attacks"].items():
            tb.add_scalar(f"attack_ra/{name}", e["robust_accuracy"], 0)
            tb.add_scalar(f"attack_asr/{name}", e["asr"], 0)
            if "queries_used" in e:
                tb.add_scalar(f"queries_used/{name}", e["queries_used"]["mean"], 0)
        for m, ras in enumerate(member_ra):
            for name, ra in ras.items():
                tb.add_scalar(f"member_robust_accuracy/{name}_member{m}", ra, 0)
        if "tsr" in ensemble:
            tb.add_scalar("tsr/members_pgd", ensemble["tsr"]["value"], 0)
        if "smoothness" in ensemble:
            smooth = ensemble["smoothness"]
            for tag, values in histograms.items():
                tb.add_histogram(tag, torch.tensor(values), 0)
            tb.add_scalar("smoothness/lambda_max_median", smooth["lambda_max"]["median"], 0)
            tb.add_scalar("smoothness/grad_cosine_mean", smooth["grad_cosine_surrogate_target"]["mean"], 0)
