"""Evaluate a trained run: transfer, query and white-box attacks, TSR, smoothness.

``evaluate_run(run_dir, cfg)`` adds to ``results.json`` (under ``ensemble``
and each member) and to TensorBoard. Every target sees the same evaluation
sample (``attack.num_samples`` test images drawn with ``attack.sample_seed``,
saved by index in ``eval_sample.json``). Surrogates and transfer examples
come from the content-addressed cache when they exist.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..data import ImageDataset, load_dataset, to_float
from ..progress import interactive, progress as progress_bar
from ..run import load_ensemble
from ..training import resolve_device
from .cache import cache_root, content_key, load_tensors, save_tensors
from .gradient import CWA, MIFGSM, PGD, build_gradient_attack
from .metrics import accuracy, predict, transferability
from .smoothness import gradient_cosine, hessian_lambda_max
from .square import SquareAttack
from .surrogates import load_or_train_zoo, zoo_cache_path

__all__ = ["evaluate_run", "evaluation_sample", "prepare_transfer_artefacts"]

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


def evaluate_run(run_dir: str | Path, cfg: DictConfig, data: ImageDataset | None = None) -> dict:
    """Attack the run's ensemble; update ``results.json`` and TensorBoard; return the evaluation."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    a = cfg.attack
    device = resolve_device(cfg.train.device)
    data = data or load_dataset(cfg.data.name, cfg.data.root)
    target = load_ensemble(run_dir, device, cfg)
    members = list(target.members)
    idx = evaluation_sample(len(data.y_test), a.num_samples, a.sample_seed)
    (run_dir / "eval_sample.json").write_text(json.dumps({"seed": a.sample_seed, "indices": idx.tolist()}))
    x = to_float(data.x_test[idx]).to(device)
    y = data.y_test[idx].to(device)
    log.info("evaluation: %d test images (seed %d), eps %.4f, %d member(s)", len(idx), a.sample_seed, a.eps, len(members))

    attacks: dict[str, dict] = {}
    member_ra: list[dict[str, float]] = [{} for _ in members]
    timings: dict[str, float] = {}
    stages = ["surrogates", *(f"transfer:{n}" for n in a.transfer_attacks), *(f"query:{n}" for n in a.query_attacks),
              *(f"whitebox:{n}" for n in a.whitebox)] + (["tsr"] if a.tsr and len(members) > 1 else []) + (
              ["smoothness"] if a.hessian_samples > 0 else [])
    bar = progress_bar(stages, desc="evaluate", enabled=cfg.train.progress)
    zoo = zoo_key = None
    surrogate_acc = 0.0
    tsr_entry: dict | None = None
    smooth: dict | None = None
    lambda_values = cosine_values = None
    cache_hits = {"surrogates": False, "transfer": {}}
    for stage in bar:
        bar.set_postfix_str(stage, refresh=interactive())
        t0 = time.perf_counter()
        kind, _, name = stage.partition(":")
        if kind == "surrogates":
            zoo, zoo_key, cache_hits["surrogates"] = load_or_train_zoo(cfg, data, device)
            surrogate_acc = accuracy(zoo, x, y)
        elif kind == "transfer":
            x_adv, hit = _transfer_examples(name, zoo, zoo_key, x, y, idx, cfg)
            cache_hits["transfer"][name] = hit
            if hit:
                log.info("transfer %s: reused cached adversarial examples", name)
            ra = accuracy(target, x_adv, y)
            attacks[f"transfer_{name}"] = {"kind": "transfer", "robust_accuracy": ra, "asr": 1 - ra, "eps": a.eps, "norm": "linf",
                             "steps": a.transfer_steps, "loss": a.transfer_loss, "surrogates": len(zoo.members),
                             "surrogate_accuracy": accuracy(zoo, x_adv, y), "cached": hit}
            for m, model in enumerate(members):
                member_ra[m][f"transfer_{name}"] = accuracy(model, x_adv, y)
        elif kind == "query":
            norm = name.split("_")[1]
            eps = a.eps if norm == "linf" else a.eps_l2
            attack = SquareAttack(target, eps, norm, a.queries, a.p_init, a.square_loss, seed=a.seed)
            x_adv_parts, q_parts = [], []
            for i in range(0, len(x), a.batch_size):
                res = attack.run(x[i : i + a.batch_size], y[i : i + a.batch_size], progress=cfg.train.progress)
                x_adv_parts.append(res.x_adv)
                q_parts.append(res.queries)
            x_adv, queries = torch.cat(x_adv_parts), torch.cat(q_parts)
            fooled = predict(target, x_adv) != y
            ra = 1.0 - float(fooled.float().mean())
            attacks[f"query_{name}"] = {"kind": "query", "robust_accuracy": ra, "asr": 1 - ra, "eps": eps, "norm": norm,
                             "queries": a.queries, "loss": a.square_loss, "p_init": a.p_init,
                             "queries_used": {"mean": float(queries.float().mean()), "median": float(queries.float().median()),
                                              "mean_successful": float(queries[fooled].float().mean()) if fooled.any() else None,
                                              "max": int(queries.max())}}
            if a.per_member and name == a.query:
                for m, model in enumerate(members):
                    sq = SquareAttack(model, eps, norm, a.queries, a.p_init, a.square_loss, seed=a.seed)
                    member_ra[m][f"query_{name}"] = accuracy(model, _batched(sq, x, y, a.batch_size), y)
        elif kind == "whitebox":
            steps = a.apgd_steps if name == "apgd" else a.whitebox_steps
            attack = build_gradient_attack(name, target, a.eps, steps, a.whitebox_loss, seed=a.seed)
            ra = accuracy(target, _batched(attack, x, y, a.batch_size), y)
            attacks[f"whitebox_{name}"] = {"kind": "whitebox", "robust_accuracy": ra, "asr": 1 - ra, "eps": a.eps, "norm": "linf",
                             "steps": 1 if name == "fgsm" else steps, "loss": a.whitebox_loss}
        elif kind == "tsr":
            tsr, matrix = transferability(
                members, x, y, lambda src: (lambda xb, yb: _batched(PGD(src, a.eps, a.tsr_steps, seed=a.seed), xb, yb, a.batch_size)))
            tsr_entry = {"value": tsr, "matrix": matrix, "attack": "pgd", "steps": a.tsr_steps, "eps": a.eps}
        elif kind == "smoothness":
            n = min(a.hessian_samples, len(x))
            gen = torch.Generator().manual_seed(a.seed)
            lam_t = hessian_lambda_max(target, x[:n], y[:n], a.power_iters, generator=gen)
            lam_s = hessian_lambda_max(zoo, x[:n], y[:n], a.power_iters, generator=torch.Generator().manual_seed(a.seed))
            cos = gradient_cosine(zoo, target, x[:n], y[:n])
            smooth = {"lambda_max": _summary(lam_t), "lambda_max_surrogates": _summary(lam_s),
                      "grad_cosine_surrogate_target": _summary(cos), "power_iters": a.power_iters}
            lambda_values, cosine_values = lam_t, cos
        timings[stage] = round(time.perf_counter() - t0, 3)
        log.info("%s done in %.1fs", stage, timings[stage])
    bar.close()

    ensemble = {
        "clean_accuracy_sample": accuracy(target, x, y),
        "robust_accuracy": {
            "transfer": attacks[f"transfer_{a.transfer}"]["robust_accuracy"],
            "query": attacks[f"query_{a.query}"]["robust_accuracy"],
        },
        "attacks": attacks,
    }
    if tsr_entry is not None:
        ensemble["tsr"] = tsr_entry
    if smooth is not None:
        ensemble["smoothness"] = smooth
    evaluation = {
        "num_samples": len(idx), "sample_seed": a.sample_seed, "eps": a.eps, "primary_transfer": a.transfer,
        "primary_query": a.query, "surrogates": list(cfg.attack.surrogates) or None, "surrogate_zoo": zoo_key,
        "surrogate_clean_accuracy": surrogate_acc, "cache_hits": cache_hits,
        "seconds": timings, "total_seconds": round(time.perf_counter() - t_start, 2),
    }
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"ensemble": {}, "members": []}
    results["ensemble"].update(ensemble)
    by_member = {m["member"]: m for m in results.get("members", [])}
    for m, ras in enumerate(member_ra):
        by_member.setdefault(m, {"member": m})["robust_accuracy"] = ras
    results["members"] = [by_member[k] for k in sorted(by_member)]
    results["evaluation"] = evaluation
    results["attack_config"] = OmegaConf.to_container(cfg.attack, resolve=True)
    results_path.write_text(json.dumps(results, indent=2))
    _tensorboard(run_dir, ensemble, member_ra, lambda_values, cosine_values)
    log.info("evaluation: RA_T (%s) %.4f, RA_Q (%s) %.4f, clean %.4f on the sample; %.1fs",
             a.transfer, ensemble["robust_accuracy"]["transfer"], a.query, ensemble["robust_accuracy"]["query"],
             ensemble["clean_accuracy_sample"], evaluation["total_seconds"])
    log.info("\n%s", _table(ensemble, member_ra))
    return results


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


def _tensorboard(run_dir: Path, ensemble: dict, member_ra: list[dict[str, float]], lambda_values, cosine_values) -> None:
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
            tb.add_histogram("smoothness/lambda_max", lambda_values.cpu(), 0)
            tb.add_histogram("smoothness/grad_cosine", cosine_values.cpu(), 0)
            tb.add_scalar("smoothness/lambda_max_median", smooth["lambda_max"]["median"], 0)
            tb.add_scalar("smoothness/grad_cosine_mean", smooth["grad_cosine_surrogate_target"]["mean"], 0)
