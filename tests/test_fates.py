"""Every image's fate: the clean point first, non-finite losses stated, unions, intervals and paired comparisons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch import nn

from fedrobust.attacks import APGD, APGDT, BIM, FGSM, MIFGSM, PGD, NonFiniteLoss, SquareAttack, register_loss, robust_images
from fedrobust.attacks.losses import LOSSES
from fedrobust.cli import main
from fedrobust.evaluation.fates import figure, load_fates, save_fate, unions
from fedrobust.stats import interval, paired
from test_bad_input import trained  # noqa: F401  (the module's finished one-epoch run, built once)



class WrongOnlyAtTheCleanPoint(nn.Module):
    """Right everywhere (a large margin for the true class) except exactly at the clean images, where it
    answers the next class: an attack that never evaluates ``x`` itself finds nothing to break."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int = 10) -> None:
        super().__init__()
        self.x, self.y, self.classes = x.clone(), y.clone(), classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        at_clean = (x.flatten(1)[:, None, :] == self.x.flatten(1)[None]).all(2)  # (batch, clean images)
        hit = at_clean.any(1)
        which = at_clean.float().argmax(1)
        # the label of the clean image the input is nearest to (the whole ball maps to its image's label)
        nearest = torch.cdist(x.flatten(1), self.x.flatten(1)).argmin(1)
        label = torch.where(hit, (self.y[which] + 1) % self.classes, self.y[nearest])
        logits = torch.zeros(len(x), self.classes) + 0.0 * x.flatten(1).sum(1, keepdim=True)
        return logits.scatter(1, label[:, None], 10.0)


@pytest.fixture
def probe():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g) * 0.8 + 0.1  # inside [0, 1], away from its edges
    y = torch.arange(8) % 10
    return WrongOnlyAtTheCleanPoint(x, y), x, y


@pytest.mark.parametrize("make", [
    lambda m: PGD(m, 0.05, steps=3, seed=1), lambda m: APGD(m, 0.05, steps=4, seed=1),
    lambda m: SquareAttack(m, 0.05, n_queries=20, seed=1), lambda m: SquareAttack(m, 0.5, "l2", n_queries=20, seed=1),
    lambda m: MIFGSM(m, 0.05, steps=2), lambda m: BIM(m, 0.05, steps=2), lambda m: FGSM(m, 0.05),
    lambda m: PGD(m, 0.5, steps=3, seed=1, norm="l2"), lambda m: APGD(m, 0.5, steps=4, seed=1, norm="l2"),
    lambda m: APGDT(m, 0.5, steps=4, targets=2, seed=1, norm="l2"),
], ids=["pgd", "apgd", "square-linf", "square-l2", "mifgsm", "bim", "fgsm", "pgd-l2", "apgd-l2", "apgd-t-l2"])
def test_an_image_wrong_at_the_clean_point_is_never_robust(probe, make):
    model, x, y = probe
    assert bool((model(x).argmax(1) != y).all())  # wrong at every clean image
    assert bool((model(x + 0.01).argmax(1) == y).all())  # right just beside it
    res = robust_images(model, make(model), x, y, batch_size=8)
    assert not bool(res.robust.any())


def _nan_on_even(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, times NaN on the even-numbered images of a batch: a searched loss gone wrong on some."""
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    bad = torch.zeros_like(ce).index_fill(0, torch.arange(0, len(ce), 2), float("nan"))
    return ce + bad


def test_a_nan_gradient_stops_the_attack_unless_cross_entropy_stands_in():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].bias[0] = 100.0  # every image classified 0, right, and robust: none leaves the batch
    x, y = torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)
    with pytest.raises(NonFiniteLoss, match="non-finite value or gradient on 3 of 6"):
        PGD(model, 0.05, steps=2, loss=_nan_on_even)(x, y)
    res = PGD(model, 0.05, steps=2, loss=_nan_on_even, nonfinite="ce").run(x, y)
    assert res.fallback.tolist() == [True, False] * 3


@pytest.fixture
def nan_loss():
    register_loss("nan_on_even", _nan_on_even)
    yield "nan_on_even"
    LOSSES.pop("nan_on_even", None)


_ATTACK = ["attack.num_samples=12", "attack.queries=5", "attack.surrogates=[mlp]", "attack.surrogate_epochs=1",
           "attack.transfer_attacks=[pgd]", "attack.transfer=pgd", "attack.query_attacks=[square_linf,square_l2]",
           "attack.whitebox=[fgsm,pgd]", "attack.whitebox_steps=2", "attack.transfer_steps=1", "attack.tsr=false",
           "attack.apgd_steps=2",
           "attack.hessian_samples=0", "train.progress=false"]


def test_a_nan_loss_ends_the_evaluation_in_one_line_and_writes_nothing_over(trained, tmp_path, capsys, nan_loss):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "results.json").read_bytes()
    code = main(["evaluate", str(run), *_ATTACK, f"attack.whitebox_loss={nan_loss}",
                 f"attack.cache_dir={tmp_path / 'cache'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedrobust:")]
    assert code == 1
    assert len(err) == 1 and "nan_on_even" in err[0] and "non-finite" in err[0] and "FGSM" in err[0]  # the first
    assert (run / "results.json").read_bytes() == before

    # attack.nonfinite=ce: cross-entropy stands in, and the entry says on how many images
    assert main(["evaluate", str(run), *_ATTACK, f"attack.whitebox_loss={nan_loss}", "attack.nonfinite=ce",
                 f"attack.cache_dir={tmp_path / 'cache'}"]) == 0
    results = json.loads((run / "results.json").read_text())
    fgsm = results["ensemble"]["attacks"]["whitebox_fgsm"]
    assert fgsm["nonfinite_fallback_images"] == 6  # the even-numbered images of one batch of 12
    assert int(np.load(run / "fates" / "whitebox_fgsm.npz")["fallback"].sum()) == 6


def test_unions_are_never_above_any_of_their_attacks_image_by_image(trained, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["evaluate", str(run), *_ATTACK, "attack.whitebox=[fgsm,pgd,apgd_l2]",
                 f"attack.cache_dir={tmp_path / 'cache'}"]) == 0
    results = json.loads((run / "results.json").read_text())
    records = load_fates(run, results["evaluation"]["key"])
    assert set(records) == {"clean", "transfer_pgd", "query_square_linf", "query_square_l2", "whitebox_fgsm",
                            "whitebox_pgd", "whitebox_apgd_l2"}
    ens = results["ensemble"]
    # the L2 attacks (another budget) form unions of their own, at attack.eps_l2
    assert ens["attacks"]["whitebox_apgd_l2"]["norm"] == "l2" and ens["attacks"]["whitebox_apgd_l2"]["eps"] == 0.5
    assert ens["unions"]["whitebox_l2"]["attacks"] == ["whitebox_apgd_l2"]
    assert ens["unions"]["whitebox_query_l2"]["attacks"] == ["query_square_l2", "whitebox_apgd_l2"]
    l2 = records["query_square_l2"]["ensemble"] & records["whitebox_apgd_l2"]["ensemble"]
    assert ens["unions"]["whitebox_query_l2"]["robust_images"] == int(l2.sum())
    all_, wb = ens["unions"]["all"], ens["unions"]["whitebox"]
    assert wb["attacks"] == ["whitebox_fgsm", "whitebox_pgd"]
    assert all_["attacks"] == ["transfer_pgd", "query_square_linf", "whitebox_fgsm", "whitebox_pgd"]
    assert ens["unions"]["whitebox_query"]["attacks"] == ["query_square_linf", "whitebox_fgsm", "whitebox_pgd"]
    union = np.logical_and.reduce([records[n]["ensemble"] for n in all_["attacks"]])
    assert all_["robust_images"] == int(union.sum())
    for name in all_["attacks"]:
        r = records[name]["ensemble"]
        assert not bool((union & ~r).any()), name  # robust in the union => robust under each attack
        assert not bool((r & ~records["clean"]["ensemble"]).any()), name  # never robust where wrong when clean
        assert ens["attacks"][name]["robust_images"] == int(r.sum())
        lo, hi = ens["attacks"][name]["interval"]
        assert lo <= ens["attacks"][name]["robust_accuracy"] <= hi
    for m, member in enumerate(results["members"]):
        on_member = [records[n]["members"][m] for n in member["unions"]["all"]["attacks"]]
        assert member["unions"]["all"]["robust_images"] == int(np.logical_and.reduce(on_member).sum())
    assert records["query_square_linf"]["queries"].min() >= 1  # the clean point is a query too
    # a run report from the records
    assert main(["report", str(run)]) == 0
    assert "union: all" in (run / "report.md").read_text()


def test_unions_of_constructed_records():
    records = {"transfer_a": {"ensemble": np.array([1, 1, 0, 1], bool), "members": np.array([[1, 0, 1, 1]], bool)},
               "whitebox_b": {"ensemble": np.array([1, 0, 1, 1], bool)},
               "whitebox_c": {"ensemble": np.array([0, 1, 1, 1], bool)}}
    ensemble, members = unions(records)
    assert ensemble["whitebox"]["robust_images"] == 2 and ensemble["all"]["robust_images"] == 1
    assert "whitebox_query" not in ensemble  # no query attack among the records
    assert ensemble["all"]["attacks"] == ["transfer_a", "whitebox_b", "whitebox_c"]
    assert members == [{"all": {**figure(np.array([1, 0, 1, 1], bool)), "attacks": ["transfer_a"]}}]


def test_wilson_interval_and_mcnemar_against_scipy():
    lo, hi = interval(0, 40)
    assert lo == 0.0 and 0.08 < hi < 0.09  # Wilson: 3.84 / 43.84 = 0.0876 at k = 0
    assert interval(20, 40) == pytest.approx([0.3520, 0.6480], abs=1e-4)
    # a constructed 2x2 table of 100 images: both right 50, only A 14, only B 4, both wrong 32
    a = np.array([1] * 50 + [1] * 14 + [0] * 4 + [0] * 32, bool)
    b = np.array([1] * 50 + [0] * 14 + [1] * 4 + [0] * 32, bool)
    p = paired(a, b)
    assert (p.only_a, p.only_b, p.n) == (14, 4, 100)
    assert p.difference == pytest.approx(0.10)
    assert p.p_value == pytest.approx(min(1.0, 2 * binom.cdf(4, 18, 0.5)), rel=1e-9)  # exact McNemar: 0.0309
    assert p.interval[0] > 0 and p.interval[0] < p.difference < p.interval[1]  # p < 0.05: the interval excludes 0
    same = paired(a, a)
    assert same.p_value == 1.0 and same.interval == [0.0, 0.0]


def _fake_run(path: Path, indices, ensemble: dict[str, list[int]], key: str = "k") -> Path:
    path.mkdir(parents=True)
    attacks = {n: {"kind": n.split("_")[0], "robust_accuracy": float(np.mean(v)), "eps": 0.1, "norm": "linf"}
               for n, v in ensemble.items() if n != "clean"}
    (path / "results.json").write_text(json.dumps({
        "ensemble": {"clean_accuracy_sample": float(np.mean(ensemble["clean"])), "attacks": attacks},
        "evaluation": {"key": key, "num_samples": len(indices)}}))
    for name, values in ensemble.items():
        save_fate(path, name, key, "test", np.array(indices), ensemble=np.array(values, bool))
    return path


def test_compare_prints_paired_differences_and_refuses_other_images(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", [1, 2, 3, 4], {"clean": [1, 1, 1, 1], "whitebox_pgd": [1, 1, 0, 1],
                                                  "transfer_cwa": [1, 1, 1, 0]})
    b = _fake_run(tmp_path / "b", [1, 2, 3, 4], {"clean": [1, 1, 1, 0], "whitebox_pgd": [0, 0, 0, 0],
                                                  "transfer_cwa": [1, 1, 1, 0]})
    out = tmp_path / "compare.md"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| whitebox_pgd "))
    assert "+0.7500" in row and "3/0" in row and "| 0.25 |" in row  # 3 discordant images, all for A: p = 2/8
    assert "| union: all |" in text and "| union: whitebox |" in text
    d = _fake_run(tmp_path / "d", [1, 2, 3, 4], {"clean": [1, 1, 1, 1]})
    doc = json.loads((d / "results.json").read_text())
    doc["evaluation"]["eps"] = 0.2
    (d / "results.json").write_text(json.dumps(doc))
    assert main(["compare", str(a), str(d), "--out", str(out)]) == 2  # another budget: refused
    assert "attack.eps" in capsys.readouterr().err
    c = _fake_run(tmp_path / "c", [1, 2, 3, 5], {"clean": [1, 1, 1, 1]})
    assert main(["compare", str(a), str(c), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not evaluated on the same images" in err[0]


def test_a_run_evaluated_before_fates_still_reports(tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "run_before_fates", run)
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    assert "| whitebox_apgd | 0.3250 | [0.201, 0.480] |" in text  # 13 of 40, its Wilson interval
    assert "no union over attacks can be formed" in text


def test_the_loss_search_history_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import csv

    from fedrobust.lossearch.search import write_history

    path = tmp_path / "history.csv"
    write_history(path, [{"generation": 0, "best": 0.5}])
    before = path.read_text()

    def fail(self, rows):
        raise KeyboardInterrupt  # a Ctrl-C mid-write

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(KeyboardInterrupt):
        write_history(path, [{"generation": 0, "best": 0.5}, {"generation": 1, "best": 0.4}])
    assert path.read_text() == before and not list(tmp_path.glob(".history.csv.*"))  # nor a half-written copy


@pytest.mark.parametrize("preset, stages, norm", [
    ("autoattack", ["query_square_linf", "whitebox_apgd", "whitebox_apgd_t"], "linf"),
    ("autoattack_l2", ["query_square_l2", "whitebox_apgd_l2", "whitebox_apgd_t_l2"], "l2"),
])
def test_the_autoattack_presets_run_apgd_ce_apgd_t_and_square_in_their_norm(preset, stages, norm):
    from fedrobust.config import load_config
    from fedrobust.evaluation.stages import build_stages

    a = load_config([f"attack={preset}"]).attack
    assert a.apgd_steps == 100 and a.apgd_targets == 9 and a.queries == 5000
    built = [s for s in build_stages(a, 3) if s.group in ("query", "whitebox")]
    assert [f"{s.group}_{s.name}" for s in built] == stages
    assert all(getattr(s, "norm", "linf") == norm for s in built)
