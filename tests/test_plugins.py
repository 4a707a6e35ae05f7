"""Plug-ins: a strategy and an attack stage from an installed distribution, used from the shell.

The distribution is a folder on ``PYTHONPATH`` holding a module and its
``.dist-info`` (METADATA and entry_points.txt), which is what ``pip install``
leaves in site-packages. Every command runs in a fresh process, as a user
runs it, so nothing registered here leaks into other tests.
"""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# One module per group, so that a node, which loads strategies only, never imports the evaluation code.
STRATEGY = '''
"""Cross-entropy plus a small L2 penalty on the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from strategies.base import LossTerms, TrainingStrategy


@dataclass
class L2Config:
    l2: float = 1e-3  # weight of the sum of squared weights


class L2CrossEntropy(TrainingStrategy):
    name = "l2ce"
    Config = L2Config

    def __init__(self, l2: float = 1e-3) -> None:
        self.l2 = float(l2)

    def loss(self, model, x, y, *, peers=()):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        l2 = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad)
        return LossTerms(total=ce + self.l2 * l2, terms={"ce": ce.detach(), "l2": l2.detach()}, logits=logits.detach())
'''

ATTACK_STAGE = '''
"""R+FGSM (Tramer et al. 2018) as a white-box evaluation stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedrobust.evaluation.stages import WhiteboxStage


class RandFGSM:
    """A random sign step of eps/2, then an FGSM step of eps/2, inside the eps-ball and [0, 1]."""

    def __init__(self, model, eps: float, seed: int) -> None:
        self.model, self.eps, self.seed = model, eps, seed

    def __call__(self, x, y):
        g = torch.Generator().manual_seed(self.seed)
        x0 = (x + self.eps / 2 * torch.randn(x.shape, generator=g).sign()).clamp(0, 1).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(self.model(x0), y), x0)
        x_adv = x0.detach() + self.eps / 2 * grad.sign()
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)


class RandFGSMWhitebox(WhiteboxStage):
    name = "rfgsm"

    def steps(self, attack):
        return 1

    def build(self, target, attack):
        return RandFGSM(target, attack.eps, attack.seed)
'''

ENTRY_POINTS = """\
[fedrobust.strategies]
l2ce = fedrobust_toyplug.strategy:L2CrossEntropy

[fedrobust.attacks]
rfgsm = fedrobust_toyplug.attack:RandFGSMWhitebox
"""


def _distribution(folder: Path, modules: dict[str, str], entry_points: str, name: str = "fedrobust-toyplug") -> Path:
    """``folder`` as site-packages after ``pip install`` of a distribution ``name`` 0.1: package
    ``fedrobust_toyplug`` with ``modules`` (name -> source), and its entry points."""
    package = folder / "fedrobust_toyplug"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(source)
    info = folder / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return folder


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    return _distribution(tmp_path_factory.mktemp("plugin") / "site", {"strategy": STRATEGY, "attack": ATTACK_STAGE},
                         ENTRY_POINTS)


def _env(*paths: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def fedrobust(*args: str, plugins: tuple[Path, ...] = (), cwd: Path | None = None, timeout: int = 600):
    """``fedrobust ARGS`` from a shell, with ``plugins`` installed (on the path)."""
    return subprocess.run([sys.executable, "-m", "fedrobust.cli", *args], capture_output=True, text=True,
                          env=_env(*plugins), cwd=cwd or ROOT, timeout=timeout)


TRAIN = ["train.epochs=2", "train.batch_size=256", "train.progress=false", "deployment=distributed_iid",
         "deployment.num_nodes=2", "model=mlp"]
ATTACK = ["attack.num_samples=40", "attack.queries=10", "attack.surrogates=[mlp]", "attack.surrogate_epochs=1",
          "attack.transfer_attacks=[pgd]", "attack.transfer=pgd", "attack.transfer_steps=2",
          "attack.query_attacks=[square_linf]", "attack.whitebox_steps=2", "attack.tsr=false",
          "attack.hessian_samples=0", "attack.per_member=false", "attack.batch_size=40"]


def _members(run: Path) -> list[dict]:
    return [torch.load(p, weights_only=True) for p in sorted((run / "members").glob("member_*.pt"))]


@pytest.fixture(scope="module")
def trained(plugin, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "l2ce"
    proc = fedrobust("train", "engine=inline", "strategy=l2ce", "strategy.l2=0.01", *TRAIN, f"run_dir={run}",
                     plugins=(plugin,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_a_plugin_strategy_trains_from_the_shell(trained):
    import yaml

    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["strategy"] == {"name": "l2ce", "l2": 0.01}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = json.loads((trained / "results.json").read_text())
    assert results["strategy"] == "l2ce" and len(_members(trained)) == 2
    ea = EventAccumulator(str(trained / "tensorboard"))
    ea.Reload()
    assert {"loss_terms/node0/l2", "loss_terms/node1/l2"} <= set(ea.Tags()["scalars"])  # the plug-in's own term


def test_a_plugin_attack_runs_in_evaluate_and_lands_in_results(plugin, trained, tmp_path):
    proc = fedrobust("evaluate", str(trained), *ATTACK, "attack.whitebox=[fgsm,rfgsm]", f"attack.cache_dir={tmp_path}",
                     plugins=(plugin,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    attacks = json.loads((trained / "results.json").read_text())["ensemble"]["attacks"]
    assert set(attacks) >= {"whitebox_fgsm", "whitebox_rfgsm"}
    r = attacks["whitebox_rfgsm"]
    assert r["kind"] == "whitebox" and r["steps"] == 1 and 0 <= r["robust_accuracy"] <= 1


def test_plugin_names_and_keys_are_checked_before_anything_runs(plugin, tmp_path):
    run = tmp_path / "run"
    bad = [
        (("strategy=l2ce", "strategy.l2=abc"), (plugin,), "strategy.l2"),
        (("strategy=l2ce", "strategy.gamma=1"), (plugin,), "strategy.gamma"),
        (("strategy=l2ce",), (), "strategy: unknown value 'l2ce'"),  # not installed
        (("attack.whitebox=[fgsm,rfgsm]",), (), "attack.whitebox: unknown value 'rfgsm'"),
    ]
    for overrides, plugins, needle in bad:
        proc = fedrobust("train", "engine=inline", *overrides, f"run_dir={run}", plugins=plugins)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (overrides, proc.stderr[-2000:])
        assert not run.exists()


def test_a_plugin_strategy_that_takes_a_built_in_name_fails_in_one_line(tmp_path):
    taker = _distribution(tmp_path / "site", {"strategy": STRATEGY.replace('name = "l2ce"', 'name = "plain"')},
                          "[fedrobust.strategies]\nplain = fedrobust_toyplug.strategy:L2CrossEntropy\n",
                          name="fedrobust-taker")
    proc = fedrobust("train", "engine=inline", f"run_dir={tmp_path / 'run'}", plugins=(taker,))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "plug-in 'plain'" in lines[0] and "is built in; a plug-in needs a name of its own" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_broken_plugin_fails_in_one_line_naming_it_and_its_distribution(tmp_path):
    broken = _distribution(tmp_path / "site", {"strategy": "import no_such_module_here\n"},
                           "[fedrobust.strategies]\nbroken = fedrobust_toyplug.strategy:Nothing\n", name="fedrobust-broken")
    proc = fedrobust("train", "engine=inline", f"run_dir={tmp_path / 'run'}", plugins=(broken,))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "plug-in 'broken'" in lines[0] and "fedrobust-broken 0.1" in lines[0]
    assert "No module named 'no_such_module_here'" in lines[0]
    assert not (tmp_path / "run").exists()


_ENCODE = r"""
import sys
from flwr.common.serde import recorddict_to_proto
from fedrobust.plugins import load_plugins
from fedrobust.config import load_config
from fedrobust.protocol import encode_task
from fedrobust.task import node_task

assert load_plugins() == ["fedrobust.strategies:l2ce", "fedrobust.attacks:rfgsm"]
assert load_plugins() == []  # idempotent
cfg = load_config(["strategy=l2ce", "strategy.l2=0.01", "train.epochs=1", "train.progress=false",
                   "deployment=distributed_iid", "deployment.num_nodes=2", "model=mlp"])
sys.stdout.buffer.write(recorddict_to_proto(encode_task(node_task(cfg), 0, {})).SerializeToString())
"""

_CLIENT = r"""
import json, sys
from clients.client_app import app
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto
from flwr.supercore.task_identity import TaskIdentity
from fedrobust.protocol import decode_reply

for attr in ("_run_id", "_task_id", "_node_id"):
    setattr(TaskIdentity, attr, 1)
proto = RecordDictProto()
proto.ParseFromString(open(sys.argv[1], "rb").read())
msg = Message(content=recorddict_from_proto(proto), dst_node_id=100, message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
              run_config={})
try:
    (u,) = decode_reply(app(msg, ctx).content, "node 0")
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)
upper = sorted(m for m in sys.modules if m.startswith(("fedrobust.evaluation", "fedrobust.tuning")))
print(json.dumps({"member": u.member, "terms": sorted(u.history[0].terms), "upper": upper}))
"""


def test_a_client_app_loads_the_plugin_strategy_before_decoding_its_task(plugin, tmp_path):
    enc = subprocess.run([sys.executable, "-c", _ENCODE], capture_output=True, env=_env(plugin), cwd=ROOT, timeout=300)
    assert enc.returncode == 0, enc.stderr.decode()[-3000:]
    task = tmp_path / "task.pb"
    task.write_bytes(enc.stdout)

    def client(*plugins: Path) -> dict:
        proc = subprocess.run([sys.executable, "-c", _CLIENT, str(task)], capture_output=True, text=True,
                              env=_env(*plugins), cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    got = client(plugin)  # a fresh node with the plug-in installed: it trains, with the plug-in's loss
    assert got == {"member": 0, "terms": ["ce", "l2"], "upper": []}
    missing = client()  # a node without it refuses the task in one line
    assert missing["error"].startswith("TaskError: malformed task: strategy: unknown strategy 'l2ce'")
    assert "must be installed on the node" in missing["error"] and "\n" not in missing["error"]


def test_the_simulation_engine_trains_a_plugin_strategy_as_inline_does(plugin, trained, tmp_path):
    run = tmp_path / "sim"
    proc = fedrobust("train", "engine=simulation", "strategy=l2ce", "strategy.l2=0.01", *TRAIN, f"run_dir={run}",
                     plugins=(plugin,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim, inline = _members(run), _members(trained)
    assert len(sim) == len(inline) == 2
    for a, b in zip(sim, inline):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LOSSES_MODULE = '''
import torch

def half_margin(logits, y):
    true = logits.gather(1, y[:, None]).squeeze(1)
    return 0.5 * (logits.amax(1) - true)

# a searched loss, as the text a best.json holds
FOUND = "Neg(Mul(q, Log(Softmax(p))))"
BROKEN = "Neg(Frobnicate(p))"
'''


def _loss_distribution(folder: Path, name: str, entry_points: str) -> Path:
    """Like :func:`_distribution`, with a package of its own (``toylosses``) beside the strategy plug-in's."""
    (folder / "toylosses").mkdir(parents=True)
    (folder / "toylosses" / "__init__.py").write_text(LOSSES_MODULE)
    info = folder / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return folder


def test_plugin_losses_are_names_the_attacks_take_from_the_shell(plugin, trained, tmp_path):
    site = _loss_distribution(tmp_path / "site", "fedrobust-toylosses",
                              "[fedrobust.losses]\nhalf_margin = toylosses:half_margin\nfound = toylosses:FOUND\n")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    proc = fedrobust("evaluate", str(run), *ATTACK, "attack.whitebox=[pgd]", "attack.whitebox_loss=found",
                     "attack.transfer_loss=half_margin", f"attack.cache_dir={tmp_path / 'cache'}", plugins=(plugin, site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    attacks = json.loads((run / "results.json").read_text())["ensemble"]["attacks"]
    assert attacks["whitebox_pgd"]["loss"] == "found" and attacks["transfer_pgd"]["loss"] == "half_margin"
    # without the distribution the name is unknown, in one line
    proc = fedrobust("evaluate", str(run), "attack.whitebox_loss=found", plugins=(plugin,))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "attack.whitebox_loss: unknown value 'found'" in proc.stderr or "unknown attack loss" in proc.stderr, proc.stderr
    # an expression outside the search space: one line naming the entry point and its distribution
    broken = _loss_distribution(tmp_path / "broken", "fedrobust-badloss", "[fedrobust.losses]\nbroken = toylosses:BROKEN\n")
    proc = fedrobust("evaluate", str(run), "attack.whitebox_loss=broken", plugins=(plugin, broken))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "plug-in 'broken'" in lines[0] and "fedrobust-badloss 0.1" in lines[0] and "unknown primitive 'Frobnicate'" in lines[0]
