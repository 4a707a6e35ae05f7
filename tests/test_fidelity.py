"""Multi-fidelity studies (tune.scheduler=moasha): the rungs' budgets, promotion by non-dominated sorting,
promoted trials resumed from their checkpoints, the front at the full budget only, a stop and a resume."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import shutil
import time
from pathlib import Path

import optuna
import pytest

from fedrobust.cli import main as cli
from fedrobust.config import load_config
from fedrobust.tuning.fidelity import Scored, crowding_distance, nondominated_fronts, promotions, ranked
from fedrobust.tuning.outputs import read_trials_csv
from fedrobust.tuning.settings import rung_epochs, rung_images
from test_tuning import _FakePool

TINY = [
    "engine=inline", "train.progress=false", "attack.num_samples=60", "attack.surrogates=[cnn]",
    "attack.surrogate_epochs=3", "attack.transfer_attacks=[cwa]", "attack.transfer_steps=3",
    "attack.query_attacks=[square_linf]", "attack.queries=20", "attack.whitebox=[]", "attack.tsr=false",
    "attack.hessian_samples=0", "attack.per_member=false", "deployment.num_nodes=2",
]


def _dominates(a, b) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ the rule --
def test_rung_budgets_are_geometric_and_fall_on_round_ends():
    assert rung_epochs(40, 1, 3, 3) == [4, 13, 40]
    assert rung_epochs(10, 1, 3, 3) == [1, 3, 10]
    assert rung_epochs(20, 1, 3, 3, min_epochs=2) == [2, 6, 20]
    assert rung_epochs(40, 10, 3, 3) == [4, 16, 40]  # rounds of 4 epochs: 13 moves up to 16
    assert rung_epochs(4, 2, 3, 3) == [2, 4]  # too few epochs for three rungs: the check refuses it
    assert rung_images(500, 3, 3, 50) == [56, 167, 500]
    assert rung_images(100, 3, 3, 50) == [50, 50, 100]


def test_nondominated_sorting_and_crowding_distance_on_hand_made_points():
    pts = [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.3, 0.3), (0.35, 0.2)]
    assert nondominated_fronts(pts) == [[0, 1, 2], [3], [4, 5]]
    assert crowding_distance([(0.9, 0.1), (0.5, 0.5), (0.1, 0.9), (0.8, 0.3)]) == pytest.approx(
        [float("inf"), (0.8 - 0.1) / 0.8 + (0.9 - 0.3) / 0.8, float("inf"), (0.9 - 0.5) / 0.8 + (0.5 - 0.1) / 0.8])


def test_promotion_takes_the_best_one_in_eta_by_nondominated_sorting_feasible_first():
    a, b, c = Scored(0, (0.9, 0.1)), Scored(1, (0.1, 0.9)), Scored(2, (0.5, 0.5))  # the first front
    e, f = Scored(4, (0.4, 0.4)), Scored(5, (0.3, 0.3))  # fronts two and three
    d = Scored(3, (0.95, 0.95), violation=0.01)  # would dominate all, but below the accuracy floor
    g = Scored(6, (0.99, 0.99), violation=0.2)
    rung0 = [g, f, e, d, c, b, a]
    # the first front's extremes (infinite crowding distance) before its middle, every feasible trial
    # before the infeasible ones, these by their violation
    assert ranked(rung0) == [0, 1, 2, 4, 5, 3, 6] == ranked(rung0[::-1])
    twins = [Scored(n, (0.5, 0.5)) for n in (9, 8, 7)] + [Scored(1, (0.9, 0.1)), Scored(2, (0.1, 0.9))]
    assert ranked(twins) == ranked(twins[::-1])  # equal points: the same order whatever the input's
    # 7 results, eta 3: the best 2 go on; one of them is at rung 1 already
    assert promotions([rung0, []], [set(), {0}], eta=3) == [(1, 1)]
    # asynchronous: with only 3 results so far, the best 1 of them goes on
    assert promotions([[e, f, c], []], [set(), set()], eta=3) == [(2, 1)]
    assert promotions([[e, f], []], [set(), set()], eta=3) == []  # fewer than eta results: none yet
    # the highest rung's promotions first; a trial at rung 2 already is not promoted again
    rung1 = [Scored(0, (0.7, 0.2)), Scored(1, (0.2, 0.8)), Scored(2, (0.1, 0.1))]
    assert promotions([rung0, rung1, []], [set(), {0, 1, 2}, set()], eta=3) == [(0, 2)]
    assert promotions([rung0, rung1, []], [set(), {0, 1, 2}, {0}], eta=3) == []
    # an infeasible trial goes on only when too few feasible ones are there
    assert promotions([[d, g, f], []], [set(), set()], eta=3) == [(5, 1)]
    assert promotions([[d, g, Scored(7, (0.1, 0.1), violation=0.5)], []], [set(), set()], eta=3) == [(3, 1)]


# ---------------------------------------------------------------------------- a study, scores made up --
class _RungPool(_FakePool):
    """TrialPool's interface in this process. A trial's scores depend on its learning rate and on its
    budget: the fewer its epochs, the higher both robustnesses (a lower rung would dominate every
    full-budget trial if it were let into the front). It leaves the checkpoint a promotion resumes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.submitted: list[tuple] = []

    def submit(self, key, dest, cfg_yaml, values, name, threads, artefacts, fidelity=None, resume=None):
        self.running[key] = (Path(dest), values, fidelity, resume)
        self.submitted.append((key, fidelity, resume))

    def wait(self, timeout=None, held=None):
        from fedrobust.tuning.pool import Finished

        key = next(iter(self.running))  # first in, first out
        dest, values, fidelity, resume = self.running.pop(key)
        self.on_start(key, {"host": "here"})
        dest.mkdir(parents=True)
        if fidelity["rung"] < fidelity["rungs"] - 1:
            (dest / "stage.pt").write_bytes(b"checkpoint of " + dest.name.encode())
        lr, epochs = values["optimizer.lr"], fidelity["epochs"]
        scores = {"ca": 0.95 - 5 * lr, "val_accuracy": 0.95 - 5 * lr, "ra_t": 0.5 + lr + 1 / epochs,
                  "ra_q": 0.3 + lr + 0.1 * values["optimizer.momentum"] + 1 / epochs, "best_epoch": 1,
                  "seconds": 0.1 * epochs, "fidelity": fidelity}
        return [Finished(key, scores=scores, where={"host": "here"})]


def test_a_multi_fidelity_study_promotes_by_the_rule_and_keeps_lower_rungs_out_of_the_front(tmp_path, monkeypatch):
    from fedrobust.tuning import pool, study

    pools = []
    monkeypatch.setattr(pool, "TrialPool", lambda *a, **k: pools.append(_RungPool(*a, **k)) or pools[-1])
    monkeypatch.setattr(study, "share_artefacts", lambda pool, cfg: {})
    out = tmp_path / "study"
    cfg = load_config(["engine=inline", "tune.scheduler=moasha", "tune.n_trials=18", "tune.population_size=4",
                       "tune.max_concurrent=2", "tune.baseline_accuracy=0.9", "tune.max_accuracy_drop=0.05",
                       "train.epochs=9", "tune.fidelity.rungs=3", "tune.fidelity.reduction_factor=3",
                       "attack.num_samples=90", "tune.fidelity.min_images=5", "train.progress=false",
                       f"study_dir={out}"])
    rows = study.run_study(cfg)
    budgets, images = [1, 3, 9], [10, 30, 90]
    by_rung = collections.defaultdict(list)
    for r in rows:
        by_rung[r["rung"]].append(r)
    assert len(by_rung[0]) == 18 and all(r["state"] == "COMPLETE" for r in rows)
    for k in range(3):
        assert {(r["budget_epochs"], r["images"], r["partial"]) for r in by_rung[k]} == {(budgets[k], images[k], k < 2)}
    # the study ends with every promotion the rule allows done: each rung holds the best 1 in 3 of the one
    # below, ranked on both robustnesses and the validation accuracy (the floor decides only at the top)
    floor = 0.85
    for k in (0, 1):
        scored = [Scored(r["number"], (r["ra_t"], r["ra_q"], r["val_accuracy"])) for r in by_rung[k]]
        best = ranked(scored)[: len(scored) // 3]
        assert set(best) <= {r["number"] for r in by_rung[k + 1]}
        assert {r["number"] for r in by_rung[k + 1]} <= {r["number"] for r in by_rung[k]}
    assert len(by_rung[1]) >= 6 and len(by_rung[2]) >= 2
    # a promotion resumes the checkpoint its trial left at the rung below, and asks for that rung's budget
    launches = pools[0].submitted
    for key, fidelity, resume in launches:
        if fidelity["rung"] == 0:
            assert resume is None and isinstance(key, int)
        else:
            number, rung = int(key.split(".")[0]), fidelity["rung"]
            below = f"trial_{number:04d}" + (f"_r{rung - 1}" if rung > 1 else "")
            assert resume == b"checkpoint of " + below.encode()
            assert fidelity["epochs"] == budgets[rung] and fidelity["images"] == images[rung]
    assert len(launches) == len(rows)  # nothing ran twice
    # the front: full-budget rows only (each lower rung would dominate it), feasible and non-dominated
    doc = json.loads((out / "pareto.json").read_text())
    top = [r for r in by_rung[2] if r["val_accuracy"] >= floor]
    expected = {r["number"] for r in top if not any(_dominates((q["ra_t"], q["ra_q"]), (r["ra_t"], r["ra_q"]))
                                                   for q in top)}
    assert {t["number"] for t in doc["trials"]} == expected and expected
    assert all(t["run_dir"].endswith("_r2") for t in doc["trials"])
    assert max(r["ra_t"] for r in by_rung[0]) > max(t["ra_t"] for t in doc["trials"])  # lower rungs did dominate
    csv_rows = read_trials_csv(out / "trials.csv")
    assert [(r["number"], r["rung"], r["budget_epochs"]) for r in csv_rows] == [
        (r["number"], r["rung"], r["budget_epochs"]) for r in rows]
    # the sampler was told every trial's rung-0 scores, at one fidelity, and not the accuracy floor, which is
    # about a trained ensemble; the top rung's rows are judged by it
    st = optuna.load_study(study_name="fedrobust", storage=f"sqlite:///{out / 'study.db'}")
    for t in st.get_trials():
        assert t.user_attrs["budget_epochs"] == 1 and t.values[0] == pytest.approx(t.user_attrs["ra_t"])
        assert not t.constraints
    assert all(r["feasible"] == (r["val_accuracy"] >= floor) for r in by_rung[2])
    assert any(not r["feasible"] for r in by_rung[0])  # the floor, had it decided there, would have pruned


def test_a_multi_fidelity_config_is_checked(capsys):
    for overrides, message in [
        (["tune.scheduler=hyperband"], "tune.scheduler: unknown value 'hyperband'"),
        (["tune.scheduler=moasha", "engine=simulation"], "tune.scheduler: moasha resumes promoted trials"),
        (["tune.scheduler=moasha", "train.epochs=2"], "tune.fidelity.rungs: 3 rungs need 3 distinct budgets"),
        (["tune.fidelity.reduction_factor=1"], "tune.fidelity.reduction_factor: must be >= 2"),
        (["tune.fidelity.min_epochs=40"], "tune.fidelity.min_epochs: must be >= 1 and below train.epochs (40)"),
    ]:
        assert cli(["tune", "study_dir=unused", *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not Path("unused").exists()


# -------------------------------------------------------------------- a study, trained and attacked --
def test_promoted_trials_resume_their_checkpoints_and_train_no_epoch_twice(tmp_path, monkeypatch):
    """Real trials (train, attack), run in this process: each promotion trains only the epochs from its
    last budget to the next; the top rung's members are a full-budget trial's; the front is evaluated on
    the test sample from the top rung's run directories."""
    from fedrobust import training
    from fedrobust.tuning import pool, study
    from fedrobust.tuning.pool import Finished
    from fedrobust.tuning.trial import execute

    epochs_trained = collections.Counter()
    current = ["zoo"]  # the surrogate zoo's epochs, before any trial
    real_epoch = training.MemberTrainer._train_epoch

    def counted(self, peers):
        epochs_trained[current[-1]] += 1
        return real_epoch(self, peers)

    monkeypatch.setattr(training.MemberTrainer, "_train_epoch", counted)

    class InProcess(_RungPool):
        def wait(self, timeout=None, held=None):
            key = next(iter(self.running))
            dest, values, fidelity, resume = self.running.pop(key)
            self.on_start(key, {"host": "here"})
            current.append(key)
            scores = execute(self.cfg_yaml[key], values, str(dest), 1, None, fidelity, resume)
            return [Finished(key, scores=scores, where={"host": "here"})]

        def submit(self, key, dest, cfg_yaml, values, name, threads, artefacts, fidelity=None, resume=None):
            self.cfg_yaml = getattr(self, "cfg_yaml", {}) | {key: cfg_yaml}
            super().submit(key, dest, cfg_yaml, values, name, threads, artefacts, fidelity, resume)

    monkeypatch.setattr(pool, "TrialPool", InProcess)
    out = tmp_path / "study"
    cfg = load_config([*TINY, "tune.scheduler=moasha", "tune.n_trials=4", "tune.population_size=4",
                       "tune.max_concurrent=1", "tune.baseline_accuracy=0.5", "tune.max_accuracy_drop=0.5",
                       "train.epochs=4", "tune.fidelity.rungs=3", "tune.fidelity.reduction_factor=2",
                       "tune.fidelity.min_images=20", "optimizer.lr=0.05", "train.batch_size=64",
                       "tune.space.optimizer.lr={type:float,low:0.01,high:0.1,log:true}",
                       "tune.space.train.batch_size={type:categorical,choices:[64,128]}", f"study_dir={out}"])
    rows = study.run_study(cfg)
    budgets = [1, 2, 4]
    promoted = [r for r in rows if r["rung"] > 0]
    assert {r["rung"] for r in promoted} == {1, 2}
    for r in rows:
        key = r["number"] if r["rung"] == 0 else f"{r['number']}.r{r['rung']}"
        run_dir = Path(r["run_dir"])
        results = json.loads((run_dir / "results.json").read_text())
        members = results["ensemble"]["num_members"]
        start = 0 if r["rung"] == 0 else budgets[r["rung"] - 1]
        assert results["fidelity"]["resumed_from_epoch"] == start
        # only the epochs from the last budget to this one: none twice
        assert epochs_trained[key] == (budgets[r["rung"]] - start) * members, (key, epochs_trained[key])
        assert results["evaluation"]["num_samples"] == [20, 30, 60][r["rung"]]
        assert (run_dir / "stage.pt").is_file() == (r["rung"] < 2)
    # a trial promoted to the top has the members a trial trained at the full budget in one go has
    number = next(r["number"] for r in rows if r["rung"] == 2)
    values = json.loads((out / "trials" / f"trial_{number:04d}_r2" / "results.json").read_text())["trial_values"]
    import torch
    from omegaconf import OmegaConf

    base = OmegaConf.to_yaml(study._base_cfg_for_trials(cfg))
    current.append("whole")
    execute(base, values, str(tmp_path / "whole"), 1)
    assert epochs_trained["whole"] == 4 * 2
    for m in (0, 1):
        a = torch.load(out / "trials" / f"trial_{number:04d}_r2" / "members" / f"member_{m}.pt", weights_only=True)
        b = torch.load(tmp_path / "whole" / "members" / f"member_{m}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the front, from the top rung, evaluated once on the test sample
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["trials"] and all(t["run_dir"].endswith("_r2") and t["test"] is not None for t in doc["trials"])
    # fedrobust report reads the study back: the front's test figures are there, nothing is evaluated again
    from fedrobust.tuning.report import report

    text = report(out)
    assert all(f"| {t['number']} |" in text for t in doc["trials"]), text
    assert "Completed per rung (lowest budget first): 4 at 1 epochs" in text, text


# ----------------------------------------------------------------------- stopped, and resumed --
@pytest.mark.slow
def test_a_multi_fidelity_study_stopped_by_sigint_resumes_and_runs_no_rung_twice(tmp_path):
    study = tmp_path / "study"
    cmd = [sys.executable, "-m", "fedrobust.cli", "tune", f"study_dir={study}", "tune.scheduler=moasha",
           "tune.n_trials=6", "tune.population_size=4", "tune.max_concurrent=2", "tune.baseline_accuracy=0.5",
           "tune.max_accuracy_drop=0.5", "train.epochs=4", "tune.fidelity.reduction_factor=2",
           "tune.fidelity.min_images=20", *TINY]
    events = study / "executions.jsonl"

    def promotions_started() -> int:
        if not events.is_file():
            return 0
        return sum(1 for line in events.read_text().splitlines()
                   if json.loads(line)["event"] == "start" and isinstance(json.loads(line)["key"], str))

    ray_tmp = tempfile.mkdtemp(prefix="frf-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, FEDROBUST_SCRATCH=str(tmp_path / "scratch"), RAY_TMPDIR=ray_tmp)
    try:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, text=True)
        try:
            deadline = time.time() + 300
            while promotions_started() < 1 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert proc.poll() is None and promotions_started() >= 1, "the study ended before a promotion ran"
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        assert proc.returncode == 130, err[-2000:]
        assert "run the same command to resume" in err
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = read_trials_csv(study / "trials.csv")
    log = [json.loads(line) for line in events.read_text().splitlines()]
    ended = collections.Counter(e["key"] for e in log if e["event"] == "end")
    cancelled = [e["key"] for e in log if e["event"] == "cancelled"]
    assert cancelled and max(ended.values()) == 1  # stopped mid-way; no rung of a trial ran to its end twice
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert sum(r["rung"] == 0 for r in complete) == 6
    assert {r["rung"] for r in complete} == {0, 1, 2}
    for r in complete:  # each promoted rung resumed its own checkpoint at the budget below
        results = json.loads((Path(r["run_dir"]) / "results.json").read_text())
        assert results["fidelity"]["resumed_from_epoch"] == [0, 1, 2][r["rung"]]
    doc = json.loads((study / "pareto.json").read_text())
    assert doc["trials"] and all(t["run_dir"].endswith("_r2") for t in doc["trials"])
