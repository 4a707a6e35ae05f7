"""A storage URL's password reaches Optuna, in the tuner, and is written nowhere."""

from __future__ import annotations

import logging

import pytest

from fedrobust.config import load_config
from fedrobust.redact import redact, redacted
from shared_cache import cache_dir

PASSWORD = "S3cr3t-Pw_4u"
URL = f"postgresql://fedrobust:{PASSWORD}@db.example.org:5432/studies"


@pytest.mark.parametrize("text, expected", [
    (URL, "postgresql://fedrobust:***@db.example.org:5432/studies"),
    ("mysql+pymysql://:tok@h/db", "mysql+pymysql://:***@h/db"),
    ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),  # an '@' inside the password
    ("ray://head:10001", "ray://head:10001"),  # a port is not a password
    ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
    ("see redis://u:p@h and postgresql://a:b@c/d", "see redis://u:***@h and postgresql://a:***@c/d"),
])
def test_redact_replaces_the_password_of_every_url_and_nothing_else(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected


def test_a_redacted_config_is_a_typed_copy_and_the_original_keeps_the_url():
    cfg = load_config([f"tune.storage={URL}"])
    out = redacted(cfg)
    assert out.tune.storage == "postgresql://fedrobust:***@db.example.org:5432/studies"
    assert cfg.tune.storage == URL and out.train.epochs == cfg.train.epochs


@pytest.mark.slow
def test_a_study_with_a_password_in_its_storage_url_writes_it_nowhere(tmp_path, monkeypatch, caplog):
    from fedrobust.tuning import study

    monkeypatch.setenv("FEDROBUST_CACHE", str(cache_dir(tmp_path / "cache")))
    monkeypatch.setenv("FEDROBUST_SCRATCH", str(tmp_path / "scratch"))
    seen = []

    def storage_url(cfg, study_dir):  # the tuner's one use of the URL: Optuna's storage (SQLite here)
        seen.append(cfg.tune.storage)
        return f"sqlite:///{tmp_path / 'optuna.db'}"

    monkeypatch.setattr(study, "storage_url", storage_url)
    study_dir = tmp_path / "study"
    cfg = load_config([
        f"tune.storage={URL}", f"study_dir={study_dir}", "engine=inline", "tune.n_trials=1",
        "tune.population_size=2", "tune.max_concurrent=1", "train.epochs=2", "train.progress=false",
        "attack.num_samples=40", "attack.surrogates=[cnn]", "attack.surrogate_epochs=3",
        "attack.transfer_attacks=[cwa]", "attack.transfer_steps=3", "attack.query_attacks=[square_linf]",
        "attack.queries=20", "attack.whitebox=[]", "attack.tsr=false", "attack.hessian_samples=0",
        "attack.per_member=false"])
    with caplog.at_level(logging.INFO, logger="fedrobust"):
        rows = study.run_study(cfg)
    assert [r["state"] for r in rows] == ["COMPLETE"]
    assert seen and set(seen) == {URL}  # Optuna was given the real URL

    files = [p for p in study_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any("tfevents" in p.name for p in files)
    assert any(p.name == "study_config.json" for p in files) and any(p.parts[-3] == "trials" for p in files)
    leaks = [str(p.relative_to(study_dir)) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert leaks == []
    assert "fedrobust:***@db.example.org" in (study_dir / "config.yaml").read_text()
    assert PASSWORD not in caplog.text
    assert not (tmp_path / "scratch").exists() or list((tmp_path / "scratch").iterdir()) == []


def test_the_encoded_node_task_carries_no_storage_url():
    from fedrobust.protocol import encode_task

    cfg = load_config([f"tune.storage={URL}"])
    content = encode_task(cfg, 0)
    text = repr({k: dict(v) for k, v in content.config_records.items()})
    assert PASSWORD not in text and "db.example.org" not in text and "storage" not in text


def test_an_error_line_on_stderr_is_redacted(capsys):
    from fedrobust.cli import main

    assert main(["train", "train.device=postgresql://fed:hunter2@db.example.org/studies"]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "postgresql://fed:***@db.example.org/studies" in err
