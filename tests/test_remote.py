"""A trial's run directory as a stream of bounded items, and the cache files a node may lack."""

from __future__ import annotations

import numpy as np
import pytest

from fedrobust.tuning import remote
from fedrobust.tuning.remote import install_files, pack_files, receive_dir, send_dir


def _tree(root, rng):
    files = {"results.json": b'{"a": 1}', "members/member_0.pt": rng.bytes(3 * 1000 + 7),
             "tensorboard/events.out.tfevents.1": rng.bytes(10), "empty.txt": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_a_directory_round_trips_in_items_no_larger_than_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "CHUNK", 1000)
    files = _tree(tmp_path / "src", np.random.default_rng(0))
    items = list(send_dir(tmp_path / "src"))
    assert max(len(i) for i in items if isinstance(i, bytes)) <= 1000
    assert sum(isinstance(i, bytes) for i in items) == 4 + 1 + 1  # 3007 bytes in 4 chunks, the others in one
    dest = tmp_path / "trials" / "trial_0000"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("left by a killed attempt")
    trailer = receive_dir(iter(items), dest)
    assert trailer == {"done": True, "files": 4, "bytes": sum(map(len, files.values()))}
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    assert not (tmp_path / "trials" / "trial_0000.partial").exists()


@pytest.mark.parametrize("damage", ["truncated", "tampered", "escape"])
def test_a_damaged_stream_leaves_nothing_behind(tmp_path, damage):
    _tree(tmp_path / "src", np.random.default_rng(1))
    items = list(send_dir(tmp_path / "src"))
    if damage == "truncated":  # the node died mid-transfer
        items = items[:-2]
    elif damage == "tampered":
        k = next(i for i, item in enumerate(items) if isinstance(item, bytes) and len(item) > 100)
        items[k] = bytes([items[k][0] ^ 1]) + items[k][1:]
    else:
        items.insert(0, {"file": "../outside.txt", "size": 1, "sha256": "0"})
    dest = tmp_path / "trials" / "trial_0001"
    with pytest.raises(ValueError):
        receive_dir(iter(items), dest)
    assert not dest.exists() and not (tmp_path / "trials" / "trial_0001.partial").exists()
    assert not (tmp_path / "trials" / "outside.txt").exists()


def test_install_files_writes_only_what_the_cache_lacks_and_fetches_nothing_otherwise(tmp_path, monkeypatch):
    src = tmp_path / "tuner-cache"
    (src / "surrogates").mkdir(parents=True)
    (src / "surrogates" / "zoo.pt").write_bytes(b"zoo weights")
    (src / "transfer").mkdir()
    (src / "transfer" / "cwa.pt").write_bytes(b"adversarial examples")
    names = ["surrogates/zoo.pt", "transfer/cwa.pt"]
    packed = pack_files(src, names)

    import ray

    fetched = []
    monkeypatch.setattr(ray, "get", lambda ref: fetched.append(ref) or packed)
    node = tmp_path / "node-cache"
    (node / "transfer").mkdir(parents=True)
    (node / "transfer" / "cwa.pt").write_bytes(b"adversarial examples")
    assert install_files(node, names, ["ref"]) == ["surrogates/zoo.pt"]
    assert (node / "surrogates" / "zoo.pt").read_bytes() == b"zoo weights" and fetched == ["ref"]
    assert install_files(node, names, ["ref"]) == [] and fetched == ["ref"]  # complete: the object is not fetched
