"""``fedrobust search-loss`` (AutoLoss-AR, paper 004): fitness, its cache, a killed search's resume, bad
settings, and fitness on Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedrobust.cli import main
from fedrobust.lossearch.fitness import WORST, FitnessCache, Problem
from test_bad_input import trained  # noqa: F401  (the module's finished one-epoch run, built once)

pytestmark = pytest.mark.xdist_group("loss_search")

TINY = ["loss_search.population=10", "loss_search.selections=10", "loss_search.generations=4",
        "loss_search.num_images=40", "loss_search.eps=0.1", "loss_search.test=false", "loss_search.hall_of_fame=5"]


def _problem(scale: float = 1.0) -> Problem:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))  # plain torch: Ray workers unpickle it
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return Problem(net, torch.rand(24, 1, 4, 4), torch.randint(0, 4, (24,)), eps=0.1, steps=3)


def test_a_finite_loss_gets_its_robust_accuracy_and_a_non_finite_one_the_worst():
    problem = _problem(scale=10.0)
    fit, status = problem.fitness("Neg(Mul(q, Log(Softmax(p))))")
    assert status == "ok" and fit == pytest.approx(problem.robust_accuracy("ce"), abs=1 / 24) and fit < WORST
    # the value overflows on the clean images
    assert problem.fitness("Exp(Exp(Exp(Exp(p))))") == (WORST, "non-finite")
    # the value is finite (e^-inf = 0) but its gradient is not (0 * inf)
    assert problem.fitness("Exp(Neg(Exp(Exp(Exp(p)))))") == (WORST, "non-finite")


def test_the_fitness_cache_measures_equivalent_trees_once_and_keeps_them_on_disk(tmp_path):
    measured = []

    def measure(keys, on_done=None):
        for k in keys:
            measured.append(k)
            yield 0.5, "ok"

    cache = FitnessCache(tmp_path / "cache.jsonl")
    trees = [("Add", "p", "q"), ("Add", "q", "p"), ("Neg", ("Neg", ("Add", "p", "q"))), ("Mul", "1", ("Add", "q", "p"))]
    assert cache.evaluate(trees, measure) == [0.5] * 4
    assert measured == ["Add(p, q)"] and cache.hits == 3 and cache.misses == 1
    again = FitnessCache(tmp_path / "cache.jsonl")  # a resumed search reads what was measured
    assert again.evaluate([("Add", "q", "p")], measure) == [0.5] and len(measured) == 1


def _search(run: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "fedrobust.cli", "search-loss", str(run), *TINY,
                             f"loss_search.out_dir={out}", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _fame(out: Path) -> list[tuple[str, float]]:
    return [(e["expression"], e["search_fitness"]) for e in json.loads((out / "hall_of_fame.json").read_text())["entries"]]


@pytest.mark.slow
def test_a_search_killed_mid_generation_resumes_to_the_same_hall_of_fame(trained, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = _search(trained, whole)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    # the same search, SIGKILLed after generation 1's checkpoint while generation 2 is being measured
    proc = _search(trained, killed)
    cache, ckpt = killed / "fitness_cache.jsonl", killed / "checkpoint.json"
    deadline, at = time.time() + 300, None
    while proc.poll() is None and time.time() < deadline:
        if at is None and ckpt.is_file() and json.loads(ckpt.read_text() or "{}").get("generation") == 1:
            at = len(cache.read_text().splitlines())
        if at is not None and len(cache.read_text().splitlines()) > at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the search ended before it could be killed mid-generation"
    assert json.loads(ckpt.read_text())["generation"] == 1 and not (killed / "hall_of_fame.json").exists()
    proc = _search(trained, killed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert "resuming the loss search" in (killed / "search.log").read_text()
    assert _fame(killed) == _fame(whole)
    assert json.loads((killed / "best.json").read_text())["expression"] == _fame(whole)[0][0]
    h_whole = json.loads((whole / "checkpoint.json").read_text())
    h_killed = json.loads((killed / "checkpoint.json").read_text())
    assert h_killed["population"] == h_whole["population"] and h_killed["fitness"] == h_whole["fitness"]
    assert (killed / "fitness.png").stat().st_size > 0 and any((killed / "tensorboard").iterdir())


@pytest.mark.parametrize("override,message", [
    ("loss_search.population=1", "loss_search.population: must be >= 2, got 1"),
    ("loss_search=huge", "loss_search: unknown preset 'huge' (choose from paper, small)"),
    ("attack.eps=0.1", "attack.eps: search-loss takes loss_search=PRESET and loss_search.KEY=VALUE overrides only"),
    ("loss_search.target=member:9", "loss_search.target: must be ensemble or member:K with K < 3"),
    ("loss_search.max_depth=90", "loss_search.max_depth: must be in [1, 50], got 90"),
    ("loss_search.split=test", "loss_search.split: must be validation (the search never sees the test set)"),
    ("loss_search.crossover=abc", "loss_search.crossover:"),
])
def test_bad_settings_exit_2_in_one_line_and_write_nothing(trained, tmp_path, capsys, override, message):
    before = sorted(p.name for p in trained.iterdir())
    assert main(["search-loss", str(trained), override, f"loss_search.out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedrobust: error: {message}"), err
    assert sorted(p.name for p in trained.iterdir()) == before and not (tmp_path / "out").exists()


def test_a_folder_holding_another_search_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "search.json").write_text(json.dumps({"key": "another", "settings": {"seed": 5}}))
    assert main(["search-loss", str(trained), *TINY, f"loss_search.out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a search with other settings (differing: seed)" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["search.json"]


@pytest.mark.slow
def test_fitness_on_ray_equals_fitness_in_process():
    from fedrobust.lossearch.parallel import RayFitness

    problem = _problem(scale=3.0)
    keys = ["Neg(Mul(q, Log(Softmax(p))))", "Max(p)", "Exp(Exp(Exp(Exp(p))))", "Add(Max(p), Neg(Sum(Mul(q, p))))"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = [problem.fitness(k) for k in keys]
    finally:
        torch.set_num_threads(threads)
    pool = RayFitness(problem, "local")
    pool.start()
    try:
        done = []
        assert list(pool.measure(keys, done.append)) == here
        assert sum(done) == len(keys)
    finally:
        pool.close()


def test_a_search_writes_its_hall_of_fame_best_loss_and_held_out_tables(trained, tmp_path, capsys, monkeypatch):
    from fedrobust.attacks import SearchedLoss, attack_loss
    from fedrobust.lossearch import heldout

    out = tmp_path / "out"
    settings = ["loss_search=small", "loss_search.population=6", "loss_search.selections=6",
                "loss_search.generations=1", "loss_search.num_images=30", "loss_search.eps=0.1",
                "loss_search.test_images=25", "loss_search.long_steps=3", "loss_search.apgd_steps=3",
                "loss_search.hall_of_fame=3", "loss_search.test_eps=[0.05]", f"loss_search.out_dir={out}"]
    assert main(["search-loss", str(trained), *settings]) == 0
    fame = json.loads((out / "hall_of_fame.json").read_text())
    assert set(fame["baselines"]) == {"ce", "margin", "dlr"} and 1 <= len(fame["entries"]) <= 3
    assert [e["search_fitness"] for e in fame["entries"]] == sorted(e["search_fitness"] for e in fame["entries"])
    for e in fame["entries"]:
        assert 0 <= e["test_robust_accuracy"] <= 1 and e["infix"] == SearchedLoss.parse(e["expression"]).infix
    best = attack_loss(f"file:{out / 'best.json'}")
    assert best.text == fame["entries"][0]["expression"]
    held = json.loads((out / "heldout.json").read_text())
    assert held["images"]["split"] == "test" and held["images"]["num_images"] == 25
    search = json.loads((out / "search.json").read_text())
    assert search["images"]["split"] == "validation"  # the search saw training images only
    rows = {r["loss"].split(":")[0]: r for r in held["table"]}
    assert {"ce", "margin", "dlr", "found #1"} <= set(rows) and set(rows["found #1"]) >= {"pgd10", "pgd3", "apgd3"}
    assert [t["setting"] for t in held["transfer"]] == ["member:0 (eps 0.1)", "member:1 (eps 0.1)",
                                                       "member:2 (eps 0.1)", "ensemble (eps 0.05)"]
    assert (out / "heldout.md").read_text().count("\n|") >= 8
    # every found-vs-ce figure is paired on the same images: the gain's sign and size agree with the two figures
    for col, gain in rows["found #1"]["vs_ce"].items():
        assert gain["gain_points"] == round(100 * (rows["ce"][col] - rows["found #1"][col]), 2)
        assert gain["only_ce_robust"] - gain["only_found_robust"] == round(25 * (rows["ce"][col] - rows["found #1"][col]))
        low, high = gain["interval_points"]
        assert low <= gain["gain_points"] <= high and 0 <= gain["p_value"] <= 1
    assert all({"interval_points", "p_value"} <= set(t) for t in held["transfer"])
    assert "p " in (out / "heldout.md").read_text()
    # run again: nothing left to search, and the held-out tables are reused, not measured again
    monkeypatch.setattr(heldout, "_robust", lambda *a, **k: pytest.fail("measured the held-out tables again"))
    assert main(["search-loss", str(trained), *settings]) == 0
    assert json.loads((out / "heldout.json").read_text()) == held
