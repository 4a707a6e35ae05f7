import numpy as np
import pytest

from fedrobust.data import load_dataset
from fedrobust.partition import PartitionError, class_counts_table, node_shards, partition_indices

LABELS = load_dataset("digits").y_train.numpy()


def _dirichlet(seed, n=5, alpha=0.9):
    return partition_indices(LABELS, "distributed_dirichlet", n, alpha, seed)


def test_dirichlet_same_seed_same_shards_other_seed_differs():
    a, b, c = _dirichlet(123), _dirichlet(123), _dirichlet(7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(a, c))


@pytest.mark.parametrize("deployment", ["distributed_iid", "distributed_dirichlet"])
def test_shards_are_disjoint_and_cover_the_data(deployment):
    shards = partition_indices(LABELS, deployment, 4, 0.9, 123)
    assert len(shards) == 4
    allidx = np.concatenate(shards)
    assert len(allidx) == len(np.unique(allidx)) == len(LABELS)


def test_iid_is_balanced_and_dirichlet_is_skewed():
    iid = partition_indices(LABELS, "distributed_iid", 3, seed=123)
    sizes = [len(s) for s in iid]
    assert max(sizes) - min(sizes) <= 1
    frac = lambda shards: np.array([np.bincount(LABELS[s], minlength=10) / len(s) for s in shards])  # noqa: E731
    skew_iid = np.abs(frac(iid) - 0.1).max()
    skew_dir = np.abs(frac(_dirichlet(123, n=3, alpha=0.1)) - 0.1).max()
    assert skew_dir > 3 * skew_iid


@pytest.mark.parametrize("deployment", ["centralized", "deep_ensemble"])
def test_single_node_deployments_use_the_full_set(deployment):
    (shard,) = partition_indices(LABELS, deployment, 3)
    assert np.array_equal(shard, np.arange(len(LABELS)))


def test_train_val_split_is_80_20_disjoint_and_independent_of_training_seed():
    shards = node_shards(LABELS, "distributed_dirichlet", 3, 0.9, 123, 0.2)
    for s in shards:
        n = len(s.train) + len(s.val)
        assert abs(len(s.val) - 0.2 * n) <= 1
        assert not set(s.train) & set(s.val)
    assert node_shards(LABELS, "distributed_dirichlet", 3, 0.9, 123, 0.2) is shards  # cached by content


def test_more_nodes_than_samples_is_refused():
    with pytest.raises(PartitionError, match="deployment.num_nodes"):
        partition_indices(LABELS[:10], "distributed_iid", 11)


def test_class_counts_table_has_a_row_per_node():
    table = class_counts_table({0: [1, 2], 1: [3, 4]})
    lines = table.splitlines()
    assert lines[1].split() == ["node", "0", "1", "total"]
    assert lines[3].split() == ["0", "1", "2", "3"] and lines[4].split() == ["1", "3", "4", "7"]


def test_partitions_are_cached_on_disk_and_a_bad_entry_is_recomputed(tmp_path, monkeypatch):
    """A second process finds the partition on disk and never imports flwr-datasets; a tampered entry is ignored."""
    import json
    import subprocess
    import sys

    monkeypatch.setenv("FEDROBUST_CACHE", str(tmp_path))
    first = partition_indices(LABELS, "distributed_dirichlet", 4, 0.9, 123)
    (entry,) = (tmp_path / "shards").glob("distributed_dirichlet-*.json")
    code = ("import sys; import numpy as np; from fedrobust.partition import partition_indices; "
            f"s = partition_indices(np.array({LABELS.tolist()}), 'distributed_dirichlet', 4, 0.9, 123); "
            "print(sum(map(len, s)), 'flwr_datasets' in sys.modules)")
    env = {**__import__("os").environ, "FEDROBUST_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == [str(sum(map(len, first))), "False"]
    # an entry whose indices overlap (or leave the data set) is not trusted: the partition is computed again
    bad = json.loads(entry.read_text())
    bad["shards"][1] = bad["shards"][0]
    entry.write_text(json.dumps(bad))
    again = partition_indices(LABELS, "distributed_dirichlet", 4, 0.9, 123)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert json.loads(entry.read_text())["shards"][1] != bad["shards"][1]  # and rewritten
