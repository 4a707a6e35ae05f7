"""Strategy math, the peer exchange, and every strategy under every engine and deployment."""

import json

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedrobust.cli import main
from fedrobust.config import load_config
from fedrobust.data import load_dataset
from fedrobust.attacks.smoothness import hvp
from fedrobust.node import initial_weights
from fedrobust.protocol import decode_reply, encode_task
from fedrobust.training import MemberTrainer, TrainSettings
from strategies import EDLCM, Adversarial, Curvature, Dispersion, Plain
from strategies.curvature import curvature_penalty
from strategies.dispersion import dispersion_term, pairwise_cosine
from strategies.hessian import default_h, frozen_running_stats, gradient_difference, sign_direction


def _smooth(seed=0, width=8):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, width), torch.nn.Tanh(), torch.nn.Linear(width, 4)).double()


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def test_finite_difference_hg_approaches_exact_hvp():
    model = _smooth()
    x, y = _batch()
    x0 = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x0), y, reduction="sum"), x0)
    g = sign_direction(grad)
    exact = hvp(model, x, y, g)
    errs = []
    for h in (1e-1, 1e-2, 1e-3, 1e-4):
        _, diff = gradient_difference(model, x, y, h, create_graph=False)
        errs.append(float((diff / h - exact).norm() / exact.norm()))
    assert all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-3, errs


def test_curvature_gradient_matches_finite_differences_in_the_weights():
    model = _smooth(1)
    x, y = _batch(4, 1)
    h = 0.05

    def penalty():
        return curvature_penalty(gradient_difference(model, x, y, h, create_graph=True)[1])

    params = list(model.parameters())
    grads = torch.autograd.grad(penalty(), params)
    gen = torch.Generator().manual_seed(0)
    for p, gp in zip(params, grads):
        for _ in range(3):
            i = int(torch.randint(0, p.numel(), (1,), generator=gen))
            delta = 1e-6
            with torch.no_grad():
                p.view(-1)[i] += delta
            up = float(penalty().detach())
            with torch.no_grad():
                p.view(-1)[i] -= 2 * delta
            down = float(penalty().detach())
            with torch.no_grad():
                p.view(-1)[i] += delta
            fd = (up - down) / (2 * delta)
            assert fd == pytest.approx(float(gp.view(-1)[i]), rel=1e-4, abs=1e-9)


def test_dispersion_is_symmetric_and_bounded():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(6, 1, 3, 4, generator=g) for _ in range(3))
    assert torch.allclose(pairwise_cosine(a, b), pairwise_cosine(b, a))
    for u, v in ((a, b), (a, -a), (a, a), (b, c)):
        cos = pairwise_cosine(u, v)
        assert bool(((cos >= -1 - 1e-6) & (cos <= 1 + 1e-6)).all())
    assert float(pairwise_cosine(a, a).mean()) == pytest.approx(1.0)
    assert float(pairwise_cosine(a, -a).mean()) == pytest.approx(-1.0)
    assert float(dispersion_term([a, b, c])) == pytest.approx(float(dispersion_term([c, a, b])), abs=1e-6)
    assert -3 <= float(dispersion_term([a, b, c])) <= 3


def _digits_trainer(strategy, peers=()):
    d = load_dataset("digits")
    cfg = load_config([])
    from fedrobust.node import build_member

    model = build_member(cfg, d, seed=3)
    t = MemberTrainer(model, d.x_train[:300], d.y_train[:300], d.x_train[300:400], d.y_train[300:400], strategy,
                      TrainSettings(epochs=2, batch_size=64), seed=3)
    t.run(2, peers=peers, progress=False)
    return t


@pytest.mark.parametrize("grad", ["fd", "exact"])
def test_alpha_beta_zero_reproduce_plain_exactly(grad):
    plain = _digits_trainer(Plain())
    for zero in (EDLCM(alpha=0.0, beta=0.0, grad=grad), Curvature(alpha=0.0, grad=grad), Dispersion(beta=0.0, grad=grad)):
        other = _digits_trainer(zero)
        for k, v in plain.model.state_dict().items():
            assert torch.equal(v, other.model.state_dict()[k]), (zero.name, k)


def test_lazy_regularisation_applies_the_scaled_penalty_on_one_batch_in_k():
    model = _smooth(2)
    x, y = _batch(6, 2)
    pairs = ((Curvature(alpha=0.7, h=0.05, every=3), Curvature(alpha=0.7, h=0.05)), (EDLCM(h=0.05, every=3), EDLCM(h=0.05)))
    for strategy, exact in pairs:
        term = "curvature"
        strategy.begin_batch(4)  # 4 % 3 != 0: plain cross-entropy
        skipped = strategy.loss(model, x, y)
        assert torch.equal(skipped.total, Plain().loss(model, x, y).total) and term not in skipped.terms
        strategy.begin_batch(6)  # 6 % 3 == 0: the regulariser, scaled by 3
        lazy = strategy.loss(model, x, y)
        full = exact.loss(model, x, y)
        reg = full.total - torch.nn.functional.cross_entropy(model(x), y)
        assert float(lazy.total.detach()) == pytest.approx(float((full.total + 2 * reg).detach()), rel=1e-10)


def test_regularisers_change_training_and_leave_bn_statistics_alone():
    plain, curv = _digits_trainer(Plain()), _digits_trainer(Curvature(alpha=1.0))
    sd_p, sd_c = plain.model.state_dict(), curv.model.state_dict()
    assert not torch.equal(sd_p["1.classifier.weight"], sd_c["1.classifier.weight"])
    counts = [v for k, v in sd_c.items() if k.endswith("num_batches_tracked")]
    assert all(int(c) == int(counts[0]) for c in counts) and int(counts[0]) == 2 * 5  # 2 epochs x 5 batches, not 2x
    bn = torch.nn.BatchNorm1d(3)
    before = bn.running_mean.clone()
    with frozen_running_stats(bn):
        bn(torch.randn(8, 3) + 5)
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0


def test_default_h_is_the_l2_radius_of_the_8_255_ball():
    assert default_h(torch.zeros(2, 3, 32, 32)) == pytest.approx(8 / 255 * 3072**0.5)
    assert default_h(torch.zeros(2, 1, 8, 8)) == pytest.approx(8 / 255 * 8)


def test_adversarial_schedule_and_adaptive_weight():
    adv = Adversarial(eps=0.1, eps_start=0.1)
    assert adv.epsilon_at(0, 10) == pytest.approx(0.01) and adv.epsilon_at(9, 10) == pytest.approx(0.1)
    eps = [adv.epsilon_at(e, 10) for e in range(10)]
    assert eps == sorted(eps)
    d = load_dataset("digits")
    from fedrobust.node import build_member

    model = build_member(load_config([]), d, seed=0)
    terms = adv.begin_epoch(model, 5, 10, d.x_test[:64], d.y_test[:64], seed=0)
    from fedrobust.attacks import accuracy

    clean = accuracy(model.eval(), d.x_test[:64], d.y_test[:64])
    a = terms["clean_weight"]
    assert a == pytest.approx(terms["val_adv_acc"] / (terms["val_adv_acc"] + clean)) and 0 <= a <= 1


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def test_client_loss_depends_on_peer_weights(task_identity):
    """Through the real ClientApp and Flower records: node 0's dispersion term changes with peer 1's weights."""
    from clients.client_app import app as client_app

    cfg = load_config(["strategy=dispersion", "train.epochs=1", "train.progress=false"])
    peers = initial_weights(cfg, load_dataset("digits"), [1, 2])
    moved = {1: {k: (v * 1.5 if v.is_floating_point() else v) for k, v in peers[1].items()}, 2: peers[2]}

    def run(peer_weights):
        msg = Message(content=encode_task(cfg, 0, peer_weights), dst_node_id=100, message_type=MessageType.TRAIN)
        ctx = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={})
        (u,) = decode_reply(client_app(msg, ctx).content, "node 0")
        return u

    a, b, again = run(peers), run(moved), run(peers)
    assert a.history[0].terms["dispersion"] != b.history[0].terms["dispersion"]
    assert not torch.equal(torch.from_numpy(a.weights["1.classifier.weight"]), torch.from_numpy(b.weights["1.classifier.weight"]))
    assert a.history[0].terms == again.history[0].terms  # and nothing else changed between the calls
    assert a.current is not None  # the member is sent back for its peers


# plain under every deployment, inline: tests/test_engines.py::test_each_deployment_trains_inline
STRATEGY_NAMES = ["curvature", "dispersion", "edlcm", "adversarial"]
DEPLOYMENTS = ["centralized", "deep_ensemble", "distributed_iid", "distributed_dirichlet"]


def _train(tmp_path, engine, strategy, deployment, *extra_overrides):
    run = tmp_path / f"{engine}-{strategy}-{deployment}"
    nodes = [] if deployment == "centralized" else ["deployment.num_nodes=3"]
    extra = ["strategy.steps=2"] if strategy == "adversarial" else []
    # two rounds where peers are exchanged between nodes, one elsewhere (a round costs a Ray dispatch in simulation)
    federated = deployment.startswith("distributed")
    rounds = ["train.epochs=2", "train.rounds=2"] if strategy in ("dispersion", "edlcm") and federated else ["train.epochs=1"]
    code = main(["train", f"engine={engine}", f"strategy={strategy}", f"deployment={deployment}", *nodes, *extra,
                 *rounds, "train.batch_size=256", "train.progress=false", *extra_overrides, f"run_dir={run}"])
    assert code == 0
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["ensemble"]["clean_accuracy"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return results, set(ea.Tags()["scalars"])


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_trains_inline(tmp_path, strategy, deployment):
    # The digits MLP (batch norm too): what is checked is how a strategy meets a deployment (peers, joint
    # members, loss terms), which the model does not change, and it trains in a fifth of the CNN's time.
    # The CNN meets the regularisers in tests/test_regulariser.py (with ResNet-18) and tests/test_engines.py's
    # EDLCM simulation == inline, and curvature and adversarial training in the simulation cells below.
    results, tags = _train(tmp_path, "inline", strategy, deployment, "model=mlp")
    terms = {"curvature": ["ce", "curvature"], "dispersion": ["ce", "dispersion"],
             "edlcm": ["ce", "curvature", "dispersion"], "adversarial": ["ce_clean", "ce_adv", "eps", "clean_weight"]}
    single = deployment in ("centralized", "deep_ensemble")
    who = "node0_member0" if deployment == "deep_ensemble" else "node0"
    for term in terms[strategy]:
        if term == "dispersion" and deployment == "centralized":
            continue  # one member, no pair
        assert f"loss_terms/{who}/{term}" in tags, (term, sorted(tags))
    assert len(results["members"]) == (1 if deployment == "centralized" else 3)
    assert single or len({m["node"] for m in results["members"]}) == 3
    assert results["strategy_grad"] == ("fd" if strategy in ("curvature", "dispersion", "edlcm") else None)


# Flower's engine only carries tasks, members and peers; what a strategy does happens in the same
# train_node_round as inline (full matrix above). So each deployment goes through the simulation once,
# and each strategy: tests/test_engines.py runs edlcm (curvature, and dispersion's peer exchange through
# Flower records) with distributed_dirichlet over two rounds, and checks its members equal inline's bit for bit.
SIMULATION_CELLS = [("plain", "centralized"), ("curvature", "deep_ensemble"), ("adversarial", "distributed_iid")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, deployment", SIMULATION_CELLS)
def test_every_strategy_trains_in_simulation(tmp_path, strategy, deployment):
    results, _ = _train(tmp_path, "simulation", strategy, deployment)
    assert results["engine"] == "simulation"


def test_a_strategy_is_built_by_name_and_a_plugin_cannot_take_a_built_in_name(monkeypatch):
    import strategies

    built = strategies.build_strategy("curvature", {"alpha": 0.5, "every": 2})
    assert isinstance(built, strategies.Curvature)
    assert isinstance(strategies.build_strategy(load_config(["strategy=curvature"]).strategy), strategies.Curvature)

    class Mine(strategies.Plain):
        name = "mine"

    monkeypatch.setattr(strategies, "STRATEGIES", dict(strategies.STRATEGIES))  # undone after the test
    with pytest.raises(ValueError, match="'plain' is built in"):
        strategies.register_strategy(Mine, "plain")
    with pytest.raises(TypeError, match="not a TrainingStrategy subclass"):
        strategies.register_strategy(dict, "mine")
    strategies.register_strategy(Mine)
    assert isinstance(strategies.build_strategy("mine"), Mine)
    with pytest.raises(ValueError, match="unknown strategy 'other'"):
        strategies.build_strategy("other")
