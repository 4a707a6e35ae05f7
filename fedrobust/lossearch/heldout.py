"""The found losses on held-out test images (paper 004, Questions 1 and 2).

The search saw only validation images; here every figure is measured on
``loss_search.test_images`` test images (default ``attack.num_samples``,
drawn with ``attack.sample_seed``: the run's own evaluation sample), with the
worst case kept, as in ``fedrobust evaluate``:

* the main table: each hand-made loss and each hall-of-fame loss under
  PGD-10 (the search's attack), and the best-by-search-fitness loss and the
  hand-made ones under PGD-100 and APGD;
* the transfer table (Question 2): the best loss against cross-entropy on
  another model (every member alone, and the ensemble, whichever the search
  did not target) and at other budgets.

Every comparison of a found loss with cross-entropy is paired, image by
image on the same images (:func:`fedrobust.stats.paired`): the gain in
points (robust under cross-entropy's attack, broken under the found loss's,
minus the reverse), its 95% interval and McNemar's exact p-value.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json, write_text
from ..attacks.losses import BUILTIN
from ..attacks import APGD, PGD, robust_images
from ..attacks.expression import SearchedLoss
from ..data import to_float
from ..runs.cache import content_key
from ..runs.images import Images, evaluation_sample, held_out_images
from ..stats import paired

__all__ = ["measure_heldout"]

log = logging.getLogger("fedrobust")


def _robust(model, attack, x, y, batch_size: int) -> np.ndarray:
    return robust_images(model, attack, x, y, batch_size).robust.cpu().numpy()


def _ra(mask: np.ndarray) -> float:
    return round(float(mask.mean()), 6)


def _gain(ce: np.ndarray, found: np.ndarray) -> dict[str, Any]:
    """The found loss against cross-entropy on the same images: the gain (ce - found) in points, paired."""
    t = paired(ce, found)
    return {"gain_points": round(100 * t.difference, 2), "interval_points": [round(100 * v, 2) for v in t.interval],
            "p_value": float(f"{t.p_value:.4g}"), "only_ce_robust": t.only_a, "only_found_robust": t.only_b}


def measure_heldout(search, fame: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The tables (also written to ``heldout.json`` and ``heldout.md``); each hall-of-fame entry gets its
    ``test_robust_accuracy``. A complete search run again reuses its tables when nothing they depend on changed."""
    cfg, s = search.cfg, search.s
    a = cfg.attack
    whole = held_out_images(cfg, search.data, "test")
    n = s.test_images or a.num_samples
    images = Images("test", whole.indices[evaluation_sample(whole.pool, n, a.sample_seed)], whole.pool, a.sample_seed)
    key = content_key({"search": search.key, "fame": [e["expression"] for e in fame], "indices": images.indices.tolist(),
                       "settings": [s.test_images, s.long_steps, s.apgd_steps, s.test_eps, a.batch_size], "version": 2})
    saved = _saved(out / "heldout.json", key)
    if saved is not None:
        for entry, ra in zip(fame, saved["fame_test_robust_accuracy"]):
            entry["test_robust_accuracy"] = ra
        log.info("held-out tables unchanged: reused %s", out / "heldout.json")
        return saved
    x, y = images.tensors(search.data)
    x, y = to_float(x).to(search.device), y.to(search.device)
    model, eps, bs, seed = search.model, search.eps, a.batch_size, s.attack_seed
    best = SearchedLoss.parse(fame[0]["expression"])
    losses: dict[str, Any] = {name: name for name in BUILTIN}
    rows, ce_masks = [], {}
    long, apgd = f"pgd{s.long_steps}", f"apgd{s.apgd_steps}"
    for name, loss in losses.items():
        masks = {f"pgd{s.steps}": _robust(model, PGD(model, eps, s.steps, loss=loss, seed=seed), x, y, bs),
                 long: _robust(model, PGD(model, eps, s.long_steps, loss=loss, seed=seed), x, y, bs),
                 apgd: _robust(model, APGD(model, eps, s.apgd_steps, loss=loss, seed=seed), x, y, bs)}
        if name == "ce":
            ce_masks = masks
        rows.append({"loss": name, "search_fitness": None, **{k: _ra(v) for k, v in masks.items()}})
    for entry in fame:
        loss = SearchedLoss.parse(entry["expression"])
        masks = {f"pgd{s.steps}": _robust(model, PGD(model, eps, s.steps, loss=loss, seed=seed), x, y, bs)}
        if entry is fame[0]:
            masks[long] = _robust(model, PGD(model, eps, s.long_steps, loss=loss, seed=seed), x, y, bs)
            masks[apgd] = _robust(model, APGD(model, eps, s.apgd_steps, loss=loss, seed=seed), x, y, bs)
        entry["test_robust_accuracy"] = _ra(masks[f"pgd{s.steps}"])
        rows.append({"loss": f"found #{entry['rank']}: {entry['infix']}", "search_fitness": entry["search_fitness"],
                     **{k: _ra(v) for k, v in masks.items()},
                     "vs_ce": {k: _gain(ce_masks[k], v) for k, v in masks.items()}})
    # Question 2: the same loss on another model and at other budgets (PGD-steps, as in the search)
    others = [("ensemble", search.ensemble)] + [(f"member:{m}", mem) for m, mem in enumerate(search.ensemble.members)]
    transfer = []
    for where, target in others:
        if where == s.target:
            continue
        transfer.append(_pair(f"{where} (eps {eps:g})", target, eps, best, x, y, s, bs, seed))
    for e in (s.test_eps if s.test_eps is not None else [eps / 2, min(2 * eps, 0.99)]):
        transfer.append(_pair(f"{s.target} (eps {e:g})", model, e, best, x, y, s, bs, seed))
    result = {"key": key, "fame_test_robust_accuracy": [e["test_robust_accuracy"] for e in fame],
              "images": images.describe(), "indices": images.indices.tolist(), "eps": eps, "target": s.target,
              "best": {"expression": fame[0]["expression"], "infix": fame[0]["infix"]}, "table": rows,
              "transfer": transfer}
    write_json(out / "heldout.json", result)
    write_text(out / "heldout.md", _markdown(result, s))
    log.info("held-out (%s): PGD-%d robust accuracy ce %.4f, best found %.4f", images.describe()["text"], s.steps,
             rows[0][f"pgd{s.steps}"], fame[0]["test_robust_accuracy"])
    return result


def _saved(path: Path, key: str) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == key else None


def _pair(where: str, model, eps: float, best, x, y, s, bs: int, seed: int) -> dict[str, Any]:
    ce = _robust(model, PGD(model, eps, s.steps, loss="ce", seed=seed), x, y, bs)
    found = _robust(model, PGD(model, eps, s.steps, loss=best, seed=seed), x, y, bs)
    return {"setting": where, "ce": _ra(ce), "found": _ra(found), **_gain(ce, found)}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _gain_text(g: dict[str, Any] | None) -> str:
    if not g:
        return "-"
    low, high = g["interval_points"]
    p = "p < 0.001" if g["p_value"] < 0.001 else f"p {g['p_value']:.2g}"
    return f"{g['gain_points']:+.2f} [{low:+.2f}, {high:+.2f}], {p}"


def _markdown(result: dict[str, Any], s) -> str:
    cols = [f"pgd{s.steps}", f"pgd{s.long_steps}", f"apgd{s.apgd_steps}"]
    names = [c.upper().replace("PGD", "PGD-").replace("APGD-", "APGD-") for c in cols]
    lines = [f"Held-out robust accuracy (lower = stronger loss), {result['images']['text']}, "
             f"L-inf eps {result['eps']:g}, target {result['target']}; worst case kept. Gain: cross-entropy's "
             "figure minus the found loss's, in points, with its paired 95% interval and McNemar's exact p-value "
             "(same images).", "",
             "| loss | search fitness | " + " | ".join(names) + " | " + " | ".join(f"gain vs ce, {n}" for n in names)
             + " |", "|---|---|" + "---|" * (2 * len(cols))]
    for r in result["table"]:
        vs = r.get("vs_ce", {})
        lines.append(f"| {r['loss']} | {_fmt(r['search_fitness'])} | " + " | ".join(_fmt(r.get(c)) for c in cols)
                     + " | " + " | ".join(_gain_text(vs.get(c)) for c in cols) + " |")
    lines += ["", f"Transfer of the best found loss (PGD-{s.steps}):", "",
              "| setting | ce | found | gain (points) [95% interval], p |", "|---|---|---|---|"]
    for t in result["transfer"]:
        lines.append(f"| {t['setting']} | {t['ce']:.4f} | {t['found']:.4f} | {_gain_text(t)} |")
    return "\n".join(lines) + "\n"
