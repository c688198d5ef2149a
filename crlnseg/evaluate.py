"""`evaluate`: per-case, per-class Dice/Jaccard/HD95/ASD of predicted masks against ground truth.

Cases are matched by ID (the discovery rules of ``prepare``, except that each mask file is a case:
masks have no channels, so ``patient_0001.nii.gz`` is case ``patient_0001``). Before any metric,
each pair must agree in shape and geometry (spacing, origin, direction within
:data:`~crlnseg.io.readers.GEOMETRY_TOL`, as ``prepare``) and hold non-negative integer labels,
else :class:`DataError` naming the case. Distances are in mm (GT spacing) unless
``voxel_units``. Default classes: every non-zero label found in any ground-truth case (union over
cases), so each case reports the same classes. Empty-mask rules: see :mod:`crlnseg.metrics`.
The summary per class and metric holds mean, population std (ddof=0, as ``numpy.std``), median, n
and, with ``bootstrap`` > 0, a seeded percentile-bootstrap 95% interval of the mean; HD95/ASD
statistics use defined values only and count the others as ``n_undefined``.
"""

from __future__ import annotations

import csv
import io
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crlnseg.console import track
from crlnseg.errors import DataError, OutputExistsError
from crlnseg.io.paths import split_suffix
from crlnseg.io.readers import GEOMETRY_TOL, label_array
from crlnseg.metrics import case_metrics, usable_cores
from crlnseg.settings import EvaluateSettings

__all__ = ["Pair", "Report", "evaluate", "evaluate_pair", "query_threads",
           "evaluate_pairs", "match_cases", "plan_pairs", "check_output", "summarize",
           "bootstrap_ci"]

METRICS = ("dice", "jaccard", "hd95", "asd")


@dataclass(frozen=True)
class Pair:
    case: str
    pred: Path | None
    gt: Path | None


def _read(path: Path, case: str, side: str) -> tuple[np.ndarray, object]:
    """An integer label array (X, Y, Z) and its geometry; DataError if unreadable or not a mask."""
    try:
        volume = _read_image(path)
    except DataError as err:
        raise DataError(f"case {case}: {side} mask {err}") from None
    except (OSError, RuntimeError, ValueError, EOFError) as err:  # SimpleITK/nibabel/zlib
        raise DataError(f"case {case}: cannot read {side} mask {path}: {err}") from None
    try:
        array = label_array(np.asarray(volume.array), path)  # (X, Y, Z, 1) is 3D, as for images
    except DataError as err:
        raise DataError(f"case {case}: {side} mask {err}") from None
    if array.dtype.kind == "b":
        return array.view(np.uint8), volume.geometry
    if array.dtype.kind not in "iu":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise DataError(f"case {case}: {side} mask {path} has non-integer values "
                            f"(e.g. {array[bad].flat[0]!r}); masks must hold integer labels")
        array = array.astype(np.int32)
    if array.size and array.min() < 0:  # as prepare: a label is a class index
        raise DataError(f"case {case}: {side} mask {path} has negative labels "
                        f"(min {array.min()}); labels are class indices 0, 1, 2...")
    return array, volume.geometry


def evaluate_pair(pair: Pair, classes: list[int] | None, voxel_units: bool, threads: int = -1
                  ) -> tuple[list[dict], list[int]]:
    """Rows for one case (classes: given, else labels in either mask) and its GT labels;
    ``threads``: of the surface-distance queries (-1: every core)."""
    if pair.pred is None or pair.gt is None:
        return [], []
    pred, pred_geometry = _read(pair.pred, pair.case, "prediction")
    gt, gt_geometry = _read(pair.gt, pair.case, "ground-truth")
    if pred.shape != gt.shape:
        raise DataError(f"case {pair.case}: prediction shape {pred.shape} != ground-truth "
                        f"shape {gt.shape} ({pair.pred})")
    if not pred_geometry.close_to(gt_geometry, GEOMETRY_TOL):
        raise DataError(f"case {pair.case}: prediction geometry differs from the ground truth "
                        f"by more than {GEOMETRY_TOL:g}: {_difference(pred_geometry, gt_geometry)} "
                        f"({pair.pred})")
    gt_labels = _labels(gt)
    if classes is None:
        classes = sorted(set(gt_labels) | set(_labels(pred)))
    spacing = None if voxel_units else tuple(gt_geometry.spacing)
    rows = case_metrics(pred, gt, classes, spacing, threads)
    return [{"case": pair.case, **row} for row in rows], gt_labels


def _labels(array: np.ndarray, few: int = 32) -> list[int]:
    """The non-zero labels of a mask; a comparison per label up to ``few`` (a binary mask costs
    two passes instead of ``numpy.unique``'s sort or hash of the whole volume)."""
    if array.size == 0:
        return []
    top = int(array.max())
    if top <= few:
        return [k for k in range(1, top + 1) if (array == k).any()]
    return [int(v) for v in np.unique(array) if v != 0]


def _difference(pred: object, gt: object) -> str:
    """``"spacing (1, 1, 1.3) vs (1, 1, 1.25)"`` for each geometry field that differs."""
    parts = []
    for name in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(pred, name)), np.asarray(getattr(gt, name))
        if not np.allclose(a, b, rtol=0.0, atol=GEOMETRY_TOL):
            text = [", ".join(f"{x:.6g}" for x in v) for v in (a, b)]
            parts.append(f"{name} ({text[0]}) vs ({text[1]})")
    return "; ".join(parts)


def _run(job: tuple[Pair, list[int] | None, bool, int]) -> tuple[list[dict], list[int]]:
    return evaluate_pair(*job)


def query_threads(settings: EvaluateSettings, cases: int) -> int:
    """``settings.threads``, else the usable cores shared by the processes (at least 1 each)."""
    if settings.threads is not None:
        return settings.threads
    return max(1, usable_cores() // max(1, min(settings.workers, cases)))


def match_cases(pred_dir: Path, gt_dir: Path, allow_missing: bool) -> list[Pair]:
    """Pairs of mask files matched by case ID; DataError listing one-sided cases unless allowed."""
    preds, gts = _discover(pred_dir), _discover(gt_dir)
    if not gts:
        raise DataError(f"{gt_dir}: no ground-truth masks found")
    only_pred, only_gt = sorted(preds.keys() - gts.keys()), sorted(gts.keys() - preds.keys())
    if (only_pred or only_gt) and not allow_missing:
        parts = [f"no prediction for {len(only_gt)} case(s): {_names(only_gt)}" if only_gt else "",
                 f"no ground truth for {len(only_pred)} case(s): {_names(only_pred)}"
                 if only_pred else ""]
        raise DataError(f"{pred_dir} vs {gt_dir}: " + "; ".join(p for p in parts if p)
                        + " (--allow-missing scores them as failures)")
    cases = sorted(preds.keys() | gts.keys())
    return [Pair(case, preds.get(case), gts.get(case)) for case in cases]


def _names(ids: list[str], limit: int = 10) -> str:
    more = f" ... (+{len(ids) - limit})" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def _failure_rows(case: str, classes: list[int]) -> list[dict]:
    return [{"case": case, "class": k, "dice": 0.0, "jaccard": 0.0, "hd95": None, "asd": None}
            for k in classes]


def _both_empty_row(case: str, k: int) -> dict:
    return {"case": case, "class": k, "dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def evaluate_pairs(pairs: list[Pair], settings: EvaluateSettings) -> Report:
    """Compute every pair (in a process pool with ``workers`` > 1, each process querying
    surface distances with :func:`query_threads` threads) and summarise."""
    threads = query_threads(settings, len(pairs))
    jobs = [(pair, settings.classes, settings.voxel_units, threads) for pair in pairs]
    if settings.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(settings.workers, len(jobs))) as pool:
            results = list(track(pool.map(_run, jobs), "evaluating", total=len(jobs)))
    else:
        results = [_run(job) for job in track(jobs, "evaluating")]
    classes = settings.classes
    if classes is None:
        classes = sorted({k for _, labels in results for k in labels})
        if not classes:
            raise DataError("no non-zero label in any ground-truth mask: name the labels to "
                            "score with --classes")
    rows = []
    for pair, (case_rows, _) in zip(pairs, results, strict=True):
        if pair.pred is None or pair.gt is None:
            rows += _failure_rows(pair.case, classes)
            continue
        by_class = {row["class"]: row for row in case_rows}
        # A union class absent from both masks of this case was not computed: both empty.
        rows += [by_class.get(k) or _both_empty_row(pair.case, k) for k in classes]
    units = "voxel" if settings.voxel_units else "mm"
    return Report(units, rows, summarize(rows, classes, settings.bootstrap, settings.seed))


def plan_pairs(pred: Path, gt: Path, allow_missing: bool = False) -> list[Pair]:
    """The pairs to score: two mask files (one case, named after the GT file) or two folders."""
    pred, gt = Path(pred), Path(gt)
    from crlnseg.data.discovery import missing_reason

    for path, side in ((pred, "prediction"), (gt, "ground truth")):
        if not path.exists():
            what = missing_reason(path) if path.is_symlink() else "path does not exist"
            raise DataError(f"{path}: {side} {what}")
    if pred.is_dir() and gt.is_dir():
        return match_cases(pred, gt, allow_missing)
    if pred.is_dir() or gt.is_dir():
        raise DataError(f"{pred} and {gt}: give two mask files or two folders, not one of each")
    return [Pair(_case_id(gt), pred, gt)]


def evaluate(pred: Path, gt: Path, settings: EvaluateSettings) -> Report:
    """Two mask files (one case, named after the GT file) or two folders."""
    return evaluate_pairs(plan_pairs(pred, gt, settings.allow_missing), settings)


def check_output(output: Path, pairs: list[Pair], overwrite: bool) -> None:
    """Refuse the report's path before any metric is computed: an input mask (even with
    overwrite), an existing file without overwrite, a folder, or a missing folder."""
    from crlnseg.io.writers import check_not_inputs, check_outputs

    output = Path(output)
    check_not_inputs([output], [p for pair in pairs for p in (pair.pred, pair.gt) if p])
    if not output.parent.exists():
        raise OutputExistsError(f"{output}: folder {output.parent} does not exist")
    check_outputs([output], overwrite)  # a folder in the way, exists, unwritable: as every writer


# --- summary and report -------------------------------------------------------------------------


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int) -> list[float]:
    """Percentile-bootstrap 95% interval of the mean, from a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 1_000_000 // max(values.size, 1))  # bound memory to ~8 MB of indices
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        picks = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def _stats(values: list[float | None], bootstrap: int, seed: int, distance: bool) -> dict:
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    stats: dict = {"mean": None, "std": None, "median": None, "n": int(defined.size),
                   "ci95": None}
    if defined.size:
        stats.update(mean=float(defined.mean()), std=float(defined.std()),
                     median=float(np.median(defined)))
        if bootstrap > 0:
            stats["ci95"] = bootstrap_ci(defined, bootstrap, seed)
    if distance:
        stats["n_undefined"] = len(values) - int(defined.size)
    return stats


def summarize(rows: list[dict], classes: list[int], bootstrap: int = 0, seed: int = 0
              ) -> dict[str, dict]:
    """``{"<k>": {metric: {mean, std, median, n, ci95[, n_undefined]}}}`` over the cases."""
    summary = {}
    for k in classes:
        mine = [row for row in rows if row["class"] == k]
        summary[str(k)] = {m: _stats([row[m] for row in mine], bootstrap, seed,
                                     m in ("hd95", "asd")) for m in METRICS}
    return summary


@dataclass
class Report:
    """Per-case rows (``case, class, dice, jaccard, hd95, asd``) and their summary per class."""

    units: str
    rows: list[dict]
    summary: dict[str, dict]

    def to_dict(self) -> dict:
        return {"units": self.units, "cases": self.rows, "summary": self.summary}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_csv(self) -> str:
        """One row per case and class; undefined distances are empty cells."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("case", "class") + METRICS)
        for row in self.rows:
            writer.writerow([row["case"], row["class"]]
                            + ["" if row[m] is None else repr(float(row[m])) for m in METRICS])
        return out.getvalue()

    def to_table(self, color: bool = True, width: int | None = None) -> str:
        """Rich tables (cases, then summary) rendered to text."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        def cell(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        cases = Table(title=f"Per case (distances in {self.units})")
        for name in ("case", "class") + METRICS:
            cases.add_column(name, justify="left" if name == "case" else "right")
        for row in self.rows:
            # A case ID is a file name, not rich markup: "s[red]x" must show as such.
            cases.add_row(escape(row["case"]), str(row["class"]),
                          *(cell(row[m]) for m in METRICS))
        # The interval is shown where bootstrap resamples gave one (--bootstrap N).
        has_ci = any(s.get("ci95") is not None for per_metric in self.summary.values()
                     for s in per_metric.values())
        interval = " [95% CI]" if has_ci else ""
        summary = Table(title=f"Summary: mean ± std (median){interval}; n/a = undefined")
        for name in ("class",) + METRICS:
            summary.add_column(name, justify="right")
        for k, per_metric in self.summary.items():
            summary.add_row(k, *(_summary_cell(per_metric[m]) for m in METRICS))
        import shutil

        text = io.StringIO()
        width = width or max(shutil.get_terminal_size((120, 24)).columns, 80)
        console = Console(file=text, force_terminal=color, no_color=not color, width=width,
                          highlight=False)
        console.print(cases)
        console.print(summary)
        return text.getvalue()

    def render(self, fmt: str, color: bool = False) -> str:
        if fmt == "json":
            return self.to_json()
        if fmt == "csv":
            return self.to_csv()
        return self.to_table(color=color)


def _summary_cell(s: dict) -> str:
    if s["mean"] is None:
        text = "n/a"
    else:
        text = f"{s['mean']:.4f} ± {s['std']:.4f} ({s['median']:.4f})"
        if s["ci95"] is not None:
            text += f" [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"
    if s.get("n_undefined"):
        text += f" ({s['n_undefined']} n/a)"
    return text


def write_text(path: Path, text: str, overwrite: bool = False) -> None:
    """Write atomically (:func:`crlnseg.io.writers.write_atomic`); refuse to overwrite."""
    from crlnseg.io.writers import write_atomic

    write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""),
                 overwrite)


# --- I/O -----------------------------------------------------------------------------------------

def _read_image(path: Path) -> object:
    """A mask volume; for an HDF5 case file, its ``label`` dataset."""
    from crlnseg.io.readers import read_h5_case, read_image

    if split_suffix(path)[1].lower() in (".h5", ".hdf5"):
        label = read_h5_case(path)[1]
        if label is None:
            raise DataError(f"{path}: HDF5 file has no 'label' dataset")
        return label
    return read_image(path)


def _discover(folder: Path) -> dict[str, Path]:
    """Case ID -> mask file, by the discovery rules of ``prepare`` without channel files."""
    from crlnseg.data.discovery import discover_cases

    # A mask is one file: "patient_0001.nii.gz" is case "patient_0001", not channel 1.
    cases = discover_cases(folder, channels=False)
    if any(len(c.images) > 1 for c in cases):  # nnU-Net imagesTr/ channel files: one per case
        return {split_suffix(p)[0]: p for c in cases for p in c.images}
    # A dataset folder (images/ + labels/) gives its label files; a folder of masks its "images".
    return {c.id: c.label if c.label is not None and not c.label_in_image else c.images[0]
            for c in cases}


def _case_id(path: Path) -> str:
    from crlnseg.data.discovery import discover_single

    return discover_single(path, channels=False).id  # masks have no channel suffixes
