"""Case discovery across the four dataset layouts, and its errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from crlnseg.data.discovery import discover_cases, discover_single
from crlnseg.errors import DataError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def write_h5(path: Path, label: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
        if label:
            f["label"] = np.zeros((4, 4, 4), np.uint8)
    return path


def test_images_labels_layout(tmp_path: Path) -> None:
    for cid in ("b", "a", "c"):
        touch(tmp_path / "images" / f"{cid}.nii.gz")
    touch(tmp_path / "labels" / "a.nii.gz")
    touch(tmp_path / "labels" / "b.nii.gz")
    touch(tmp_path / "images" / "notes.txt")
    cases = discover_cases(tmp_path)
    assert [c.id for c in cases] == ["a", "b", "c"]
    assert cases[0].label == tmp_path / "labels" / "a.nii.gz"
    assert cases[2].label is None
    with pytest.raises(DataError, match="without a label"):
        discover_cases(tmp_path, require_labels=True)


def test_nnunet_two_channels(tmp_path: Path) -> None:
    for cid in ("la_002", "la_001"):
        for ch in (1, 0):
            touch(tmp_path / "imagesTr" / f"{cid}_000{ch}.nii.gz")
        touch(tmp_path / "labelsTr" / f"{cid}.nii.gz")
    touch(tmp_path / "imagesTs" / "la_009_0000.nii.gz")
    touch(tmp_path / "imagesTs" / "la_009_0001.nii.gz")
    (tmp_path / "dataset.json").write_text("{}")
    cases = discover_cases(tmp_path)
    assert [c.id for c in cases] == ["la_001", "la_002", "la_009"]
    assert [p.name for p in cases[0].images] == ["la_001_0000.nii.gz", "la_001_0001.nii.gz"]
    assert cases[1].label.name == "la_002.nii.gz"
    assert cases[2].label is None


def test_flat_and_single(tmp_path: Path) -> None:
    touch(tmp_path / "scan1.nrrd")
    touch(tmp_path / "scan2.mha")
    cases = discover_cases(tmp_path)
    assert [(c.id, c.label) for c in cases] == [("scan1", None), ("scan2", None)]
    assert discover_single(tmp_path / "scan2.mha").id == "scan2"
    assert discover_cases(tmp_path / "scan1.nrrd")[0].id == "scan1"


def test_h5_folders(tmp_path: Path) -> None:
    write_h5(tmp_path / "B" / "mri_norm2.h5")
    write_h5(tmp_path / "A" / "mri_norm2.h5", label=False)
    cases = discover_cases(tmp_path)
    assert [c.id for c in cases] == ["A", "B"]
    assert cases[0].label is None and not cases[0].label_in_image
    assert cases[1].label_in_image
    assert discover_cases(tmp_path / "B")[0].id == "B"


@pytest.mark.parametrize("layout, message", [
    ("empty", "no cases found"),
    ("label_without_image", "label without image"),
    ("duplicate", "duplicate case ID"),
    ("duplicate_tr_ts", "duplicate case ID"),
    ("missing_channel", "channels"),
    ("channel_count", "channel file"),
])
def test_errors(tmp_path: Path, layout: str, message: str) -> None:
    if layout == "label_without_image":
        touch(tmp_path / "images" / "a.nii.gz")
        touch(tmp_path / "labels" / "z.nii.gz")
    elif layout == "duplicate":
        touch(tmp_path / "a.nii.gz")
        touch(tmp_path / "a.nrrd")
    elif layout == "duplicate_tr_ts":
        touch(tmp_path / "imagesTr" / "a_0000.nii.gz")
        touch(tmp_path / "imagesTs" / "a_0000.nii.gz")
    elif layout == "missing_channel":
        touch(tmp_path / "imagesTr" / "a_0000.nii.gz")
        touch(tmp_path / "imagesTr" / "a_0002.nii.gz")
    elif layout == "channel_count":
        touch(tmp_path / "imagesTr" / "a_0000.nii.gz")
        touch(tmp_path / "imagesTr" / "a_0001.nii.gz")
        touch(tmp_path / "imagesTr" / "b_0000.nii.gz")
    with pytest.raises(DataError, match=message) as info:
        discover_cases(tmp_path)
    assert "\n" not in str(info.value)


def test_real_data(shared_data: Path) -> None:
    cases = discover_cases(shared_data / "la", require_labels=True)
    assert len(cases) == 80
    ids = (shared_data / "la" / "cases.txt").read_text().split()
    assert sorted(ids) == [c.id for c in cases]
    h5 = discover_cases(shared_data / "la_h5", require_labels=True)
    assert len(h5) == 2 and all(c.label_in_image for c in h5)


def test_dangling_symlink_is_an_error_not_a_missing_case(tmp_path: Path) -> None:
    # Splits are often folders of links: a link to a moved scan must not shrink the split.
    real = touch(tmp_path / "data" / "a.nii.gz")
    split = tmp_path / "split"
    split.mkdir()
    (split / "a.nii.gz").symlink_to(real)
    (split / "b.nii.gz").symlink_to(tmp_path / "data" / "moved.nii.gz")
    with pytest.raises(DataError, match="b.nii.gz: broken symbolic link") as info:
        discover_cases(split)
    assert "moved.nii.gz" in str(info.value)
    with pytest.raises(DataError, match="broken symbolic link"):
        discover_single(split / "b.nii.gz")
    (split / "b.nii.gz").unlink()
    (split / "images").mkdir()
    (split / "images" / "c.nii.gz").symlink_to(real)
    (split / "labels").mkdir()
    (split / "labels" / "c.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(DataError, match="labels/c.nii.gz: broken symbolic link"):
        discover_cases(split)


def test_numbered_files_without_channels(tmp_path: Path) -> None:
    # Masks have no channels: patient_0001..0003 are three cases, not channels 1..3 of "patient".
    for i in (1, 2, 3):
        touch(tmp_path / "masks" / f"patient_{i:04d}.nii.gz")
        touch(tmp_path / "ds" / "images" / f"patient_{i:04d}.nii.gz")
        touch(tmp_path / "ds" / "labels" / f"patient_{i:04d}.nii.gz")
    cases = discover_cases(tmp_path / "masks", channels=False)
    assert [c.id for c in cases] == ["patient_0001", "patient_0002", "patient_0003"]
    paired = discover_cases(tmp_path / "ds", channels=False)
    assert [c.label.name for c in paired] == [f"patient_{i:04d}.nii.gz" for i in (1, 2, 3)]
    with pytest.raises(DataError, match="channels"):  # as image channels, 0 is missing
        discover_cases(tmp_path / "masks")
