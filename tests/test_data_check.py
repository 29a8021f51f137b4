"""`uniultra data check`: every problem named with its file; warnings do not fail."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataset_factory import blob_mask, shared_dataset, write_dataset, write_pair
from uniultra.cli import main
from uniultra.data.check import check_dataset


def test_clean_folder_passes_with_warnings(tmp_path, capsys):
    root = write_dataset(tmp_path / "clean", ["a", "b"])
    write_pair(root, "empty", np.zeros((48, 64), bool))
    same = np.full((48, 64), 9, np.uint8)
    write_pair(root, "twin_1", blob_mask(), same)
    write_pair(root, "twin_2", blob_mask(), same)
    report = check_dataset(root)
    assert report.ok and report.n_pairs_ok == 5
    assert report.empty_masks == ["empty"] and report.duplicate_groups == [["twin_1", "twin_2"]]
    assert main(["data", "check", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "empty masks: 1 (empty)" in out and "twin_1 = twin_2" in out
    assert out.rstrip().endswith("warning(s)")


def test_broken_folder_names_each_file_and_fails(tmp_path, capsys):
    root = write_dataset(tmp_path / "broken", ["good"])
    write_pair(root, "corrupt", blob_mask())
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    write_pair(root, "orphan", blob_mask())
    (root / "masks" / "orphan.png").unlink()
    write_pair(root, "soft", blob_mask())
    soft = np.array([[0, 128], [255, 0]], np.uint8)
    Image.fromarray(soft).resize((64, 48)).save(root / "masks" / "soft.png")
    write_pair(root, "small", blob_mask())
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "small.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "lonely.png")
    (root / "images" / "notes.txt").write_text("not an image")

    assert main(["data", "check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    expected = {
        "images/corrupt.png": "corrupt",
        "images/orphan.png": "no mask",
        "masks/soft.png": "not binary",
        "masks/small.png": "10x10",
        "masks/lonely.png": "without an image",
    }
    for path, problem in expected.items():
        assert any(path in line and problem in line for line in errors), (path, out)
    assert len(errors) == len(expected)
    assert "notes.txt: ignored" in out and "FAILED: 5 error(s)" in out


def test_missing_folders(tmp_path):
    (tmp_path / "bare").mkdir()
    report = check_dataset(tmp_path / "bare")
    assert not report.ok and {f.path.name for f in report.errors} == {"images", "masks"}
    assert main(["data", "check", str(tmp_path / "does_not_exist"), "--no-progress"]) == 1


@pytest.mark.realdata
def test_busi_reports_empty_masks_and_the_duplicate_pair(capsys):
    busi = shared_dataset("busi")
    assert main(["data", "check", str(busi), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "readable pairs 780" in out and "empty masks: 133" in out
    assert "benign_433 = malignant_145" in out and "OK," in out
