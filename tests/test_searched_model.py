"""A searched architecture as a model like any other: ``model=searched:PATH/genotype.json``.

The genotype file is read once, where the config is loaded; the run's config keeps the genotype's JSON
(``model.genotype``) and a node receives it inline (``searched:{...}``), so that nothing after the command
line reads the file again: a run is evaluated after its genotype file is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedrobust.cli import main
from fedrobust.errors import ConfigError
from fedrobust.config import config_from_json, config_to_json
from fedrobust.overrides import inline_model_overrides
from fedrobust.models.settings import model_spec
from fedrobust.models import build_model, count_parameters, resolve_model
from fedrobust.nas import GenotypeError, Supernet, parse_genotype
from fedrobust.validation import apply_overrides, load_config

SHARED_RUN = pytest.mark.xdist_group("searched_model")  # the tests of the module's one trained run, on one worker

FEDROBUST = Path(sys.executable).with_name("fedrobust")  # the console script of this environment
TRAIN = ["train.epochs=1", "train.progress=false", "train.batch_size=64"]
# a fast evaluation: one transfer, one query and one white-box attack on 8 images, no TSR or curvature
SMALL = ["attack.num_samples=8", "attack.surrogate_epochs=1", "attack.transfer_steps=1",
         "attack.transfer_attacks=[pgd]", "attack.transfer=pgd", "attack.query_attacks=[square_linf]",
         "attack.queries=2", "attack.whitebox=[pgd]", "attack.whitebox_steps=2", "attack.tsr=false",
         "attack.hessian_samples=0", "attack.per_member=false", "train.progress=false"]


def tiny_genotype() -> dict:
    """A 2-cell, 4-channel genotype as fedrobust search-arch writes it (search notes included)."""
    torch.manual_seed(0)
    g = Supernet(1, 10, layers=3, channels=4).genotype(layers=2, channels=4)
    return g.to_dict(search={"epochs": 1, "note": "ignored"})


def other_genotype() -> dict:
    """Another architecture of the same size: every operation a 3x3 separable convolution."""
    g = tiny_genotype()
    for cell in ("normal", "reduce"):
        g[cell] = [["sep_conv_3x3", j] for _, j in g[cell]]
    return g


def write(path: Path, genotype: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(genotype if isinstance(genotype, str) else json.dumps(genotype, indent=2))
    return path


def canonical(genotype: dict) -> str:
    return parse_genotype(json.dumps(genotype)).to_json()


# ------------------------------------------------------------------ the model --

def test_a_genotype_builds_the_same_model_from_its_file_and_inline(tmp_path):
    path = write(tmp_path / "genotype.json", tiny_genotype())
    inline = resolve_model(f"searched:{path}")
    assert inline == "searched:" + canonical(tiny_genotype())  # the search notes are not part of the model
    assert resolve_model("searched:" + json.dumps(tiny_genotype(), indent=1)) == inline  # any spelling: one form
    assert resolve_model("cnn") == "cnn"

    a = build_model(f"searched:{path}", 1, 10, [0.5], [0.25])
    b = build_model(inline, 1, 10, [0.5], [0.25])
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    assert type(a[0]).__name__ == "Normalize"  # [0, 1] inputs, as every model takes them
    assert a.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)

    with pytest.raises(GenotypeError, match="no such file"):
        resolve_model(f"searched:{tmp_path / 'nowhere.json'}")
    with pytest.raises(GenotypeError, match="needs a genotype file"):
        build_model("searched:", 1, 10, [0.5], [0.25])


# ------------------------------------------------------------------ config --

@pytest.mark.parametrize("override", ["model=searched:{}", "model.name=searched:{}", "model='searched:{}'"])
def test_the_config_keeps_the_genotype_whatever_the_file_is_called(tmp_path, override):
    path = write(tmp_path / "runs" / "l'essai [2] {x} é" / "genotype (1).json", tiny_genotype())
    cfg = load_config([override.format(path), "data=fashion_mnist", "engine=inline"])  # the data set picks lenet
    assert cfg.model.name == f"searched:{path}"
    assert cfg.model.genotype == canonical(tiny_genotype())
    assert model_spec(cfg) == resolve_model(f"searched:{path}")

    again = config_from_json(config_to_json(cfg))  # the JSON a trial or the baseline is built from
    assert again.model == cfg.model
    saved = OmegaConf.load(_saved(cfg, tmp_path))  # and the YAML a run directory keeps
    assert saved.model.genotype == cfg.model.genotype

    write(path, other_genotype())  # an edited (or deleted) file does not change a loaded run's model...
    assert apply_overrides(again, ["attack.eps=0.1"]).model.genotype == canonical(tiny_genotype())
    # ...but naming the model again reads it again, as a new load does
    assert apply_overrides(again, [f"model.name=searched:{path}"]).model.genotype == canonical(other_genotype())
    assert apply_overrides(again, ["model.name=cnn"]).model.genotype is None
    assert load_config([override.format(path)]).model.genotype == canonical(other_genotype())


def _saved(cfg, tmp_path: Path) -> Path:
    out = tmp_path / "config.yaml"
    out.write_text(OmegaConf.to_yaml(cfg))
    return out


def test_a_config_refuses_a_genotype_it_cannot_trust(tmp_path):
    path = write(tmp_path / "g.json", tiny_genotype())
    cfg = load_config([f"model=searched:{path}"])
    with pytest.raises(ConfigError, match=r"^model\.genotype: 'layers' must be an integer"):
        config_from_json(config_to_json(cfg).replace('\\"layers\\":2', '\\"layers\\":1000000000'))
    inline = load_config(["model.name=searched:" + json.dumps(tiny_genotype())])
    assert inline.model.genotype == cfg.model.genotype
    data = json.loads(config_to_json(inline))
    data["model"]["genotype"] = canonical(other_genotype())  # a config whose two fields disagree
    with pytest.raises(ConfigError, match=r"^model\.genotype: differs"):
        config_from_json(json.dumps(data))
    with pytest.raises(ConfigError, match=r"^model\.name: .*: no such file"):  # a folder, a FIFO: never opened
        load_config([f"model=searched:{tmp_path}"])
    with pytest.raises(ConfigError, match=r"^model\.genotype: read from model\.name"):
        load_config(["model.genotype=x"])
    with pytest.raises(ConfigError, match=r"^model\.name: unknown model 'nosuch'.*searched:PATH"):
        load_config(["model.name=nosuch"])


def test_hparams_show_a_digest_of_the_genotype_not_its_json(tmp_path):
    from fedrobust.config import default_config
    from fedrobust.views import run_hparams

    cfg = load_config([f"model=searched:{write(tmp_path / 'g.json', tiny_genotype())}"])
    hp = run_hparams(cfg, default_config())
    assert hp["model.name"] == f"searched:{tmp_path / 'g.json'}"
    assert hp["model.genotype"].startswith("sha256:") and len(hp["model.genotype"]) == 19


def test_a_deployment_is_sent_the_genotype_not_its_path(tmp_path):
    path = write(tmp_path / "g.json", tiny_genotype())
    overrides = [f"model=searched:{path}", "train.epochs=2"]
    sent = inline_model_overrides(overrides, load_config(overrides))
    assert sent == ["train.epochs=2", "model.name=" + resolve_model(f"searched:{path}")]
    path.unlink()
    assert load_config(sent).model.genotype == canonical(tiny_genotype())  # the ServerApp's machine has no file
    assert inline_model_overrides(["model=cnn"], load_config(["model=cnn"])) == ["model=cnn"]


# ------------------------------------------------------------------ the node's task --

def test_a_node_is_sent_the_genotype_and_checks_it(tmp_path):
    from fedrobust.protocol import decode_task, encode_task
    from fedrobust.task import TaskError, node_task

    path = write(tmp_path / "g.json", tiny_genotype())
    cfg = load_config([f"model=searched:{path}", "engine=inline"])
    task = node_task(cfg)
    assert task.model == resolve_model(f"searched:{path}") and str(path) not in task.model
    decoded, _, _ = decode_task(encode_task(task, 0))
    assert decoded == task

    bad_layers = dict(tiny_genotype(), layers=10**9)
    for model, needle in [(f"searched:{path}", "not as a file name"),
                          ("searched:{nope", "not JSON"),
                          ("searched:" + json.dumps(bad_layers), "'layers' must be an integer"),
                          ("searched:" + "[" * 30000 + "]" * 30000, "not as a file name"),
                          ("searched:" + '{"a":' * 10_000 + "1" + "}" * 10_000, "nested too deeply"),
                          ("resnet99", "unknown value 'resnet99'")]:
        rd = encode_task(task, 0)
        rd["task"]["model"] = model
        with pytest.raises(TaskError) as err:
            decode_task(rd)
        msg = str(err.value)
        assert msg.startswith("malformed task: model: ") and needle in msg and "\n" not in msg, msg
        assert len(msg) < 400


# ------------------------------------------------------------------ bad files, through the console script --

HOSTILE = ["not JSON", "a JSON array", "unknown operation", "code as an operation", "input out of range",
           "a billion layers", "a 2 MB file", "100k-deep nesting", "deep nesting under the size cap", "a missing file"]


def _hostile_files(folder: Path) -> dict[str, Path]:
    g = tiny_genotype()

    def with_op(op: str) -> dict:
        return dict(g, normal=[[op, 0], *g["normal"][1:]])

    return {
        "not JSON": write(folder / "notjson.json", "{'normal': nope"),
        "a JSON array": write(folder / "array.json", "[1, 2, 3]"),
        "unknown operation": write(folder / "unknown.json", with_op("conv_9x9")),
        "code as an operation": write(folder / "code.json", with_op("__import__('os').system('touch PWNED')")),
        "input out of range": write(folder / "index.json", dict(g, normal=[["sep_conv_3x3", 7], *g["normal"][1:]])),
        "a billion layers": write(folder / "layers.json", dict(g, layers=10**9)),
        "a 2 MB file": write(folder / "big.json", dict(g, search={"pad": "x" * (2 * 1024 * 1024)})),
        "100k-deep nesting": write(folder / "deep.json", "[" * 100_000 + "]" * 100_000),
        "deep nesting under the size cap": write(folder / "deep30k.json", "[" * 30_000 + "]" * 30_000),
        "a missing file": folder / "missing.json",
    }


# the two most hostile through the console script, the rest in process (the same code path: a process
# start costs about 5 s, mostly importing torch)
THROUGH_THE_SHELL = ("code as an operation", "100k-deep nesting")


@pytest.mark.parametrize("case", HOSTILE)
def test_a_bad_genotype_file_stops_train_in_one_line_before_anything_is_written(tmp_path, case, capsys, monkeypatch):
    path = _hostile_files(tmp_path / "genotypes")[case]
    work = tmp_path / "work"
    work.mkdir()
    args = ["train", f"model=searched:{path}", "engine=inline", "train.epochs=1", f"run_dir={work / 'run'}"]
    if case in THROUGH_THE_SHELL:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        done = subprocess.run([str(FEDROBUST), *args], capture_output=True, text=True, timeout=120, cwd=work, env=env)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        monkeypatch.chdir(work)
        code = main(args)
        out, err = capsys.readouterr()
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("fedrobust: error: model.name: "), err[-2000:]
    assert len(err) < 600 and out == ""
    assert list(work.iterdir()) == []  # no run directory (nor runs/), no PWNED
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


# ------------------------------------------------------------------ training and evaluation --

@pytest.fixture(scope="module")
def searched_run(tmp_path_factory) -> tuple[Path, Path]:
    """A one-epoch inline run (3 Dirichlet nodes) of a tiny searched model; the genotype file beside it."""
    root = tmp_path_factory.mktemp("searched")
    genotype = write(root / "genotype.json", tiny_genotype())
    run = root / "run"
    assert main(["train", "engine=inline", f"model=searched:{genotype}", *TRAIN, f"run_dir={run}"]) == 0
    return run, genotype


@SHARED_RUN
def test_the_inline_engine_trains_a_searched_model(searched_run):
    run, genotype = searched_run
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.model.name == f"searched:{genotype}" and saved.model.genotype == canonical(tiny_genotype())
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == f"searched:{genotype}" and results["ensemble"]["num_members"] == 3
    weights = torch.load(run / "members" / "member_0.pt", map_location="cpu", weights_only=True)
    expected = build_model(resolve_model(f"searched:{genotype}"), 1, 10, [0.5], [0.25]).state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in expected.items()}
    assert '"format":"fedrobust-genotype/1"' not in (run / "train.log").read_text()  # the log names the file


def test_a_regularised_strategy_trains_a_searched_model(tmp_path):
    path = write(tmp_path / "g.json", tiny_genotype())
    run = tmp_path / "run"
    assert main(["train", "engine=inline", "deployment=centralized", "strategy=curvature", f"model=searched:{path}",
                 *TRAIN, f"run_dir={run}"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["strategy"] == "curvature" and results["ensemble"]["num_members"] == 1


@pytest.mark.slow
@SHARED_RUN
def test_the_simulation_engine_trains_the_same_searched_members_as_inline(searched_run, tmp_path):
    run, genotype = searched_run
    sim = tmp_path / "sim"
    assert main(["train", "engine=simulation", f"model=searched:{genotype}", *TRAIN, f"run_dir={sim}"]) == 0
    for m in range(3):
        a = torch.load(run / "members" / f"member_{m}.pt", map_location="cpu", weights_only=True)
        b = torch.load(sim / "members" / f"member_{m}.pt", map_location="cpu", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"member {m}"


@SHARED_RUN
def test_evaluate_needs_no_genotype_file_and_takes_a_searched_surrogate(searched_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(searched_run[0], run)
    gone = tmp_path / "genotype.json"  # the run's genotype file, deleted once the run is trained
    shutil.copy(searched_run[1], gone)
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(run / "config.yaml"), {"model": {"name": f"searched:{gone}"}}),
                   run / "config.yaml")
    gone.unlink()
    surrogate = write(tmp_path / "surrogate.json", other_genotype())
    assert main(["evaluate", str(run), *SMALL, f"attack.surrogates=[cnn,searched:{surrogate}]"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert set(results["ensemble"]["robust_accuracy"]) >= {"transfer", "query"}
    assert results["evaluation"]["surrogate_zoo"]


def test_the_models_command_lists_every_model_and_genotype(tmp_path, capsys):
    from fedrobust.models.settings import MODELS

    path = write(tmp_path / "g.json", tiny_genotype())
    capsys.readouterr()
    assert main(["models", "data=cifar100", str(path), f"searched:{path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cifar100: 3x32x32 images, 100 classes"
    rows = {line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1].replace(",", "")) for line in lines[2:]}
    assert list(rows) == [*MODELS, f"searched:{path}"]  # a bare path is taken as searched:PATH
    assert rows["resnet18"] == count_parameters("resnet18", "cifar100") > 11_000_000
    assert rows[f"searched:{path}"] == count_parameters(f"searched:{path}", "cifar100") > 0
    capsys.readouterr()
    assert main(["models", str(tmp_path / "nowhere.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedrobust: error: ") and "no such file" in err


# ------------------------------------------------------------------ surrogates and tuning --

def test_the_zoo_key_is_the_genotypes_not_its_paths(tmp_path):
    from fedrobust.data import load_dataset
    from fedrobust.evaluation.surrogates import zoo_key

    data = load_dataset("digits")
    path = write(tmp_path / "zoo" / "g.json", tiny_genotype())
    cfg = load_config([f"attack.surrogates=[cnn,searched:{path}]"])
    first = zoo_key(cfg, data)
    write(path, other_genotype())  # the same path, another architecture: another zoo
    second = zoo_key(cfg, data)
    assert first != second
    moved = write(tmp_path / "elsewhere" / "copy.json", other_genotype())  # the same architecture elsewhere
    assert zoo_key(load_config([f"attack.surrogates=[cnn,searched:{moved}]"]), data) == second
    assert zoo_key(load_config(["attack.surrogates=[cnn]"]), data) not in (first, second)
    with pytest.raises(ConfigError, match=r"^attack\.surrogates: .*no such file"):
        load_config([f"attack.surrogates=[cnn,searched:{tmp_path / 'nowhere.json'}]"])


def test_a_searched_model_is_a_choice_of_the_tuning_space(tmp_path):
    from fedrobust.tuning.space import SearchSpace
    from fedrobust.tuning.trial import apply_values

    path = write(tmp_path / "g.json", tiny_genotype())
    space_override = f'+tune.space.model.name={{type:categorical,choices:[cnn,"searched:{path}"]}}'
    cfg = load_config(["engine=inline", space_override])
    space = SearchSpace.from_config(cfg)
    assert space.distributions["model.name"].choices == ("cnn", f"searched:{path}")
    assert space.genotypes == {f"searched:{path}": canonical(tiny_genotype())}

    values = space.config_values({"model.name": f"searched:{path}", "optimizer.lr": 0.05})
    path.unlink()  # a trial on another machine: the genotype travels with its values
    trial = apply_values(cfg, values)
    assert trial.model.name == f"searched:{path}" and model_spec(trial) == "searched:" + canonical(tiny_genotype())
    assert apply_values(trial, space.config_values({"model.name": "cnn"})).model.genotype is None

    with pytest.raises(ConfigError, match=r"^tune\.space\.model\.name: .*no such file"):
        SearchSpace.from_config(load_config(["engine=inline", space_override]))
