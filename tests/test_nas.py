"""Architecture search (AdvRush, paper 003): the search space, DARTS' discretisation, genotype files, the
smoothness penalty's alpha-gradient, and a resumed search."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedrobust.nas import Genotype, GenotypeError, MixedEdge, SearchedNetwork, Supernet, discretise, load_genotype
from fedrobust.nas.genotype import parse_genotype
from fedrobust.nas.ops import PRIMITIVES
from fedrobust.nas.penalty import smoothness_penalty
from fedrobust.nas.supernet import edge_count

TINY = ["data=digits", "arch_search.images=160", "arch_search.batch_size=32", "arch_search.layers=3",
        "arch_search.channels=4", "arch_search.steps=2", "arch_search.probe_images=8", "arch_search.power_iters=2",
        "arch_search.net_layers=2", "arch_search.net_channels=4", "arch_search.progress=false"]


@pytest.mark.parametrize("stride", [1, 2])
def test_a_mixed_edge_with_one_hot_weights_is_its_chosen_operation(stride):
    torch.manual_seed(0)
    edge = MixedEdge(3, stride).double()
    x = torch.randn(4, 3, 7, 7, dtype=torch.double)
    for k, name in enumerate(PRIMITIVES):
        w = F.one_hot(torch.tensor(k), len(PRIMITIVES)).double()
        out = edge(x, w)
        assert out.shape == (4, 3, 4 if stride == 2 else 7, 4 if stride == 2 else 7), name
        assert torch.equal(out, edge.ops[k](x)), name  # BN in training mode: batch statistics, deterministic


def test_every_operation_maps_odd_and_even_sizes_alike_and_the_networks_run_on_8_28_and_32_pixels():
    for size, channels in ((8, 1), (28, 1), (32, 3)):
        net = Supernet(channels, 10, layers=3, channels=4, steps=2)
        x = torch.rand(2, channels, size, size)
        assert net(x).shape == (2, 10)
        assert SearchedNetwork(net.genotype(), channels, 10)(x).shape == (2, 10)
    halved = Supernet(1, 10, layers=3, channels=4, steps=2, stem_stride=2)  # 28 -> 14 in the stem
    assert halved(torch.rand(2, 1, 28, 28)).shape == (2, 10) and halved.genotype().stem_stride == 2
    assert parse_genotype(halved.genotype().to_json()).stem_stride == 2


def _reference_parse(alpha: torch.Tensor, steps: int) -> list[tuple[str, int]]:
    """DARTS' rule written out plainly, as a second opinion."""
    w = torch.softmax(alpha.double(), dim=-1).tolist()
    genes, start = [], 0
    for node in range(steps):
        rows = w[start:start + node + 2]
        best = [max(v for k, v in enumerate(r) if PRIMITIVES[k] != "none") for r in rows]
        top2 = sorted(sorted(range(len(rows)), key=lambda j: -best[j])[:2])
        for j in top2:
            k = max((k for k in range(len(PRIMITIVES)) if PRIMITIVES[k] != "none"), key=lambda k: rows[j][k])
            genes.append((PRIMITIVES[k], j))
        start += node + 2
    return genes


def test_discretisation_keeps_the_two_strongest_non_zero_inputs_per_node():
    steps = 4
    alpha = torch.zeros(edge_count(steps), len(PRIMITIVES))
    none = PRIMITIVES.index("none")
    # node 0 (edges 0, 1): both inputs kept whatever 'none' says
    alpha[0, none], alpha[0, PRIMITIVES.index("sep_conv_3x3")] = 9.0, 1.0
    alpha[1, PRIMITIVES.index("max_pool_3x3")] = 2.0
    # node 1 (edges 2, 3, 4): edge 2 has the largest 'none' weight of all but a weak best operation: dropped
    alpha[2, none] = 20.0
    alpha[3, PRIMITIVES.index("dil_conv_5x5")] = 3.0
    alpha[4, PRIMITIVES.index("skip_connect")] = 2.5
    # node 3 (edges 9..13): inputs 1 and 4 win
    alpha[10, PRIMITIVES.index("avg_pool_3x3")] = 4.0
    alpha[13, PRIMITIVES.index("sep_conv_5x5")] = 5.0
    g = discretise(alpha, alpha, steps, layers=5, channels=8)
    assert g.normal[:4] == (("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_5x5", 1), ("skip_connect", 2))
    assert g.normal[6:] == (("avg_pool_3x3", 1), ("sep_conv_5x5", 4))
    assert all(op != "none" for op, _ in g.normal)
    for seed in range(20):  # and on random alphas, the plain reference
        a = torch.randn(edge_count(steps), len(PRIMITIVES), generator=torch.Generator().manual_seed(seed))
        assert list(discretise(a, a, steps, layers=5, channels=8).normal) == _reference_parse(a, steps)


def test_a_genotype_round_trips_through_json(tmp_path):
    net = Supernet(1, 10, layers=3, channels=2, steps=3, generator=torch.Generator().manual_seed(3))
    g = net.genotype(layers=4, channels=6)
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(g.to_dict(search={"gamma": 0.01})))
    back = load_genotype(path)
    assert back == g and isinstance(back, Genotype) and back.steps == 3
    assert parse_genotype(g.to_json()) == g and back.to_json() == g.to_json()
    a, b = SearchedNetwork(g, 1, 10), SearchedNetwork(back, 1, 10)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize("text, fault", [
    ("{", "not JSON"), ("[]", "JSON object"), ('{"format": "x"}', "format"),
    ('{"format": "fedrobust-genotype/1", "normal": [["conv_9x9", 0], ["skip_connect", 1]], "reduce": [], '
     '"layers": 2, "channels": 4}', "unknown operation"),
    ('{"format": "fedrobust-genotype/1", "normal": [["skip_connect", 0], ["skip_connect", 2]], '
     '"reduce": [["skip_connect", 0], ["skip_connect", 1]], "layers": 2, "channels": 4}', "input"),
    ('{"format": "fedrobust-genotype/1", "normal": [["skip_connect", 0], ["skip_connect", 1]], '
     '"reduce": [["skip_connect", 0], ["skip_connect", 1]], "layers": 1000000000, "channels": 4}', "layers"),
    ("[" * 30_000 + "]" * 30_000, "JSON nested too deeply"), (" " * 70_000, "more than a genotype's"),
], ids=["not-json", "array", "format", "unknown-op", "input-range", "layers", "deep", "big"])
def test_a_bad_genotype_is_one_line_naming_the_fault(tmp_path, text, fault):
    path = tmp_path / "g.json"
    path.write_text(text)
    with pytest.raises(GenotypeError) as info:
        load_genotype(path)
    msg = str(info.value)
    assert fault in msg and "\n" not in msg and str(path) in msg


def test_the_penalty_gradient_in_alpha_agrees_with_finite_differences():
    torch.manual_seed(0)
    net = Supernet(1, 3, layers=3, channels=4, steps=2, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():  # away from the uniform start, so the operations' weights differ
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    x, y = torch.rand(4, 1, 6, 6, dtype=torch.double), torch.tensor([0, 1, 2, 0])
    x0 = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(net(x0), y, reduction="sum"), x0)
    z = g0.sign() / g0.sign().flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # z* held fixed for the check

    def penalty() -> torch.Tensor:
        return smoothness_penalty(net, x, y, h=0.5, direction=z)

    auto = torch.cat([g.flatten() for g in torch.autograd.grad(penalty(), net.arch_parameters())])
    fd, step = [], 1e-6
    with torch.no_grad():
        for a in net.arch_parameters():
            for i in range(a.numel()):
                flat = a.view(-1)
                flat[i] += step
                up = float(penalty())
                flat[i] -= 2 * step
                down = float(penalty())
                flat[i] += step
                fd.append((up - down) / (2 * step))
    fd = torch.tensor(fd, dtype=torch.double)
    assert auto.norm() > 1e-6
    cos = F.cosine_similarity(auto, fd, dim=0)
    assert cos >= 0.99, float(cos)
    assert torch.allclose(auto, fd, rtol=1e-3, atol=1e-6 * float(fd.abs().max()))


def _search(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedrobust.cli", "search-arch", str(out), *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_a_resumed_search_ends_with_the_uninterrupted_searchs_genotype(tmp_path, monkeypatch):
    from fedrobust.nas import search as search_mod
    from fedrobust.nas.settings import load_settings
    from fedrobust.data import load_dataset

    args = [a for a in TINY if a.startswith("arch_search.")] + ["arch_search.epochs=3", "arch_search.warmup=1",
                                                                "arch_search.gamma=0.5"]
    s = load_settings(args)
    data = load_dataset("digits")
    whole = search_mod.run_search(tmp_path / "whole", data, s)

    real_epoch = search_mod._epoch

    def stop_in_epoch_2(model, search, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt  # as SIGINT would, in the middle of the second epoch
        return real_epoch(model, search, epoch, *rest)

    monkeypatch.setattr(search_mod, "_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        search_mod.run_search(tmp_path / "resumed", data, s)
    assert not (tmp_path / "resumed" / "genotype.json").exists()
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    monkeypatch.setattr(search_mod, "_epoch", real_epoch)
    resumed = search_mod.run_search(tmp_path / "resumed", data, s)
    assert resumed["normal"] == whole["normal"] and resumed["reduce"] == whole["reduce"]
    assert json.loads((tmp_path / "resumed" / "alpha.json").read_text()) == \
        json.loads((tmp_path / "whole" / "alpha.json").read_text())
    import csv

    def history(name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((tmp_path / name / "history.csv").open())]

    assert len(history("resumed")) == 3 and history("resumed") == history("whole")


def test_the_command_writes_a_genotype_the_penalty_runs_after_the_warm_up_and_a_rerun_is_refused(tmp_path):
    out = tmp_path / "s"
    _search(out, "arch_search.epochs=2", "arch_search.warmup=1", "arch_search.gamma=0.5")
    g = load_genotype(out / "genotype.json")
    assert g.layers == 2 and g.channels == 4 and g.steps == 2
    doc = json.loads((out / "genotype.json").read_text())
    assert doc["search"]["gamma"] == 0.5 and doc["search"]["data"] == "digits"
    import csv

    rows = list(csv.DictReader((out / "history.csv").open()))
    assert rows[0]["penalty"] == "nan" and float(rows[1]["penalty"]) > 0  # the penalty only after the warm-up
    assert all(float(r["lambda_max"]) == float(r["lambda_max"]) for r in rows)
    assert (out / "search.png").is_file() and any((out / "tensorboard").iterdir())
    proc = _search(out, "arch_search.epochs=2", "arch_search.warmup=1", "arch_search.gamma=0.1", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "differing: gamma" in proc.stderr
    again = _search(out, "arch_search.epochs=2", "arch_search.warmup=1", "arch_search.gamma=0.5")
    assert load_genotype(out / "genotype.json") == g and "resuming" in again.stderr  # finished: nothing to redo


@pytest.mark.parametrize("override, key", [
    ("arch_search.epochs=0", "arch_search.epochs"), ("arch_search.warmup=5", "arch_search.warmup"),
    ("arch_search.gamma=-1", "arch_search.gamma"), ("arch_search.h=0", "arch_search.h"),
    ("arch_search.alpha_betas=[0.5]", "arch_search.alpha_betas"), ("arch_search=huge", "arch_search"),
    ("arch_search.nope=1", "arch_search.nope"), ("model=cnn", "model=cnn"), ("data=imagenet", "data"),
    ("arch_search.channels=2", "arch_search.channels"), ("arch_search.stem_stride=3", "arch_search.stem_stride"),
])
def test_bad_settings_exit_2_in_one_line_and_write_nothing(tmp_path, capsys, override, key):
    from fedrobust.cli import main

    out = tmp_path / "s"
    code = main(["search-arch", str(out), *TINY, "arch_search.epochs=2", "arch_search.warmup=1", override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedrobust: error: ") and err.count("\n") == 1 and key in err
    assert not out.exists()


def test_a_supernet_of_fewer_than_3_cells_is_refused_and_the_halves_are_stratified():
    import numpy as np

    from fedrobust.errors import ConfigError
    from fedrobust.data import load_dataset
    from fedrobust.nas.search import split_halves
    from fedrobust.nas.settings import load_settings

    with pytest.raises(ConfigError, match="layers: must be >= 3"):
        load_settings(["arch_search.layers=2"])
    data = load_dataset("digits")
    w, a = split_halves(data, 400, 0)
    assert len(w) == len(a) == 200 and not set(w) & set(a)
    y = np.asarray(data.y_train)
    share = np.bincount(y, minlength=10) / len(y)
    for half in (w, a):  # each class within one image of its share of the training set
        assert np.abs(np.bincount(y[half], minlength=10) - 200 * share).max() <= 1.0
