"""fedrobust evaluate: bad arguments and the fixed sample (a whole evaluation and its cache:
tests/test_evaluation_stages.py)."""

import shutil

import numpy as np
import pytest

from fedrobust.cli import main
from fedrobust.runs.images import evaluation_sample

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    assert main(["train", "engine=inline", "deployment=centralized", "train.epochs=1", "train.progress=false",
                 f"run_dir={run}"]) == 0
    return run


@pytest.mark.parametrize("args,key", [
    (["evaluate", "nowhere"], "run_dir"),
    (["evaluate", "RUN", "attack.eps=0"], "attack.eps"),
    (["evaluate", "RUN", "attack.nosuch=1"], "attack.nosuch"),
    (["evaluate", "RUN", "attack.transfer=square"], "attack.transfer"),
])
def test_bad_evaluate_arguments_exit_2(trained, tmp_path, capsys, args, key):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    capsys.readouterr()
    before = (run / "results.json").read_text()
    args = [str(run) if a == "RUN" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err
    assert (run / "results.json").read_text() == before


def test_evaluation_sample_is_fixed_and_capped():
    a, b = evaluation_sample(360, 100, 0), evaluation_sample(360, 100, 0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 100
    assert not np.array_equal(a, evaluation_sample(360, 100, 1))
    assert np.array_equal(evaluation_sample(360, 1000, 0), np.arange(360))
