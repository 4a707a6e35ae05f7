"""fedrobust evaluate end to end on digits, with small budgets, and its cache."""

import json

import numpy as np
import pytest

from fedrobust.cli import main
from fedrobust.evaluation.evaluate import evaluation_sample

SMALL = [
    "attack.num_samples=40", "attack.queries=15", "attack.surrogates=[cnn,vgg16]", "attack.surrogate_epochs=2",
    "attack.apgd_steps=4", "attack.whitebox_steps=3", "attack.transfer_steps=2", "attack.tsr_steps=2",
    "attack.hessian_samples=4", "attack.power_iters=3", "attack.batch_size=16", "train.progress=false",
]
TRAIN = ["engine=inline", "train.epochs=2"]


@pytest.fixture()
def cache(tmp_path):
    return f"attack.cache_dir={tmp_path / 'cache'}"


def test_train_with_evaluate_then_reuse_the_cache_on_another_run(tmp_path, cache):
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    assert main(["train", *TRAIN, "evaluate=true", *SMALL, cache, f"run_dir={run1}"]) == 0
    r1 = json.loads((run1 / "results.json").read_text())
    ens = r1["ensemble"]
    for key in ("transfer", "query"):
        assert 0.0 <= ens["robust_accuracy"][key] <= 1.0
    assert ens["robust_accuracy"]["transfer"] == ens["attacks"]["transfer_cwa"]["robust_accuracy"]
    assert ens["robust_accuracy"]["query"] == ens["attacks"]["query_square_linf"]["robust_accuracy"]
    expected = {f"transfer_{n}" for n in ("cwa", "mifgsm", "pgd")} | {"query_square_linf", "query_square_l2"} | {
        f"whitebox_{n}" for n in ("fgsm", "bim", "pgd", "apgd")}
    assert set(ens["attacks"]) == expected
    for name, e in ens["attacks"].items():
        assert e["asr"] == pytest.approx(1 - e["robust_accuracy"]) and e["eps"] > 0, name
    q = ens["attacks"]["query_square_linf"]
    assert 1 <= q["queries_used"]["mean"] <= 15 and q["queries_used"]["max"] <= 15
    assert 0 <= ens["tsr"]["value"] <= 100 * (3 - 1) and len(ens["tsr"]["matrix"]) == 3
    assert ens["smoothness"]["lambda_max"]["n"] == 4
    assert -1 <= ens["smoothness"]["grad_cosine_surrogate_target"]["mean"] <= 1
    for m in r1["members"]:
        assert {"transfer_cwa", "query_square_linf"} <= set(m["robust_accuracy"])
    assert r1["evaluation"]["cache_hits"]["surrogates"] is False
    sample1 = json.loads((run1 / "eval_sample.json").read_text())["indices"]
    assert len(sample1) == 40

    assert main(["train", *TRAIN, "train.seed=5", "train.progress=false", f"run_dir={run2}"]) == 0
    assert main(["evaluate", str(run2), *SMALL, cache]) == 0
    r2 = json.loads((run2 / "results.json").read_text())
    hits = r2["evaluation"]["cache_hits"]
    assert hits["surrogates"] is True and all(hits["transfer"].values())
    assert r2["evaluation"]["surrogate_zoo"] == r1["evaluation"]["surrogate_zoo"]
    assert json.loads((run2 / "eval_sample.json").read_text())["indices"] == sample1
    log = (run2 / "evaluate.log").read_text()
    assert "reused cached zoo" in log and "reused cached adversarial examples" in log
    # the replayed transfer examples are the same images for both targets
    assert r2["ensemble"]["attacks"]["transfer_cwa"]["surrogate_accuracy"] == r1["ensemble"]["attacks"]["transfer_cwa"]["surrogate_accuracy"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run1 / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"robust_accuracy/transfer", "robust_accuracy/query", "tsr/members_pgd", "attack_ra/whitebox_apgd"} <= tags
    assert "smoothness/lambda_max" in ea.Tags()["histograms"]


@pytest.mark.parametrize("args,key", [
    (["evaluate", "nowhere"], "run_dir"),
    (["evaluate", "RUN", "attack.eps=0"], "attack.eps"),
    (["evaluate", "RUN", "attack.nosuch=1"], "attack.nosuch"),
    (["evaluate", "RUN", "attack.transfer=square"], "attack.transfer"),
])
def test_bad_evaluate_arguments_exit_2(tmp_path, capsys, args, key):
    run = tmp_path / "run"
    assert main(["train", "engine=inline", "deployment=centralized", "train.epochs=1", "train.progress=false", f"run_dir={run}"]) == 0
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
