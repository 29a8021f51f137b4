"""Splits: seeded and order-independent, groups never cross splits, resolution order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataset_factory import REPO, blob_mask, write_dataset, write_pair
from uniultra.cli import main
from uniultra.data.dataset import SPLITS_DIR_ENV, MultiDataset, SegmentationDataset, resolve_split_file
from uniultra.data.split import assign_groups, group_stems, make_split
from uniultra.shipped import shipped_split_path


def split_of(document: dict) -> dict[str, str]:
    return {stem: name for name in ("train", "val", "test") for stem in document[name]}


def test_assignment_is_seeded_and_independent_of_input_order():
    groups = [[f"s{i}"] for i in range(100)]
    first = assign_groups(groups, (8, 1, 1), seed=0)
    assert first == assign_groups(list(reversed(groups)), (8, 1, 1), seed=0)
    assert first != assign_groups(groups, (8, 1, 1), seed=1)
    assert [len(s) for s in first] == [80, 10, 10]
    assert sorted(sum(first, [])) == sorted(sum(groups, []))


def test_bad_ratios():
    with pytest.raises(ValueError, match="ratios"):
        assign_groups([["a"]], (1, 1), seed=0)


def test_contiguous_stems_group_by_gap():
    stems = ["0001", "0002", "0004", "0010", "0011", "clip_5", "clip_6", "other"]
    assert group_stems(stems, contiguous_gap=1) == [
        ["0001", "0002"], ["0004"], ["0010", "0011"], ["clip_5", "clip_6"], ["other"]]
    assert ["0001", "0002", "0004"] in group_stems(stems, contiguous_gap=2)
    assert all(len(g) == 1 for g in group_stems(stems, group_regex=None))


def test_object_suffix_and_duplicates_group_together():
    stems = ["12_1_n1", "12_1_n2", "12_2", "13_1", "dup_a", "dup_b"]
    hashes = {stem: stem for stem in stems} | {"dup_a": "same", "dup_b": "same"}
    groups = group_stems(stems, content_hashes=hashes)
    assert ["12_1_n1", "12_1_n2"] in groups and ["dup_a", "dup_b"] in groups and ["12_2"] in groups
    by_patient = group_stems(stems, group_regex=r"^(\d+)_")
    assert ["12_1_n1", "12_1_n2", "12_2"] in by_patient


def test_make_split_keeps_groups_together(tmp_path):
    root = tmp_path / "vid"
    stems = [f"{n:04d}" for n in (*range(0, 30), *range(50, 80), *range(100, 130))] + ["a_n1", "a_n2"]
    write_dataset(root, stems)
    duplicate = np.full((48, 64), 7, np.uint8)
    write_pair(root, "copy_x", blob_mask(), duplicate)
    write_pair(root, "copy_y", blob_mask(), duplicate)
    document = make_split(root, seed=0, ratios=(8, 1, 1), contiguous_gap=5)
    assigned = split_of(document)
    assert len(assigned) == len(stems) + 2 == document["n_images"]
    assert len({assigned[f"{n:04d}"] for n in range(0, 30)}) == 1
    assert assigned["a_n1"] == assigned["a_n2"] and assigned["copy_x"] == assigned["copy_y"]
    assert document["grouping"]["n_groups"] == 5
    assert document["dataset"] == "vid" and document["seed"] == 0 and document["ratios"] == [8, 1, 1]


def test_split_command_is_deterministic(tmp_path):
    root = write_dataset(tmp_path / "set", [f"img{i}" for i in range(30)])
    assert main(["data", "split", str(root), "--seed", "3", "--out", str(tmp_path / "a.json")]) == 0
    assert main(["data", "split", str(root), "--seed", "3", "--ratios", "8", "1", "1"]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    second = json.loads((root / "splits.json").read_text())
    assert [first[k] for k in ("train", "val", "test")] == [second[k] for k in ("train", "val", "test")]
    assert first["command"].startswith("uniultra data split") and "--seed 3" in first["command"]


@pytest.fixture
def two_split_files(tmp_path, monkeypatch):
    """A dataset named `mini` plus a split file in the dataset and one in UNIULTRA_SPLITS_DIR."""
    root = write_dataset(tmp_path / "mini", ["a", "b", "c"])
    env_dir = tmp_path / "env_splits"
    env_dir.mkdir()
    (env_dir / "mini.json").write_text(json.dumps({"train": ["a", "b"], "val": [], "test": ["c"]}))
    monkeypatch.setenv(SPLITS_DIR_ENV, str(env_dir))
    return root, env_dir


def test_resolution_order(two_split_files, tmp_path):
    root, env_dir = two_split_files
    assert resolve_split_file(root) == env_dir / "mini.json"
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c"]}))
    assert resolve_split_file(root) == root / "splits.json"
    explicit = tmp_path / "mine.json"
    explicit.write_text(json.dumps({"train": ["b"], "val": [], "test": ["a", "c"]}))
    assert resolve_split_file(root, explicit) == explicit  # an explicit --splits FILE always wins
    explicit_test = SegmentationDataset(root, split="test", splits_file=explicit)
    assert [s.stem for s in explicit_test.samples] == ["a", "c"]
    assert [s.stem for s in SegmentationDataset(root, split="test").samples] == ["c"]


def test_shipped_splits_are_found(tmp_path, monkeypatch):
    """Last in the order: the split file shipped in the package (uniultra/splits/<name>.json)."""
    monkeypatch.delenv(SPLITS_DIR_ENV, raising=False)
    root = write_dataset(tmp_path / "tg3k", ["a"])
    assert resolve_split_file(root) == shipped_split_path("tg3k")
    assert shipped_split_path("tg3k") == REPO / "src" / "uniultra" / "splits" / "tg3k.json"


def test_missing_split_file_error_lists_places(tmp_path, monkeypatch):
    monkeypatch.delenv(SPLITS_DIR_ENV, raising=False)
    root = write_dataset(tmp_path / "nowhere_set", ["a"])
    with pytest.raises(FileNotFoundError) as error:
        resolve_split_file(root)
    message = str(error.value)
    assert "nowhere_set" in message and str(root / "splits.json") in message
    assert "splits/nowhere_set.json" in message and "uniultra data split" in message
    assert main(["evaluate", "--model", "baseline:box", "--data", str(root), "--split", "test"]) == 2


def test_unknown_split_name_and_stale_stems(two_split_files):
    root, env_dir = two_split_files
    with pytest.raises(ValueError, match="no split named 'holdout'"):
        SegmentationDataset(root, split="holdout")
    (env_dir / "mini.json").write_text(json.dumps({"train": ["a"], "val": [], "test": ["zzz"]}))
    with pytest.raises(ValueError, match="zzz"):
        SegmentationDataset(root, split="test")


def test_multi_dataset_names_every_sample(tmp_path):
    first = SegmentationDataset(write_dataset(tmp_path / "one", ["a", "b"]))
    second = SegmentationDataset(write_dataset(tmp_path / "two", ["c"]))
    combined = MultiDataset([first, second])
    assert len(combined) == 3 and combined.names == ["one", "two"]
    names = [(item["dataset"], item["stem"]) for item in combined]
    assert names == [("one", "a"), ("one", "b"), ("two", "c")]
    assert combined[2]["mask"].dtype == bool and combined[2]["image"].dtype == np.uint8


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["busi", "ddti", "tg3k"])
def test_committed_splits_cover_each_dataset_once(name):
    from dataset_factory import shared_dataset
    from uniultra.data.dataset import list_folder

    document = json.loads(shipped_split_path(name).read_text())
    stems = document["train"] + document["val"] + document["test"]
    assert len(stems) == len(set(stems)) == document["n_images"]
    assert set(stems) == set(list_folder(shared_dataset(name)).paired_stems())
    assigned = split_of(document)
    if name == "busi":
        assert assigned["benign_433"] == assigned["malignant_145"]
    if name == "ddti":
        pairs = [s[:-3] for s in stems if s.endswith("_n1")]
        assert pairs and all(assigned[p + "_n1"] == assigned[p + "_n2"] for p in pairs)
