"""Bad configurations stop with exit code 2, a one-line message naming the key, and no run directory."""

import subprocess
import sys

import pytest

from fedrobust.cli import main
from fedrobust.errors import ConfigError
from fedrobust.config import load_config

BAD = [
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=-0.1"], "optimizer.lr"),
    (["deployment.alpha=0"], "deployment.alpha"),
    (["deployment.alpha=-1"], "deployment.alpha"),
    (["deployment.num_nodes=0"], "deployment.num_nodes"),
    (["deployment.num_nodes=5000"], "deployment.num_nodes"),
    (["model=nosuchnet"], "model"),
    (["strategy=nosuchstrategy"], "strategy"),
    (["data=imagenet"], "data"),
    (["engine=nosuchengine"], "engine"),
    (["model.name=nosuchnet"], "model.name"),
    (["optimizer.learning_rate=0.1"], "optimizer.learning_rate"),
    (["nosuchkey=1"], "nosuchkey"),
    (["train.epochs=ten"], "train.epochs"),
    (["train.batch_size=1.5"], "train.batch_size"),
    (["train.batch_size=0"], "train.batch_size"),
    (["optimizer.momentum=1.5"], "optimizer.momentum"),
    (["optimizer.weight_decay=-1e-4"], "optimizer.weight_decay"),
    (["train.patience=0"], "train.patience"),
    (["train.rounds=50", "train.epochs=5"], "train.rounds"),
    (["train.device=tpu"], "train.device"),
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["data=cifar10", "data.root=does/not/exist"], "data"),
    (["attack.eps=0"], "attack.eps"),
    (["attack.transfer=square_linf"], "attack.transfer"),
    (["attack.surrogates=[cnn,resnet50]"], "attack.surrogates"),
    (["attack.whitebox_loss=hinge"], "attack.whitebox_loss"),
    (["attack.queries=0"], "attack.queries"),
    (["strategy=edlcm", "strategy.grad=forward"], "strategy.grad"),
    (["strategy=curvature", "strategy.every=0"], "strategy.every"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_exits_2_with_one_line_naming_key(overrides, key, capsys, tmp_path):
    run_dir = tmp_path / "run"
    code = main(["train", *overrides, f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert key in err, err
    assert not run_dir.exists()
    assert not (tmp_path / "runs").exists()


def test_console_script_exit_code_is_2(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrobust.cli", "train", "optimizer.lr=0", f"run_dir={run_dir}"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "optimizer.lr" in proc.stderr
    assert not run_dir.exists()


def test_existing_run_dir_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("precious")
    assert main(["train", f"run_dir={run_dir}"]) == 2
    assert "run_dir" in capsys.readouterr().err
    assert (run_dir / "results.json").read_text() == "precious"


def test_defaults_and_user_overrides():
    cfg = load_config(["optimizer.lr=0.01", "train.epochs=50", "train.seed=3"])
    assert (cfg.optimizer.lr, cfg.train.epochs, cfg.train.seed) == (0.01, 50, 3)
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 5e-4
    assert cfg.train.batch_size == 128 and cfg.train.patience == 10
    assert (cfg.data.name, cfg.model.name, cfg.deployment.name, cfg.strategy.name, cfg.engine.name) == (
        "digits", "cnn", "distributed_dirichlet", "plain", "simulation")
    assert cfg.deployment.num_nodes == 3 and cfg.deployment.alpha == 0.9


def test_schema_is_typed():
    with pytest.raises(ConfigError, match="deployment.num_nodes"):
        load_config(["deployment.num_nodes=three"])


def test_attack_and_tune_sections_are_checked_with_their_code_and_all_at_once_by_validation():
    from fedrobust import config
    from fedrobust.validation import load_config as load_checked
    from fedrobust.validation import validate_all

    with pytest.raises(ConfigError, match=r"^attack\.whitebox: unknown value 'nosuch' \(choose from fgsm, bim"):
        load_checked(["attack.whitebox=[fgsm,nosuch]"])
    with pytest.raises(ConfigError, match=r"^tune\.population_size: must be >= 2, got 1$"):
        load_checked(["tune.population_size=1"])
    cfg = load_checked([])
    cfg.attack.eps = 2.0
    config.validate(cfg, sections=False)  # the run's own keys: a node's task never holds the attack section
    with pytest.raises(ConfigError, match=r"^attack\.eps: must be in \(0, 1\)"):
        validate_all(cfg)


def test_a_registered_strategy_schema_is_a_typed_strategy_option(monkeypatch, request):
    """What a plug-in strategy's Config becomes: strategy=<name> composes without a YAML file, typed."""
    from dataclasses import dataclass

    from hydra.core.config_store import ConfigStore

    from strategies import settings

    cs = ConfigStore.instance()  # undone after the test
    monkeypatch.setitem(cs.repo, "strategy", dict(cs.repo["strategy"]))
    schemas, peers = dict(settings.STRATEGY_SCHEMAS), list(settings.PEER_STRATEGIES)

    def restore() -> None:  # the registries are shared by reference (fedrobust.config reads the same ones)
        settings.STRATEGY_SCHEMAS.clear()
        settings.STRATEGY_SCHEMAS.update(schemas)
        settings.PEER_STRATEGIES[:] = peers

    request.addfinalizer(restore)

    @dataclass
    class ToyParams:
        weight: float = 0.5
        mode: str = "a"
        limit: int | None = None

    with pytest.raises(ConfigError, match="strategy: unknown value 'toy'"):
        load_config(["strategy=toy"])
    settings.register_strategy_schema("toy", ToyParams, needs_peers=True)
    cfg = load_config(["strategy=toy", "strategy.weight=2", "train.epochs=20"])
    assert dict(cfg.strategy) == {"name": "toy", "weight": 2.0, "mode": "a", "limit": None}
    assert cfg.train.rounds == 10  # it needs peers: the peer strategies' default rounds
    assert settings.strategy_names()[-1] == "toy"
    for bad, key in (("strategy.weight=heavy", "strategy.weight"), ("strategy.nope=1", "strategy.nope"),
                     ("strategy.limit=1.5", "strategy.limit")):
        with pytest.raises(ConfigError, match=rf"^{key}"):
            load_config(["strategy=toy", bad])
    with pytest.raises(ConfigError, match="not a valid strategy name"):
        settings.register_strategy_schema("no-dash", ToyParams)
