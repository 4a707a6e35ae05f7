"""A searched loss (``file:PATH``) wherever a loss name is: checked when the config is, used by the stages,
keyed by its expression, recorded readably."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fedrobust.attacks import LOSSES, SearchedLoss, register_loss
from fedrobust.attacks.expression import MAX_DEPTH
from fedrobust.cli import main
from fedrobust.errors import ConfigError
from fedrobust.config import load_config
from fedrobust.evaluation import stages as st
from fedrobust.evaluation.evaluate import _evaluation_key
from fedrobust.runs.cache import content_key
from fedrobust.runs.images import Images
from fedrobust.runs.members import member_files
from test_bad_input import trained  # noqa: F401  (the module's finished one-epoch run, built once)

pytestmark = pytest.mark.xdist_group("loss_config")

CE = "Neg(Mul(q, Log(Softmax(p))))"
# a fast evaluation: one transfer, one query and one white-box attack on 8 images, no TSR or curvature
SMALL = ["attack.num_samples=8", "attack.surrogates=[cnn]", "attack.surrogate_epochs=1", "attack.transfer_steps=1",
         "attack.transfer_attacks=[pgd]", "attack.transfer=pgd", "attack.query_attacks=[square_linf]",
         "attack.queries=2", "attack.whitebox=[pgd]", "attack.whitebox_steps=2", "attack.tsr=false",
         "attack.hessian_samples=0", "attack.per_member=false", "train.progress=false"]


def loss_file(path: Path, expression: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "fedrobust-loss/1", "expression": expression, "fitness": 0.5}))
    return path


def _hashes(root: Path) -> dict[str, str | None]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _object(expression: str) -> str:
    return json.dumps({"format": "fedrobust-loss/1", "expression": expression})


# name -> what the file holds (str or bytes; None: no file); the message's part after the file's path
BAD_FILES = {
    "not JSON": ("{'expression': ", "not JSON"),
    "JSON but not an object": ('["Neg(p)"]', "expected a JSON object"),
    "unknown primitive": (_object("Frobnicate(p)"), "unknown primitive 'Frobnicate'"),
    "hostile expression": (_object("__import__('os').system('touch PWNED')"), "unknown primitive '__import__'"),
    "deeper than the limit": (_object("Neg(" * (MAX_DEPTH + 10) + "p" + ")" * (MAX_DEPTH + 10)), "deeper than"),
    "missing file": (None, "no such file"),
    "2 MB file": (b" " * (2 << 20) + _object(CE).encode(), "larger than"),
    "JSON nested 100000 levels": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
}


# the two most hostile through the console script, the rest in process (the same code path: a process
# start costs about 5 s of CPU, mostly importing torch)
THROUGH_THE_SHELL = ("hostile expression", "JSON nested 100000 levels")


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_loss_file_is_refused_in_one_line_before_anything_runs(name, trained, tmp_path, capsys, monkeypatch):  # noqa: F811
    content, needle = BAD_FILES[name]
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    bad = tmp_path / "losses" / "best.json"
    bad.parent.mkdir()
    if isinstance(content, str):
        bad.write_text(content)
    elif content is not None:
        bad.write_bytes(content)
    before = _hashes(run)
    args = ["evaluate", str(run), f"attack.whitebox_loss=file:{bad}"]
    if name in THROUGH_THE_SHELL:
        done = subprocess.run([sys.executable, "-m", "fedrobust.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code = main(args)
        out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("fedrobust: error: attack.whitebox_loss: "), err
    assert str(bad) in err and needle in err, err
    assert "Traceback" not in err + out
    assert _hashes(run) == before  # byte-identical, nothing created
    for root in (tmp_path, Path(trained).parent, Path.cwd()):
        assert not list(root.rglob("PWNED")), root


def test_the_transfer_loss_is_checked_the_same_way_and_names_its_key(tmp_path):
    bad = loss_file(tmp_path / "bad.json", "Frobnicate(p)")
    with pytest.raises(ConfigError, match=r"^attack\.transfer_loss: .*bad\.json: unknown primitive 'Frobnicate'"):
        load_config([f"attack.transfer_loss=file:{bad}"])
    with pytest.raises(ConfigError, match=r"^attack\.whitebox_loss: file: needs a path"):
        load_config(["attack.whitebox_loss=file:"])
    with pytest.raises(ConfigError, match=r"^attack\.whitebox_loss: unknown value 'hinge' \(choose from ce, margin, dlr"):
        load_config(["attack.whitebox_loss=hinge"])


def test_a_good_loss_file_and_a_registered_name_pass_the_check(tmp_path, monkeypatch):
    good = loss_file(tmp_path / "search" / "best.json", CE)
    cfg = load_config([f"attack.whitebox_loss=file:{good}", f"attack.transfer_loss=file:{good}"])
    # read once, now: the config keeps the expression (trials, nodes and caches never read the file again)
    expr = "expr:" + SearchedLoss.parse(CE).text
    assert cfg.attack.whitebox_loss == expr and cfg.attack.transfer_loss == expr
    assert dict(cfg.attack.loss_files) == {"whitebox_loss": str(good), "transfer_loss": str(good)}
    # relative to the working folder, as a shell user types it
    rel = load_config(["attack.whitebox_loss=file:search/best.json"]).attack
    assert rel.whitebox_loss == expr and rel.loss_files.whitebox_loss == "search/best.json"
    good.unlink()  # gone: a config that holds the expression still loads, and means the same loss
    assert load_config([f"attack.whitebox_loss='{expr}'"]).attack.whitebox_loss == expr  # quoted for Hydra
    with pytest.raises(ConfigError, match="attack.whitebox_loss: expression"):
        load_config(["attack.whitebox_loss='expr:Nonsense(p'"])
    with pytest.raises(ConfigError, match="unknown value 'searched_ce'"):
        load_config(["attack.whitebox_loss=searched_ce"])
    monkeypatch.setitem(LOSSES, "searched_ce", LOSSES["ce"])  # undone after the test, whatever register_loss does
    register_loss("searched_ce", CE)
    assert load_config(["attack.whitebox_loss=searched_ce"]).attack.whitebox_loss == "searched_ce"


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_the_whitebox_stage_runs_pgd_with_the_files_loss_and_records_it(tmp_path):
    good = loss_file(tmp_path / "best.json", CE)
    cfg = load_config([f"attack.whitebox_loss=file:{good}", "attack.whitebox_steps=3", "attack.batch_size=4"])
    torch.manual_seed(0)
    model = _Tiny().eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    stage = st.REGISTRY["whitebox"]["pgd"]()
    attack = stage.build(model, cfg.attack)
    assert isinstance(attack.loss_fn, SearchedLoss) and attack.loss_fn.text == CE  # the file's loss is what runs
    logits = model(x)
    assert torch.allclose(attack.loss_fn(logits, y), F.cross_entropy(logits, y, reduction="none"), atol=1e-4)
    x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= cfg.attack.eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    entry = stage.run(attack=cfg.attack, target=model, x=x, y=y)["attacks"]["whitebox_pgd"]
    assert entry["loss"] == f"expr:{CE}" and entry["loss_expression"] == CE and entry["loss_file"] == str(good)
    assert 0 <= entry["robust_accuracy"] <= 1
    # the built-in name is recorded as before: the name alone
    ce = stage.run(attack=load_config(["attack.whitebox_steps=3"]).attack, target=model, x=x, y=y)
    assert {k: v for k, v in ce["attacks"]["whitebox_pgd"].items() if k.startswith("loss")} == {"loss": "ce"}


def test_fedrobust_evaluate_with_a_loss_file_records_it_in_results_json(trained, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    good = loss_file(tmp_path / "best.json", CE)
    assert main(["evaluate", str(run), *SMALL, f"attack.whitebox_loss=file:{good}",
                 f"attack.transfer_loss=file:{good}"]) == 0
    results = json.loads((run / "results.json").read_text())
    attacks = results["ensemble"]["attacks"]
    for name in ("whitebox_pgd", "transfer_pgd"):
        assert attacks[name]["loss"] == f"expr:{CE}" and attacks[name]["loss_expression"] == CE, attacks[name]
        assert attacks[name]["loss_file"] == str(good)
    assert attacks["query_square_linf"]["loss"] == "margin" and "loss_expression" not in attacks["query_square_linf"]
    assert results["attack_config"]["whitebox_loss"] == f"expr:{CE}"
    assert results["attack_config"]["loss_files"]["whitebox_loss"] == str(good)


def test_a_searched_loss_is_keyed_by_its_expression_and_a_builtin_name_keeps_its_key(trained, tmp_path):  # noqa: F811
    path = tmp_path / "best.json"
    other = tmp_path / "elsewhere" / "best.json"
    attack = OmegaConf.create({"eps": 0.03, "transfer_steps": 10, "transfer_loss": "ce", "seed": 0,
                               "cache_dir": str(tmp_path / "cache")})
    transfer = st.TransferExamples(attack, np.arange(4))
    # the key this cache entry had before searched losses existed: existing caches stay valid
    assert transfer.path("cwa", "zookey").name == "aa0f005353fc412a51c4ef3b.pt"

    def transfer_key(file: Path, expression: str) -> str:
        loss_file(file, expression)
        attack.transfer_loss = f"file:{file}"
        return transfer.path("cwa", "zookey").name

    ce_key, margin_key = transfer_key(path, CE), transfer_key(path, "Add(Max(Add(p, Neg(Mul(q, p)))), Neg(Sum(Mul(q, p))))")
    assert ce_key != margin_key  # two files at one path
    assert transfer_key(other, CE) == ce_key  # one expression at two paths

    cfg = load_config(SMALL)
    images = Images("test", np.arange(8), 360, 0)
    builtin = _evaluation_key(trained, cfg, images)
    # the key as it was computed before searched losses existed
    h = hashlib.sha256()
    for p in member_files(trained):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    settings = {k: v for k, v in OmegaConf.to_container(cfg.attack, resolve=True).items()
                if k not in ("cache_dir", "loss_files")}
    assert builtin == content_key({"members": h.hexdigest(), "attack": settings, "data": cfg.data.name,
                                   "split": "test", "indices": list(range(8)), "version": 2})

    def evaluation_key(file: Path, expression: str) -> str:
        loss_file(file, expression)
        return _evaluation_key(trained, load_config([*SMALL, f"attack.whitebox_loss=file:{file}"]), images)

    first, second = evaluation_key(path, CE), evaluation_key(path, "Neg(Sum(Mul(q, p)))")
    assert len({builtin, first, second}) == 3
    assert evaluation_key(other, CE) == first
