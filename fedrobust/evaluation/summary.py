"""A run's figures with their uncertainty (``fedrobust report RUN_DIR``) and two runs compared image by image
(``fedrobust compare RUN_A RUN_B``).

``report`` reads ``results.json`` and, where the evaluation kept them,
its per-image records (``fates/``, :mod:`.fates`): every attack's robust
accuracy with its 95% Wilson interval, and the unions. A run evaluated
before the records existed still reports: its intervals come from the
figure and the sample's size, and it says that no union can be formed.

``compare`` needs both runs evaluated on the same images (same split, same
indices) with their records: per attack that both ran, and per union over
the attacks both ran, the accuracies, their difference (A - B), the
difference's 95% interval and McNemar's exact p-value
(:func:`fedrobust.stats.paired`). It prints a table and writes it as
Markdown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..errors import ConfigError
from ..stats import interval_of, paired
from .fates import KINDS, load_fates

__all__ = ["compare_runs", "run_report"]


def _results(run_dir: Path) -> dict:
    from .evaluate import read_results

    if not Path(run_dir).is_dir():
        raise ConfigError(f"run_dir: {run_dir} is not a directory (expected a run directory written by fedrobust train)")
    results = read_results(run_dir)
    if "attacks" not in results["ensemble"]:
        raise ConfigError(f"run_dir: {run_dir} has not been evaluated (run fedrobust evaluate {run_dir})")
    return results


def _records(run_dir: Path, results: dict) -> dict[str, dict[str, np.ndarray]]:
    key = results.get("evaluation", {}).get("key")
    return load_fates(run_dir, key) if key else {}


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _defence_lines(results: dict) -> list[str]:
    """How the members were combined and screened, and what simulated cheating nodes did (docs/cheating.md)."""
    rule = results.get("evaluation", {}).get("combine") or results.get("ensemble", {}).get("combine")
    screening, malicious = results.get("screening"), results.get("malicious")
    if not (screening or malicious or (rule and rule != "mean_logits")):
        return []
    lines = ["", f"Members combined by `{rule or 'mean_logits'}`."]
    if screening:
        rejected = screening.get("rejected") or [m for m in screening.get("members", []) if not m.get("kept", True)]
        lines.append(f"Screening on the server's {screening.get('server_images')} images rejected "
                     + ("; ".join(f"member {r['member']} (node {r['node']}): {r['reason']}" for r in rejected)
                        if rejected else "no member") + ".")
    if malicious:
        lines.append("**Simulated** cheating nodes: " + ", ".join(f"node {n['node']} ({n['behaviour']})"
                                                                for n in malicious.get("nodes", [])) + ".")
    for b in results.get("backdoor", []):
        lines.append(f"Backdoor of node {b['node']} (target {b['target']}): attack success rate "
                     f"{b['attack_success_rate']:.4f} {_ci(b.get('interval'))} on {b['num_images']} triggered images.")
    return lines


def run_report(run_dir: Path) -> str:
    """``RUN_DIR/report.md``: the run's figures with their intervals and unions; returns the Markdown."""
    run_dir = Path(run_dir)
    results = _results(run_dir)
    ens, ev = results["ensemble"], results.get("evaluation", {})
    n = int(ev.get("num_samples") or results.get("images", {}).get("evaluation", {}).get("num_images") or 0)
    records = _records(run_dir, results)
    lines = [f"# {run_dir.name}: {results.get('data', '?')}, {results.get('strategy', '?')}, "
             f"{ens.get('num_members', '?')} member(s)", ""]
    images = results.get("images", {}).get("evaluation", {}).get("text")
    if images:
        lines += [f"Images: {images}. Intervals: 95% Wilson, over these images.", ""]
    rows = []
    clean_ci = ens.get("intervals", {}).get("clean_accuracy_sample")
    if "clean_accuracy_sample" in ens:
        clean_ci = clean_ci or interval_of(ens["clean_accuracy_sample"], n)
        rows.append(["clean (sample)", f"{ens['clean_accuracy_sample']:.4f}", _ci(clean_ci), "-"])
    for name, e in ens["attacks"].items():
        ci = e.get("interval") or interval_of(e["robust_accuracy"], n)
        covers = f"{e.get('kind', '')}, eps {e.get('eps', float('nan')):.4g} {e.get('norm', '')}".strip(", ")
        rows.append([name, f"{e['robust_accuracy']:.4f}", _ci(ci), covers])
    for name, u in ens.get("unions", {}).items():
        rows.append([f"**union: {name}**", f"{u['robust_accuracy']:.4f}", _ci(u["interval"]), ", ".join(u["attacks"])])
    lines += _markdown(["figure", "accuracy", "95% interval", "covers"], rows)
    if not ens.get("unions"):
        lines += ["", "No per-image records (`fates/`): this run was evaluated before fedrobust kept them, so no "
                  "union over attacks can be formed. Run `fedrobust evaluate` on it again for the unions."]
    elif not records:
        lines += ["", "The per-image records (`fates/`) are missing; the unions above come from results.json."]
    lines += _defence_lines(results)
    text = "\n".join(lines) + "\n"
    write_text(run_dir / "report.md", text)
    return text


def _check_same_images(a: Path, b: Path, ra: dict, rb: dict) -> None:
    for run, records in ((a, ra), (b, rb)):
        if not records:
            raise ConfigError(f"run_dir: {run} has no per-image records (fates/); run fedrobust evaluate {run} again")
    clean_a, clean_b = ra.get("clean"), rb.get("clean")
    first_a, first_b = clean_a or next(iter(ra.values())), clean_b or next(iter(rb.values()))
    if first_a["split"] != first_b["split"] or not np.array_equal(first_a["indices"], first_b["indices"]):
        raise ConfigError(f"compare: {a} and {b} were not evaluated on the same images "
                          f"({first_a['split']}: {len(first_a['indices'])} vs {first_b['split']}: "
                          f"{len(first_b['indices'])}); evaluate both with the same attack.split, "
                          "attack.num_samples and attack.sample_seed")


def compare_runs(a: Path, b: Path, out: Path | None = None) -> tuple[str, list[dict]]:
    """The comparison table (Markdown, also written to ``out``) and its rows."""
    a, b = Path(a), Path(b)
    results_a, results_b = _results(a), _results(b)
    ra, rb = _records(a, results_a), _records(b, _results(b))
    _check_same_images(a, b, ra, rb)
    eps_a, eps_b = (r.get("evaluation", {}).get("eps") for r in (results_a, results_b))
    if eps_a != eps_b:
        raise ConfigError(f"compare: {a} was evaluated at attack.eps={eps_a} and {b} at {eps_b}; evaluate both "
                          "at the same budget")
    entries_b = results_b["ensemble"]["attacks"]

    def same_settings(name: str) -> bool:  # an attack compared only where both ran it alike
        ea, eb = results_a["ensemble"]["attacks"].get(name), entries_b.get(name)
        if ea is None or eb is None:
            return name not in results_a["ensemble"]["attacks"] and name not in entries_b  # e.g. clean
        keys = ("eps", "norm", "steps", "queries", "loss", "loss_expression", "restarts", "targets")
        return all(ea.get(k) == eb.get(k) for k in keys)

    common = [name for name in (*results_a["ensemble"]["attacks"], *ra)
              if name in ra and name in rb and same_settings(name)]
    common = list(dict.fromkeys(common))  # results.json's order, then any other record
    entries = results_a["ensemble"]["attacks"]
    eps = results_a.get("evaluation", {}).get("eps")
    attacks = [name for name in common if name.split("_", 1)[0] in KINDS]
    # unions over one budget, as the evaluation forms them: the L-inf attacks at the run's eps, and the L2 ones
    # where two or more ran
    in_unions = [n for n in attacks if entries.get(n, {}).get("norm", "linf") == "linf"
                 and (eps is None or entries.get(n, {}).get("eps") == eps)]
    in_l2 = [n for n in attacks if entries.get(n, {}).get("norm") == "l2"]
    in_l2 = in_l2 if len(in_l2) >= 2 and len({entries[n].get("eps") for n in in_l2}) == 1 else []
    rows: list[dict] = []

    def add(name: str, x: np.ndarray, y: np.ndarray, covers: str) -> None:
        p = paired(x, y)
        rows.append({"figure": name, "a": p.a, "b": p.b, "difference": p.difference, "interval": p.interval,
                     "p_value": p.p_value, "only_a": p.only_a, "only_b": p.only_b, "num_images": p.n, "covers": covers})

    if "clean" in common:
        add("clean", ra["clean"]["ensemble"], rb["clean"]["ensemble"], "clean images")
    for name in attacks:
        add(name, ra[name]["ensemble"], rb[name]["ensemble"], name)
    for union, names in (("whitebox", [n for n in in_unions if n.startswith("whitebox_")]), ("all", in_unions),
                         ("whitebox_l2", [n for n in in_l2 if n.startswith("whitebox_")]), ("all_l2", in_l2)):
        if names:
            add(f"union: {union}", np.logical_and.reduce([ra[n]["ensemble"] for n in names]),
                np.logical_and.reduce([rb[n]["ensemble"] for n in names]), ", ".join(names))
    n = rows[0]["num_images"] if rows else 0
    lines = [f"# {a.name} (A) vs {b.name} (B)", "",
             f"The ensembles on the same {n} images. Difference: A - B; its 95% interval and McNemar's exact "
             "p-value are paired, image by image (only the images one run got right and the other did not count).",
             "Unions are over the L-inf attacks at the runs' eps that both ran (and `_l2` ones over their L2 attacks).",
             ""]
    table = [[r["figure"], f"{r['a']:.4f}", f"{r['b']:.4f}", f"{r['difference']:+.4f}",
              f"[{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]", f"{r['only_a']}/{r['only_b']}",
              f"{r['p_value']:.3g}"] for r in rows]
    lines += _markdown(["figure", "A", "B", "A - B", "95% interval", "only A/only B", "McNemar p"], table)
    text = "\n".join(lines) + "\n"
    if out is not None:
        write_text(out, text)
    return text, rows
