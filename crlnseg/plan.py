"""``crlnseg plan``: the values ``train`` would plan from a dataset's fingerprint, with reasons.

The rules are :mod:`crlnseg.data.planner`'s; ``train`` applies the same plan to every value that
no preset, settings file, option or ``--set`` gives, and stores it in its checkpoints
(``meta["plan"]``), so ``predict`` and ``rectify`` preprocess new scans as planned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crlnseg.data import planner
from crlnseg.data.planner import Plan
from crlnseg.settings import RunSettings

__all__ = ["plan_dataset", "planned", "table", "as_json"]


def plan_dataset(folders: Sequence[Path], settings: RunSettings | None = None,
                 device: str = "auto") -> Plan:
    """The plan of ``folders`` (raw or prepared; the first holds the labelled cases) for
    ``device`` ("auto": CUDA when a GPU is visible)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return planner.plan_folders(settings or RunSettings(), list(folders), device)


def table(plan: Plan) -> str:
    """``key  value  reason`` lines, aligned."""
    rows = plan.table()
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    fp = plan.fingerprint
    head = (f"{fp['cases']} cases ({fp['labelled']} labelled, {fp['unlabelled']} unlabelled), "
            f"modality {fp['modality']}, median spacing {planner.show(fp['spacing_median'])} mm, "
            f"planned for {plan.device}")
    return "\n".join([head, *(f"{k:<{width[0]}}  {v:<{width[1]}}  {why}" for k, v, why in rows)])


def as_json(plan: Plan) -> dict[str, Any]:
    return {"device": plan.device, "fingerprint": plan.fingerprint,
            "plan": {k: {"value": v, "reason": plan.reasons.get(k, "")}
                     for k, v in plan.values.items()}}


def planned(settings: RunSettings, labelled: Path | None, unlabelled: Path | None
            ) -> tuple[RunSettings, Plan | None]:
    """``settings`` as ``train`` would plan them for these inputs (``--print-config``)."""
    if labelled is None or not settings.train.plan:
        return settings, None
    if settings.method.method == "supervised":
        unlabelled = None
    result = plan_dataset([labelled, unlabelled], settings, settings.train.device)
    return planner.apply(settings, result), result
