"""The arithmetic of two benchmark scripts whose tables RESULTS.md quotes: the pseudo-label
flip counts of ``benchmarks/pseudo_label_curve.py`` and the paired tables of
``benchmarks/la_study.py`` (the trainings themselves are ``la.py``'s, tested elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:  # the scripts import each other, as run from there
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probs(labels: np.ndarray, confidence: float) -> np.ndarray:
    """Two-class probabilities whose argmax is ``labels``, with the given max probability."""
    fg = np.where(labels == 1, confidence, 1 - confidence)
    return np.stack([1 - fg, fg])


def test_flip_stats_counts_fixes_and_breaks() -> None:
    curve = _load("pseudo_label_curve")
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    raw = np.array([1, 1, 0, 0, 0, 0, 1, 0])        # 2 foreground voxels missed, 1 false positive
    rect = np.array([1, 1, 1, 0, 0, 1, 0, 0])       # fixes voxels 2 and 6, breaks voxel 5
    stats = curve.flip_stats(_probs(raw, 0.9), _probs(rect, 0.99), truth, threshold=0.97)
    assert stats["flips"] == 3 / 4 and stats["fixes"] == 2 / 4 and stats["breaks"] == 1 / 4
    assert stats["reliable_raw"] == 0.0 and stats["reliable_rectified"] == 1.0


def _run(method: str, seed: int, case_dice: dict[str, float]) -> dict:
    return {"method": method, "seed": seed, "train_seconds": 60.0,
            "validation": {"voxel": {"dice": float(np.mean(list(case_dice.values())))},
                           "voxel_cases": [{"case": c, "class": 1, "dice": d}
                                           for c, d in case_dice.items()]}}


def test_recipe_table_pairs_each_seed_with_its_own_baseline(tmp_path: Path) -> None:
    study = _load("la_study")
    runs = {"baseline": [_run("supervised", 0, {"a": 0.70, "b": 0.80}),
                         _run("supervised", 1, {"a": 0.60, "b": 0.90})],
            "mirror": [_run("supervised", 0, {"a": 0.75, "b": 0.79}),
                       _run("supervised", 1, {"a": 0.70, "b": 0.90})]}
    for variant, rows in runs.items():
        folder = tmp_path / "recipe" / variant
        folder.mkdir(parents=True)
        (folder / "la_8.json").write_text(json.dumps({"runs": rows}))
    table = study.summarise("recipe", tmp_path)
    change = table["mirror"]["supervised"]["vs_baseline"]
    # Pairs (seed, case): +5, -1, +10, 0 points.
    assert np.isclose(change["mean"], 3.5) and change["wins"] == 2 and change["pairs"] == 4
    assert "vs_baseline" not in table["baseline"]["supervised"]
    text = study.markdown("recipe", table)
    assert "+3.50 (2/4)" in text and "78.50 (s0 77.00, s1 80.00)" in text


def test_la_tables_keep_earlier_runs_of_the_same_protocol(tmp_path: Path) -> None:
    la = _load("la")
    meta = {"labelled": 8, "unlabelled": 56, "preset": "cpu", "iterations": 1000,
            "overrides": [], "defaults": {"augment": {"gamma_p": 0.0}}, "fold": 3,
            "cases": {"validation": 16}, "command": "first"}
    path = tmp_path / "la_8_fold3.json"
    earlier = [_run("supervised", 0, {"a": 0.7}), _run("crln", 0, {"a": 0.8})]
    path.write_text(json.dumps({"meta": {**meta, "seeds": [0]}, "runs": earlier}))
    again = _run("crln", 0, {"a": 0.9})
    runs, merged = la.merge_earlier(path, [_run("supervised", 2, {"a": 0.6}), again],
                                    {**meta, "seeds": [2], "command": "second"})
    assert [(r["method"], r["seed"]) for r in runs] == [("supervised", 0), ("crln", 0),
                                                        ("supervised", 2)]
    assert runs[1] is again  # the newer run of a method and seed replaces the older one
    assert merged["seeds"] == [0, 2] and merged["commands"] == ["first", "second"]
    other, _ = la.merge_earlier(path, [again], {**meta, "iterations": 2000, "seeds": [0]})
    assert other == [again]  # another protocol: nothing merged
    defaults = {**meta, "seeds": [0], "defaults": la.recipe_defaults()}
    other, _ = la.merge_earlier(path, [again], defaults)
    assert other == [again]  # trained under other default settings: nothing merged


def test_budget_margins_use_the_seeds_every_budget_has(tmp_path: Path) -> None:
    study = _load("la_study")
    rows = {"1000": [_run("supervised", 0, {"a": 0.70}), _run("crln", 0, {"a": 0.80}),
                     _run("supervised", 1, {"a": 0.50}), _run("crln", 1, {"a": 0.90})],
            "2000": [_run("supervised", 0, {"a": 0.75}), _run("crln", 0, {"a": 0.80})]}
    for variant, runs in rows.items():
        folder = tmp_path / "budget" / variant
        folder.mkdir(parents=True)
        (folder / "la_8_fold2.json").write_text(json.dumps({"runs": runs}))
    table = study.summarise("budget", tmp_path)
    # Seed 1 exists at 1000 only: leaving it in would make 1000's margin +25, not +10.
    assert np.isclose(table["1000"]["margin"]["mean"], 10.0)
    assert np.isclose(table["2000"]["margin"]["mean"], 5.0)
    assert table["1000"]["margin"]["seeds"] == [0]


def test_budget_variant_joins_its_earlier_code_state_table(tmp_path: Path) -> None:
    study = _load("la_study")
    folder = tmp_path / "budget" / "2000"
    (folder / "earlier").mkdir(parents=True)
    (folder / "la_8_fold2.json").write_text(json.dumps({"runs": [
        _run("supervised", 1, {"a": 0.60}), _run("crln", 1, {"a": 0.70}),
        _run("crln", 0, {"a": 0.85})]}))
    (folder / "earlier" / "la_8_fold2.json").write_text(json.dumps({"runs": [
        _run("supervised", 0, {"a": 0.75}), _run("crln", 0, {"a": 0.10})]}))
    table = study.summarise("budget", tmp_path)
    # Seed 0's supervised run comes from the earlier table; its CRLN run from the current one.
    assert table["2000"]["supervised"]["seeds"] == {"1": 60.0, "0": 75.0}
    assert table["2000"]["crln"]["seeds"] == {"1": 70.0, "0": 85.0}
    assert np.isclose(table["2000"]["margin"]["mean"], 10.0)
    assert table["2000"]["margin"]["seeds"] == [0, 1]


def test_fold_table_pairs_crln_with_baselines_and_ablations_per_fold_and_seed(
        tmp_path: Path) -> None:
    folds = _load("la_folds")
    fold2 = [_run("supervised", 0, {"a": 0.70, "b": 0.80}), _run("crln", 0, {"a": 0.80, "b": 0.78}),
             _run("crln-no-rectify", 0, {"a": 0.81, "b": 0.70}),
             _run("mean-teacher", 0, {"a": 0.75, "b": 0.72})]
    # Fold 3 has an extra seed for CRLN only: it has no partner and must not be paired.
    fold3 = [_run("supervised", 0, {"c": 0.50}), _run("crln", 0, {"c": 0.60}),
             _run("crln", 1, {"c": 0.10})]
    (tmp_path / "la_8_fold2.json").write_text(json.dumps({"runs": fold2}))
    (tmp_path / "la_8_fold3.json").write_text(json.dumps({"runs": fold3}))
    res = folds.combine(folds.load(tmp_path, 8), [2, 3])
    sup = res["paired"]["supervised"]
    # Pairs: +10, -2 (fold 2), +10 (fold 3).
    assert np.isclose(sup["mean"], 6 / 100) and sup["wins"] == 2 and sup["pairs"] == 3
    ablation = res["paired"]["crln-no-rectify"]
    assert np.isclose(ablation["mean"], 3.5 / 100) and ablation["pairs"] == 2
    assert ablation["wins"] == 1
    assert res["runs_per_method"] == {"supervised": 2, "crln": 3, "crln-no-rectify": 1,
                                      "mean-teacher": 1}
    # The ablation against the teacher alone: +6, -2 on fold 2's cases.
    over = res["over_mean_teacher"]
    assert set(over) == {"crln-no-rectify"} and np.isclose(over["crln-no-rectify"]["mean"], 0.02)
    assert over["crln-no-rectify"]["wins"] == 1 and over["crln-no-rectify"]["pairs"] == 2
    text = folds.markdown(res, 8)
    assert "vs crln-no-rectify: +3.50" in text
    # Below three runs a method gets its mean and run count, not a t-interval.
    assert "**75.50** (1 run)" in text and "**62.50** (2 runs)" in text
    assert "**62.50 [" not in text
    assert "- crln-no-rectify: +2.00" in text


def test_fold_table_reports_pseudo_label_gain_and_training_loss_weight() -> None:
    folds = _load("la_folds")
    crln = {**_run("crln", 0, {"a": 0.8}),
            "pseudo": {"pseudo_dice_raw": 0.70, "pseudo_dice_rectified": 0.75},
            "reliable": {"iteration": [10, 20, 30], "before": [0.0, 0.1, 0.3],
                         "after": [None, 0.6, 0.8]}}
    plain = {**_run("crln-no-rectify", 0, {"a": 0.8}),
             "pseudo": {"pseudo_dice_raw": 0.72, "pseudo_dice_rectified": 0.71},
             "reliable": {"iteration": [10, 20], "before": [0.2, 0.4], "after": [None, None]}}
    table = folds.pseudo_labels([crln, plain, _run("supervised", 0, {"a": 0.5})],
                                ["supervised", "crln", "crln-no-rectify"])
    assert set(table) == {"crln", "crln-no-rectify"}  # supervised training has no pseudo-labels
    assert np.isclose(table["crln"]["gain"], 5.0) and table["crln"]["gain_runs"] == 1
    # The weight is the rectified share where the run trains on rectified labels, else (and in
    # the warm-up, before rectification starts) the raw one.
    assert np.isclose(table["crln"]["loss_weight"], 1.4 / 3)
    assert np.isclose(table["crln-no-rectify"]["loss_weight"], 0.3)
    assert np.isclose(table["crln-no-rectify"]["gain"], -1.0)
    assert table["crln-no-rectify"]["gain_runs"] == 0


def test_fold_comparison_pairs_each_method_with_its_earlier_runs(tmp_path: Path) -> None:
    folds = _load("la_folds")
    now, before = tmp_path / "now", tmp_path / "before"
    now.mkdir(), before.mkdir()
    (now / "la_8_fold2.json").write_text(json.dumps({"runs": [
        _run("supervised", 0, {"a": 0.80, "b": 0.70}), _run("crln", 0, {"a": 0.90})]}))
    (before / "la_8_fold2.json").write_text(json.dumps({"runs": [
        _run("supervised", 0, {"a": 0.70, "b": 0.75}), _run("supervised", 1, {"a": 0.10}),
        _run("crln", 0, {"a": 0.91})]}))
    # Fold 1 is not a report fold: its runs must not enter the comparison.
    (now / "la_8.json").write_text(json.dumps({"runs": [_run("crln", 0, {"z": 0.99})]}))
    (before / "la_8.json").write_text(json.dumps({"runs": [_run("crln", 0, {"z": 0.10})]}))
    change = folds.compare(folds.load(now, 8), folds.load(before, 8), [2])
    assert np.isclose(change["supervised"]["mean"], 2.5 / 100)
    assert change["supervised"]["wins"] == 1 and change["supervised"]["pairs"] == 2
    assert np.isclose(change["crln"]["mean"], -1 / 100) and change["crln"]["pairs"] == 1
    folds.main(["--out", str(now), "--report-folds", "2", "--compare", str(before)])
    saved = json.loads((now / "la_8_folds.json").read_text())
    assert saved["compare"]["change"]["crln"]["wins"] == 0
    assert "- supervised: +2.50" in (now / "la_8_folds.md").read_text()
