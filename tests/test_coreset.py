"""uniultra.distill.coreset and `uniultra data coreset`: k-center, stratification, determinism, the
subset file, and a data entry's `subset:` in training (engine and distillation).

Random-weight teacher (the `mini` preset at 64 px), phantom datasets, one torch thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_factory import write_pair
from uniultra.atomic import file_sha256
from uniultra.cli import main
from uniultra.config_io import ConfigError
from uniultra.data.dataset import SegmentationDataset
from uniultra.data.phantom import make_phantom, write_phantom_dataset
from uniultra.data.subset import read_subset, write_subset
from uniultra.distill.coreset import (
    allocate_quota,
    dataset_features,
    kcenter_greedy,
    select_indices,
)
from uniultra.engine.config import DataEntry, TrainConfig
from uniultra.models.checkpoint import save_model
from uniultra.models.image_model import SAM2ImageModel

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _phantoms(root: Path, n: int, n_train: int, seed: int, size) -> list[str]:
    """`n` phantoms in `root`; returns (train stems, val stems) split at `n_train`."""
    write_phantom_dataset(root, n, seed=seed, size=size)
    stems = [f"phantom_{i:04d}" for i in range(n)]
    return stems[:n_train], stems[n_train:]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> list[Path]:
    """'pa': 12 phantoms (9 train); 'pb': 6 phantoms + 1 empty-mask image (5 train, one empty)."""
    base = tmp_path_factory.mktemp("data")
    splits = {"pa": _phantoms(base / "pa", 12, 9, 1, SIZE), "pb": _phantoms(base / "pb", 6, 4, 2, (SIZE, 80))}
    normal = make_phantom(100, (SIZE, 80), n_lesions=0)
    write_pair(base / "pb", "normal_0", normal.mask, normal.image)
    splits["pb"][0].append("normal_0")
    for name, (train, val) in splits.items():
        (base / name / "splits.json").write_text(json.dumps({"train": train, "val": val, "test": []}))
    return [base / "pa", base / "pb"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_model(SAM2ImageModel.from_preset("mini", image_size=SIZE), path)
    return path


# --- pure selection -------------------------------------------------------------------------------

def test_kcenter_takes_the_farthest_point_each_time():
    points = np.array([[0, 0], [0.1, 0], [10, 0], [0, 10], [10, 10], [5, 5]], dtype=float)
    # From (0,0): (10,10) is farthest; then (10,0) and (0,10) tie at 10 (lowest index first);
    # then (5,5) at 7.07 before the near-duplicate (0.1,0).
    assert kcenter_greedy(points, 6, first=0) == [0, 4, 2, 3, 5, 1]
    assert kcenter_greedy(points, 3, first=5) == [5, 0, 2]
    assert kcenter_greedy(points, 0, first=0) == []
    # Identical points: still k distinct indices.
    assert sorted(kcenter_greedy(np.zeros((4, 2)), 3, first=2)) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot choose 7 of 6"):
        kcenter_greedy(points, 7, first=0)


def test_quota_sums_to_k_and_follows_the_shares():
    sizes = [624, 524, 581]  # busi / ddti / tg3k train splits (1729 in all)
    quotas = allocate_quota(sizes, 346)
    assert quotas == [125, 105, 116]  # floors 124, 104, 116; remainders .87, .86, .26
    for n, q in zip(sizes, quotas, strict=True):
        assert abs(q - 346 * n / sum(sizes)) < 1
    assert allocate_quota([1, 1, 1], 2) == [1, 1, 0]  # equal remainders: the earlier dataset first
    assert allocate_quota([5, 0, 3], 8) == [5, 0, 3]
    for k in (0, 9):
        with pytest.raises(ValueError, match="k must be between 1 and the number of images"):
            allocate_quota([5, 0, 3], k)


def test_selection_is_seeded_stratified_and_differs_from_random():
    rng = np.random.default_rng(0)
    features = [rng.normal(size=(40, 5)), rng.normal(size=(20, 5))]
    a = select_indices("kcenter", [40, 20], 12, seed=3, features=features)
    assert a == select_indices("kcenter", [40, 20], 12, seed=3, features=features)
    assert [len(x) for x in a] == [8, 4] and all(len(set(x)) == len(x) for x in a)
    assert a != select_indices("kcenter", [40, 20], 12, seed=4, features=features)  # another first centre
    r = select_indices("random", [40, 20], 12, seed=3)
    assert r == select_indices("random", [40, 20], 12, seed=3) != select_indices("random", [40, 20], 12, seed=4)
    assert [len(x) for x in r] == [8, 4] and r != a
    pooled = select_indices("kcenter", [40, 20], 12, seed=3, stratify=False, features=features)
    assert sum(len(x) for x in pooled) == 12
    assert all(0 <= i < n for x, n in zip(pooled, [40, 20], strict=True) for i in x)
    empty_set = select_indices("kcenter", [40, 0, 20], 12, seed=3, stratify=False,
                               features=[features[0], np.zeros((0, 0)), features[1]])
    assert [x for x in empty_set if x] == [x for x in pooled if x] and empty_set[1] == []
    with pytest.raises(ValueError, match="needs one feature array per dataset"):
        select_indices("gradient", [40, 20], 12, seed=3)


# --- teacher features -------------------------------------------------------------------------------

def test_embedding_and_gradient_features(datasets, teacher_file, tmp_path):
    from uniultra.inference.loading import load_model

    model = load_model(teacher_file)
    ds = SegmentationDataset(datasets[1], split="train")
    embed = dataset_features(model, ds, "kcenter", batch_size=3)
    assert embed.shape == (5, 2 * 256)  # average- and max-pooled embedding
    np.testing.assert_allclose(np.linalg.norm(embed, axis=1), 1.0, atol=1e-5)
    with_s8 = dataset_features(model, ds, "kcenter", stride8=True, batch_size=3)
    assert with_s8.shape == (5, 2 * 256 + 2 * 64)

    grads = dataset_features(model, ds, "gradient", batch_size=3)
    assert grads.shape == (5, 32 * 256 + 32)  # weight and bias of Linear(256 -> 32)
    assert np.all(np.linalg.norm(grads, axis=1) > 0)  # the empty-mask image too (no-prompt decoder)
    assert model.sam_mask_decoder.dynamic_multimask_via_stability  # restored after the pass

    cached = dataset_features(model, ds, "gradient", cache_dir=tmp_path, teacher_sha256="x")
    assert len(list(tmp_path.glob("pb-train-gradient-*.npy"))) == 1
    np.testing.assert_allclose(cached, grads, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(dataset_features(model, ds, "gradient", cache_dir=tmp_path, teacher_sha256="x"),
                                  cached)


# --- the command ------------------------------------------------------------------------------------

def _run(datasets, out: Path, *extra: str) -> int:
    return main(["data", "coreset", *map(str, datasets), "--k", "6", "--out", str(out), "--no-progress", *extra])


def test_command_writes_header_and_lines(datasets, teacher_file, tmp_path):
    out = tmp_path / "kc.txt"
    assert _run(datasets, out, "--teacher", str(teacher_file), "--seed", "1") == 0
    text = out.read_text()
    header = dict(line[2:].split(": ", 1) for line in text.splitlines()[1:] if line.startswith("# "))
    assert header["method"] == "kcenter" and header["k"] == "6" and header["seed"] == "1"
    assert header["split"] == "train" and header["stratify"] == "true" and header["date"]
    assert header["teacher"] == str(teacher_file) and header["teacher_sha256"] == file_sha256(teacher_file)
    assert "uniultra data coreset" in header["command"]
    selection = read_subset(out)
    # 9 + 5 train images, k = 6: 3.86 -> 4 for pa, 2.14 -> 2 for pb.
    assert {k: len(v) for k, v in selection.items()} == {"pa": 4, "pb": 2}
    assert [line for line in text.splitlines() if not line.startswith("#")][0].startswith("pa/phantom_")

    again = tmp_path / "kc2.txt"
    assert _run(datasets, again, "--teacher", str(teacher_file), "--seed", "1") == 0
    assert read_subset(again) == selection
    for method in ("gradient", "random"):
        path = tmp_path / f"{method}.txt"
        assert _run(datasets, path, "--teacher", str(teacher_file), "--method", method) == 0
        assert {k: len(v) for k, v in read_subset(path).items()} == {"pa": 4, "pb": 2}
    assert read_subset(tmp_path / "random.txt") != selection


def test_command_errors(datasets, tmp_path, capsys):
    assert _run(datasets, tmp_path / "x.txt") == 2
    assert "--method kcenter needs --teacher" in capsys.readouterr().err
    assert _run(datasets, tmp_path / "x.txt", "--teacher", str(tmp_path / "nope.pt")) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
    assert main(["data", "coreset", str(datasets[0]), "--k", "10", "--method", "random",
                 "--out", str(tmp_path / "x.txt")]) == 2
    assert "k must be between 1 and the number of images (9)" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
    # random needs no teacher; the header says so.
    assert _run(datasets, tmp_path / "r.txt", "--method", "random", "--no-stratify") == 0
    assert "# teacher: none" in (tmp_path / "r.txt").read_text()
    assert sum(len(v) for v in read_subset(tmp_path / "r.txt").values()) == 6


# --- `subset:` in training configs ---------------------------------------------------------------------

def _subset(path: Path, lines: dict[str, list[str]]) -> Path:
    return write_subset(path, lines, {"method": "test"})


def test_training_uses_exactly_the_subset(datasets, teacher_file, tmp_path):
    from run_outputs import read_rows
    from uniultra.engine.trainer import train

    stems = ["phantom_0001", "phantom_0004", "phantom_0007"]
    subset = _subset(tmp_path / "s.txt", {"pa": stems, "pb": ["phantom_0002", "normal_0"]})
    out = tmp_path / "run"
    train(TrainConfig.from_dict({
        "model": {"base": str(teacher_file), "image_size": SIZE},
        "data": [{"path": str(d), "subset": str(subset)} for d in datasets],
        "optim": {"lr": 1e-3, "epochs": 1, "batch_size": 2, "warmup_steps": 0},
        "out_dir": str(out), "progress": False, "log_every": 1000, "threads": 1,
    }, "test"))
    log = json.loads((out / "log.json").read_text())
    assert log["data"]["train"] == {"pa": {"images": 3, "empty_skipped": 0}, "pb": {"images": 2, "empty_skipped": 1}}
    assert log["data"]["val"]["pa"]["images"] == 3 and log["data"]["val"]["pb"]["images"] == 2  # not filtered
    assert len(read_rows(out / "steps.csv")) == 2  # 4 samples with an object, full batches of 2


def test_distillation_uses_the_subset(datasets, teacher_file, tmp_path):
    from uniultra.distill.config import DistillConfig
    from uniultra.distill.trainer import distill

    subset = _subset(tmp_path / "s.txt", {"pa": ["phantom_0000", "phantom_0002"], "pb": ["normal_0"]})
    out = tmp_path / "distill"
    config = DistillConfig.from_dict({
        "teacher": {"checkpoint": str(teacher_file)},
        "student": {"preset": "mini", "image_size": SIZE, "trunk": {"embed_dim": 4}, "peft": {"method": "ch_adapter"}},
        "levels": [3], "taps": ["D1"],  # the plain random teacher has no adapter (no D3)
        "data": [{"path": str(d), "subset": str(subset)} for d in datasets],
        "optim": {"lr": 1e-3, "epochs": 1, "batch_size": 2, "warmup_steps": 0},
        "augment": None, "teacher_cache": {"enabled": True},
        "out_dir": str(out), "progress": False, "log_every": 1000, "threads": 1,
    }, "test")
    distill(config)
    dskd = json.loads((out / "distill_report.json").read_text())["dskd"]
    assert dskd["data"] == {"train": {"pa": 2, "pb": 1}, "val": {"pa": 3, "pb": 2}}  # val not filtered
    assert dskd["steps_per_epoch"] == 1  # 3 images, full batches of 2
    # The teacher cache of a subset has its own files (its key covers the sample list).
    assert len(list((out / "teacher_cache").glob("pa-train-*.json"))) == 1


@pytest.mark.parametrize("content, message", [
    ("pa/phantom_0000\npa phantom_0001\n", r"line 2: expected <dataset>/<stem>, got 'pa phantom_0001'"),
    ("pa/phantom_0000\npa/phantom_0000\n", "line 2: pa/phantom_0000 is listed twice"),
    ("pa/phantom_0000\npa/phantom_0010\n", r"1 stems of 'pa' are not in its train split \(phantom_0010\)"),
    ("# nothing for pa\npb/phantom_0000\n", r"selects no image of dataset 'pa' \(it lists pb\)"),
])
def test_bad_subset_files_name_the_file_and_problem(datasets, tmp_path, content, message):
    from uniultra.engine.data import open_split

    path = tmp_path / "bad.txt"
    path.write_text(content)
    entry = DataEntry(path=str(datasets[0]), subset=str(path))
    with pytest.raises(ValueError, match=message) as info:
        open_split(entry, datasets[0], "train")
    assert str(path) in str(info.value)
    assert len(open_split(entry, datasets[0], "val")) == 3  # validation is never filtered


def test_missing_subset_file_and_config_checks(datasets, tmp_path):
    from uniultra.engine.data import open_split

    entry = DataEntry(path=str(datasets[0]), subset=str(tmp_path / "absent.txt"))
    with pytest.raises(FileNotFoundError, match="subset file .*absent.txt does not exist"):
        open_split(entry, datasets[0], "train")
    with pytest.raises(ConfigError, match="split_train and split_val are both 'all'"):
        TrainConfig.from_dict({"data": [{"path": "x", "subset": "s.txt", "split_train": "all", "split_val": "all"}]})
    with pytest.raises(ConfigError, match="needs a split_train"):
        TrainConfig.from_dict({"data": [{"path": "x", "subset": "s.txt", "split_train": None}]})


def test_cache_keys_tell_a_subset_from_the_full_split(datasets, tmp_path):
    from uniultra.distill.data import cache_stem
    from uniultra.engine.data import cache_key, open_split

    subset = _subset(tmp_path / "s.txt", {"pa": ["phantom_0000"]})
    full = open_split(DataEntry(path=str(datasets[0])), datasets[0], "train")
    part = open_split(DataEntry(path=str(datasets[0]), subset=str(subset)), datasets[0], "train")
    assert len(full) == 9 and len(part) == 1
    assert cache_key(full, SIZE) != cache_key(part, SIZE)
    args = ("sha", SIZE, (1, 2, 3), ("D2", "D3"), "float16")
    assert cache_stem("pa", full, *args) != cache_stem("pa", part, *args)


def test_shipped_coreset_configs():
    from uniultra.distill.config import load_distill_config

    repo = Path(__file__).resolve().parents[1]
    source = load_distill_config(repo / "configs" / "cpu" / "distill-mini-universal.yaml")
    for method, file in (("coreset", "kcenter-346.txt"), ("random", "random-346.txt")):
        config = load_distill_config(repo / "configs" / "cpu" / f"distill-mini-{method}.yaml")
        assert [d.subset for d in config.data] == [f"runs/coreset/{file}"] * 3
        assert config.out_dir == f"runs/cpu/distill-mini-{method}"
        plain = config.replace(out_dir=source.out_dir, data=tuple(d.__class__(path=d.path) for d in config.data))
        assert plain == source  # nothing else differs
