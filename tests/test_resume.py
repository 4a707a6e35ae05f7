"""Training in stages (fedrobust.resume): stopped at an epoch, saved, resumed; the same members as one go."""

import pytest
import torch

from fedrobust.config import load_config
from fedrobust.engines import run_inline
from fedrobust.errors import ConfigError
from fedrobust.resume import TrainingStage, load_stage, save_stage, training_digest


def _cfg(*overrides):
    return load_config(["engine=inline", "train.progress=false", "train.batch_size=64", "deployment.num_nodes=2",
                        *overrides])


def _staged(cfg, stops, tmp_path):
    """Train through ``stops`` (epochs), saving and loading the stage between each; every epoch trained."""
    stage, trained = TrainingStage(stop=stops[0], digest=training_digest(cfg)), []
    for i, stop in enumerate(stops):
        if i:
            stage = load_stage(tmp_path / "stage.pt", cfg).resumed_to(stop)
        members = run_inline(cfg, stage=stage)
        trained.append([r.epoch for r in members[0].history])
        save_stage(tmp_path / "stage.pt", stage)
    return members, trained


def _same(a, b):
    assert [u.member for u in a] == [u.member for u in b]
    for ua, ub in zip(a, b):
        assert ua.best_epoch == ub.best_epoch and ua.epochs_trained == ub.epochs_trained
        assert [r.train_loss for r in ua.history] == [r.train_loss for r in ub.history]
        for k in ua.weights:
            assert torch.equal(ua.weights[k], ub.weights[k]), f"member {ua.member}: {k} differs"


@pytest.mark.parametrize("overrides,stops", [
    (["train.epochs=5"], [1, 3, 5]),  # one round, stopped inside it
    (["strategy=edlcm", "train.rounds=2", "train.epochs=4"], [2, 4]),  # peers exchanged at each round's end
])
def test_a_run_trained_in_stages_equals_one_trained_in_one_go(tmp_path, overrides, stops):
    cfg = _cfg(*overrides)
    whole = run_inline(cfg)
    staged, trained = _staged(cfg, stops, tmp_path)
    _same(staged, whole)
    # each stage trained only its own epochs: none twice, none skipped
    assert trained[0] == list(range(stops[0]))
    assert trained[-1] == list(range(stops[-1]))
    for i in range(1, len(stops)):
        assert trained[i][:stops[i - 1]] == trained[i - 1]


def test_a_stage_is_not_resumed_under_other_training_settings(tmp_path):
    cfg = _cfg("train.epochs=3")
    stage = TrainingStage(stop=1, digest=training_digest(cfg))
    run_inline(cfg, stage=stage)
    save_stage(tmp_path / "stage.pt", stage)
    with pytest.raises(ConfigError, match="other training settings"):
        load_stage(tmp_path / "stage.pt", _cfg("train.epochs=3", "optimizer.lr=0.01"))
    # the progress bar and the attack section are not training settings
    load_stage(tmp_path / "stage.pt", _cfg("train.epochs=3", "train.progress=true", "attack.num_samples=7"))
    with pytest.raises(ValueError, match="must stop later"):
        stage.resumed_to(1)
