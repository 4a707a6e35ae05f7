"""What search-loss and search-arch share (fedrobust/searchdir.py): settings, and a folder holding one search."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from fedrobust.errors import ConfigError
from fedrobust.searchdir import claim_folder, load_group


@dataclass
class _Settings:
    epochs: int = 60
    gamma: float = 0.01


def test_overrides_win_over_the_preset_whatever_their_order():
    from fedrobust.nas.settings import ArchSearchConfig

    # conf/arch_search/small.yaml sets epochs (8) and gamma (0.1)
    s = load_group(ArchSearchConfig, "arch_search", ("paper", "small"), ["arch_search.epochs=3", "arch_search=small"],
                   usage="u")
    assert s.epochs == 3 and s.gamma == pytest.approx(0.1)
    assert load_group(ArchSearchConfig, "arch_search", ("paper", "small"), ["arch_search=paper"], usage="u").epochs == 60


@pytest.mark.parametrize("item, message", [
    ("arch_search=huge", "arch_search: unknown preset 'huge' (choose from paper, small)"),
    ("arch_search.nokey=1", "arch_search.nokey: Key 'nokey' not in '_Settings'"),
    ("arch_search.epochs=abc", "arch_search.epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("data=mnist", "data: takes arch_search=PRESET and arch_search.KEY=VALUE"),
    ("arch_search", "arch_search: takes arch_search=PRESET and arch_search.KEY=VALUE"),
    ("arch_search.=1", "arch_search.: takes arch_search=PRESET and arch_search.KEY=VALUE"),
])
def test_a_bad_item_is_one_line_naming_it(item, message):
    with pytest.raises(ConfigError) as err:
        load_group(_Settings, "arch_search", ("paper", "small"), [item],
                   usage="takes arch_search=PRESET and arch_search.KEY=VALUE")
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def _description(key: str, **settings) -> dict:
    return {"key": key, "settings": {"epochs": 8, "seed": 0} | settings}


def test_a_folder_is_created_then_resumed_and_another_search_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "search"
    assert claim_folder(out, _description("a"), "checkpoint.pt", kind="architecture search") is False
    assert json.loads((out / "search.json").read_text())["key"] == "a"
    assert claim_folder(out, _description("a"), "checkpoint.pt", kind="architecture search") is False  # no checkpoint
    (out / "checkpoint.pt").write_bytes(b"x")
    assert claim_folder(out, _description("a"), "checkpoint.pt", kind="architecture search") is True
    with pytest.raises(ConfigError, match=r"holds a search with other settings \(differing: seed\); give another folder"):
        claim_folder(out, _description("b", seed=1), "checkpoint.pt", kind="architecture search")
    with pytest.raises(ConfigError, match=r"^loss_search\.out_dir: .* \(other members, images or eps\); give another "
                                          r"loss_search\.out_dir, or remove it to start over$"):
        claim_folder(out, _description("c"), "checkpoint.json", kind="loss search", label="loss_search.out_dir: ",
                     elsewhere="give another loss_search.out_dir", other="other members, images or eps")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is damaged; remove"),
    ("[1, 2]", "holds a search with other settings (other data)"),
])
def test_a_damaged_or_foreign_search_json_is_refused_in_one_line(tmp_path, content, message):
    out = tmp_path / "search"
    out.mkdir()
    (out / "search.json").write_text(content)
    with pytest.raises(ConfigError) as err:
        claim_folder(out, _description("a"), "checkpoint.pt", kind="architecture search")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert (out / "search.json").read_text() == content  # left as it was


def test_a_folder_of_something_else_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match=r"exists and is not an architecture search folder$"):
        claim_folder(out, _description("a"), "checkpoint.pt", kind="architecture search")
    with pytest.raises(ConfigError, match=r"exists and is not a loss search folder$"):
        claim_folder(out, _description("a"), "checkpoint.json", kind="loss search")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is not an architecture search folder"):
        claim_folder(afile, _description("a"), "checkpoint.pt", kind="architecture search")
