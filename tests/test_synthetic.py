"""The synthetic dataset: layout, determinism, geometry, a task no threshold solves."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crlnseg.errors import OutputExistsError
from crlnseg.synthetic import generate_dataset, smooth_field, synthesize_case, tube_mask

SMALL = (32, 32, 24)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_layout_geometry_and_values(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "d", n_labelled=2, n_unlabelled=3, n_test=1, shape=SMALL,
                           spacing=(1.5, 1.25, 2.0), seed=3)
    assert _names(out / "labelled" / "images") == _names(out / "labelled" / "labels")
    assert len(_names(out / "labelled" / "images")) == 2
    assert _names(out / "unlabelled" / "images") == _names(out / "unlabelled" / "labels_hidden")
    assert len(_names(out / "unlabelled" / "images")) == 3
    assert not (out / "unlabelled" / "labels").exists()  # hidden: not a labelled folder
    assert len(_names(out / "test" / "labels")) == 1
    ids = {n for split in ("labelled", "unlabelled", "test")
           for n in _names(out / split / "images")}
    assert len(ids) == 6  # case IDs are unique across splits
    image = nib.load(out / "labelled" / "images" / "lab_00.nii.gz")
    label = nib.load(out / "labelled" / "labels" / "lab_00.nii.gz")
    assert image.shape == label.shape == SMALL
    assert np.allclose(image.header.get_zooms(), (1.5, 1.25, 2.0))
    assert np.allclose(image.affine, label.affine)
    assert not np.allclose(image.affine[:3, 3], 0)  # non-trivial origin
    assert image.get_fdata().dtype.kind == "f"
    values = np.unique(np.asarray(label.dataobj))
    assert set(values.tolist()) == {0, 1}


def test_deterministic_and_independent_of_other_splits(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 1, 1, 1, shape=SMALL, seed=7)
    b = generate_dataset(tmp_path / "b", 1, 3, 0, shape=SMALL, seed=7)
    c = generate_dataset(tmp_path / "c", 1, 0, 0, shape=SMALL, seed=8)
    for rel in ("labelled/images/lab_00.nii.gz", "unlabelled/images/unl_00.nii.gz"):
        assert np.array_equal(nib.load(a / rel).get_fdata(), nib.load(b / rel).get_fdata())
    rel = "labelled/images/lab_00.nii.gz"
    assert not np.array_equal(nib.load(a / rel).get_fdata(), nib.load(c / rel).get_fdata())


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 1, 0, 0, shape=SMALL)
    before = (tmp_path / "labelled" / "images" / "lab_00.nii.gz").read_bytes()
    with pytest.raises(OutputExistsError, match="lab_00"):
        generate_dataset(tmp_path, 1, 0, 0, shape=SMALL, seed=1)
    assert (tmp_path / "labelled" / "images" / "lab_00.nii.gz").read_bytes() == before
    generate_dataset(tmp_path, 1, 0, 0, shape=SMALL, seed=1, overwrite=True)
    assert (tmp_path / "labelled" / "images" / "lab_00.nii.gz").read_bytes() != before


def test_label_is_one_structure_with_attached_veins() -> None:
    for i in range(4):
        image, label = synthesize_case(np.random.default_rng([0, 1, i]), (64, 64, 48))
        assert ndimage.label(label)[1] == 1  # veins touch the chamber
        assert 0.02 < label.mean() < 0.2
        assert np.isfinite(image).all()


def test_threshold_does_not_solve_it() -> None:
    """Distractors are about as bright as the chamber: even the best threshold per case is poor."""
    scores = []
    for i in range(4):
        image, label = synthesize_case(np.random.default_rng([0, 1, i]), (64, 64, 48))
        fg = label.astype(bool)
        assert image[fg].mean() > 2 * np.median(image)  # the target is bright
        best = max(2 * np.count_nonzero((image > t) & fg) / (np.count_nonzero(image > t) + fg.sum())
                   for t in np.quantile(image, np.linspace(0.5, 0.999, 120)))
        scores.append(best)
    assert np.mean(scores) < 0.9


def test_smooth_field_and_tube() -> None:
    field = smooth_field(np.random.default_rng(0), (20, 16, 12), cells=3)
    assert field.shape == (20, 16, 12)
    assert abs(field.mean()) < 1e-4 and abs(field.std() - 1) < 1e-3
    assert np.abs(np.diff(field, axis=0)).max() < 0.5  # smooth: no jumps between neighbours
    points = np.array([[5.0, 5.0, z] for z in np.arange(4, 8.5, 0.5)])
    tube = tube_mask((11, 11, 12), points, np.full(len(points), 2.0))
    assert tube[5, 5, 2:11].all() and tube[7, 5, 5] and not tube[8, 5, 5]
    assert not tube[5, 5, 1] and not tube[5, 5, 11]
