"""``crlnseg rectify``: reviewable rectified pseudo-labels of unlabelled scans.

For each case the EMA teacher runs once over the whole scan (sliding window, both heads blended in
the same pass as averaged softmax) and OUT receives, with the input's geometry and extension:

    <ID>_rectified<ext>   uint8   argmax softmax(f + (1 - mu) M): the rectified pseudo-label
    <ID>_raw<ext>         uint8   argmax softmax(f): the unrectified teacher pseudo-label
    <ID>_confidence<ext>  float32 max softmax(f + (1 - mu) M)
    <ID>_reliable<ext>    uint8   confidence >= threshold
    preview/<ID>.png      with ``preview``: axial slices, raw/rectified contours, confidence

and ``summary.csv`` / ``summary.json`` with one row per case (:data:`COLUMNS`): the share of
voxels whose raw / rectified confidence reaches the threshold, mu, seconds and, with ground truth,
Dice of the raw and rectified pseudo-labels over all voxels and over each one's reliable voxels
only. Dice is the mean over foreground classes (a class absent from both masks counts 1, as
medpy); "reliable" uses each pseudo-label's own confidence.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crlnseg.console import log
from crlnseg.data.discovery import CaseFiles
from crlnseg.errors import DataError, OutputExistsError
from crlnseg.inference.cases import (
    check_channels,
    check_headers,
    input_cases,
    output_extension,
    written_so_far,
)
from crlnseg.io.paths import IMAGE_SUFFIXES, split_suffix
from crlnseg.io.writers import (
    check_not_inputs,
    check_outputs,
    check_outside,
    make_folder,
    write_atomic,
)
from crlnseg.metrics import mean_foreground_dice
from crlnseg.settings import PredictSettings

__all__ = ["COLUMNS", "DICE_COLUMNS", "KINDS", "case_outputs", "find_label", "find_labels",
           "check_label_values", "case_row", "rectify_paths"]

KINDS = ("rectified", "raw", "confidence", "reliable")
COLUMNS = ["case", "mu", "reliable_raw", "reliable_rectified", "seconds"]
DICE_COLUMNS = ["dice_raw", "dice_rectified", "dice_raw_reliable", "dice_rectified_reliable"]


@dataclass
class CaseOutputs:
    files: dict[str, Path]  # kind -> path
    preview: Path | None


def case_outputs(case: CaseFiles, out: Path, preview: bool) -> CaseOutputs:
    ext = output_extension(case)
    files = {kind: out / f"{case.id}_{kind}{ext}" for kind in KINDS}
    return CaseOutputs(files, out / "preview" / f"{case.id}.png" if preview else None)


def find_label(labels: Path, case_id: str) -> Path:
    """``GT_DIR/<ID><ext>`` for any image extension; DataError when missing."""
    return find_labels(labels, [case_id])[case_id]


def find_labels(labels: Path, case_ids: list[str]) -> dict[str, Path]:
    """``GT_DIR/<ID><ext>`` per case, the extension in any letter case (``a.NII.GZ``);
    DataError when the folder or a label is missing, or a case has two labels."""
    labels = Path(labels)
    if not labels.is_dir():
        raise DataError(f"--labels {labels}: no such folder")
    by_id: dict[str, Path] = {}
    for path in sorted(labels.iterdir()):
        stem, suffix = split_suffix(path)
        if suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if stem in by_id:
            raise DataError(f"{path}: second label for case {stem} (also {by_id[stem].name})")
        by_id[stem] = path
    found = {}
    for case_id in case_ids:
        path = by_id.get(case_id)
        if path is None:
            raise DataError(f"{labels}: no label for case {case_id} "
                            f"(expected {case_id}.nii.gz or similar)")
        if not path.is_file():
            problem = "broken symbolic link" if path.is_symlink() else "not a file"
            raise DataError(f"{path}: {problem}")
        found[case_id] = path
    return found


def case_row(case_id: str, pred: Any, threshold: float, classes: int,
             label: np.ndarray | None) -> dict[str, Any]:
    """One summary row from a :class:`RectifiedPrediction` (and the ground truth, if any)."""
    raw_ok, rect_ok = pred.raw_confidence >= threshold, pred.confidence >= threshold
    mu = None if pred.mu is None else round(pred.mu, 6)
    row: dict[str, Any] = {"case": case_id, "mu": mu,
                           "reliable_raw": float(raw_ok.mean()),
                           "reliable_rectified": float(rect_ok.mean()),
                           "seconds": round(pred.seconds, 3)}
    if label is not None:
        row["dice_raw"] = mean_foreground_dice(pred.raw, label, classes)
        row["dice_rectified"] = mean_foreground_dice(pred.rectified, label, classes)
        row["dice_raw_reliable"] = mean_foreground_dice(pred.raw, label, classes, raw_ok)
        row["dice_rectified_reliable"] = mean_foreground_dice(pred.rectified, label, classes,
                                                              rect_ok)
    return row


def _check_outside(out: Path, folders: dict[str, Path | None]) -> None:
    """``-o`` must be neither an input folder nor inside one: its files would be read back as
    cases (or labels) of that folder."""
    for what, folder in folders.items():
        if folder is not None:
            check_outside(out, folder, what)


def check_label_values(label: np.ndarray, classes: int, path: Path) -> None:
    """Ground truth may hold only the model's classes 0..K-1."""
    values = np.unique(label)
    if values.size and int(values[-1]) >= classes:
        found = [int(v) for v in values]
        shown = f"{found[:8]}{'...' if len(found) > 8 else ''}"
        hint = (" (masks stored as 0/255? convert them to 0/1)" if found[-1] == 255 else "")
        raise DataError(f"{path}: label values {shown}, but the model's classes are "
                        f"0..{classes - 1}{hint}")


def _mean(values: list[Any]) -> float | None:
    """Mean of the known values; None when there are none (mu of a run without M(x))."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _write_summary(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any],
                   overwrite: bool) -> None:
    columns = COLUMNS + (DICE_COLUMNS if rows and "dice_raw" in rows[0] else [])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    mean = {c: _mean([r[c] for r in rows]) for c in columns[1:]} if rows else {}
    document = {**meta, "columns": columns, "cases": rows, "mean": mean}
    write_atomic(out / "summary.csv", lambda tmp: tmp.write_text(text.getvalue()), overwrite)
    write_atomic(out / "summary.json",
                 lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"), overwrite)


def rectify_paths(inputs: list[Path], out: Path, model: Path,
                  settings: PredictSettings | None = None, which: str = "last",
                  labels: Path | None = None, threshold: float = 0.97, preview: bool = False,
                  overwrite: bool = False) -> list[dict[str, Any]]:
    """Write the pseudo-label files of every case of ``inputs`` and the summary; returns rows."""
    from crlnseg.inference.predictor import Predictor
    from crlnseg.io import read_case_images, read_label, write_image
    from crlnseg.io.readers import check_label_header

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: is a file, not a folder (-o is the output folder)")
    cases, folder_input = input_cases(inputs)
    _check_outside(out, {"input": Path(inputs[0]) if folder_input else None, "--labels": labels})
    outputs = {case.id: case_outputs(case, out, preview) for case in cases}
    label_paths = find_labels(Path(labels), [c.id for c in cases]) if labels else {}
    planned = [p for o in outputs.values() for p in [*o.files.values(), o.preview] if p]
    planned += [out / "summary.csv", out / "summary.json"]
    check_not_inputs(planned, [p for c in cases for p in c.images] + list(label_paths.values()))
    check_outputs(planned, overwrite)
    # Pseudo-labels show the network's output: no connected-component post-processing.
    settings = (settings or PredictSettings()).model_copy(update={"keep_largest": False})
    predictor = Predictor.from_run(model, which, settings)
    for note in (predictor.choice_note, predictor.relation_note()):
        if note:
            log(note)
    spacing = predictor.prepare.h5_spacing
    headers = check_headers(cases, spacing)
    check_channels(headers, predictor.channels)
    for case_id, label_path in label_paths.items():
        check_label_header(label_path, headers[case_id], spacing)
    n_classes = len(predictor.classes)
    for label_path in label_paths.values():  # every label's values, before any output
        check_label_values(read_label(label_path, h5_spacing=spacing).array, n_classes,
                           label_path)
    rows = []
    for i, case in enumerate(cases, 1):
        log(f"case {i}/{len(cases)}: {case.id}")
        try:  # what headers cannot show: a corrupt body, label values
            volume = read_case_images(case.images, spacing)
            label = (read_label(label_paths[case.id], reference=volume).array
                     if case.id in label_paths else None)
        except DataError as err:
            raise written_so_far(err, i - 1, out) from None
        pred = predictor.rectify_volume(volume)
        o = outputs[case.id]
        make_folder(out)
        arrays = {"rectified": pred.rectified, "raw": pred.raw, "confidence": pred.confidence,
                  "reliable": (pred.confidence >= threshold).astype(np.uint8)}
        for kind, path in o.files.items():
            write_image(arrays[kind], volume, path, overwrite=overwrite)
        if o.preview is not None:
            from crlnseg.inference.preview import save_preview

            make_folder(o.preview.parent)
            save_preview(volume.array[0], pred, o.preview, overwrite)
        rows.append(case_row(case.id, pred, threshold, n_classes, label))
    meta = {"model": str(model), "checkpoint": which, "threshold": threshold,
            "classes": predictor.classes}
    _write_summary(rows, out, meta, overwrite)
    return rows
