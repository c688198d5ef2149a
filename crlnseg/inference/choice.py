"""Blending and post-processing chosen on a run's validation set, as nnU-Net chooses its
post-processing on held-out data.

Which Gaussian sigma blends patches best, and whether keeping the largest connected component
helps, depends on the model (benchmarks/RESULTS.md, "Blending across methods": flatter weights
gain CRLN models about a Dice point and cost mean-teacher and supervised models up to 20; keeping
the largest component suits a single structure, not lesions). Validation during training scores
every candidate on the same patch outputs; the best is stored in the checkpoint
(``meta["inference"]``) and ``crlnseg predict`` uses it unless told otherwise (``--sigma``,
``--keep-largest/--no-keep-largest``, ``--no-tuned``).

Candidates are few on purpose: each one more is one more chance to fit the validation cases'
noise (16 LA cases give intervals of about two Dice points).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crlnseg.inference.sliding_window import DEFAULT_SIGMA, resolve_sigma  # nnU-Net's 1/8

if TYPE_CHECKING:
    from crlnseg.settings import PredictSettings

__all__ = ["DEFAULT_SIGMA", "CANDIDATE_SIGMAS", "variant_name", "candidates", "choose",
           "describe", "check_choice", "apply_choice"]


# The default and the flatter weighting that CRLN models preferred on LA (benchmarks/RESULTS.md).
CANDIDATE_SIGMAS = (DEFAULT_SIGMA, 1.0 / 3.0)


def variant_name(sigma_scale: float | None, keep_largest: bool) -> str:
    """``"sigma 1/8"``, ``"sigma 1/3 + largest"``, ``"uniform"`` (sigma None: uniform blending)."""
    base = "uniform" if sigma_scale is None else f"sigma 1/{round(1 / sigma_scale)}"
    return f"{base} + largest" if keep_largest else base


def candidates(gaussian: bool) -> list[tuple[float | None, bool]]:
    """(sigma_scale, keep_largest) pairs, the built-in default first (it wins ties)."""
    sigmas: tuple[float | None, ...] = CANDIDATE_SIGMAS if gaussian else (None,)
    return [(s, k) for k in (False, True) for s in sigmas]


def choose(scores: dict[tuple[float | None, bool], float], iteration: int | None = None
           ) -> dict[str, Any]:
    """The candidate with the highest mean validation Dice (the earliest listed on a tie), as
    stored in a checkpoint's ``meta["inference"]``: the winner, the blending it was scored with
    (``gaussian``, or ``uniform`` when validation used ``train.val_stride``), and every
    candidate's score (``scores``: ``[sigma, keep_largest, dice]``; ``val_dice``: by name)."""
    best = max(scores, key=scores.__getitem__)  # max keeps the first of equals: the default
    sigma, largest = best
    return {"blend": "uniform" if sigma is None else "gaussian", "sigma_scale": sigma,
            "keep_largest": largest, "dice": round(float(scores[best]), 6),
            "iteration": iteration,
            "scores": [[s, k, round(float(v), 6)] for (s, k), v in scores.items()],
            "val_dice": {variant_name(*c): round(float(v), 6) for c, v in scores.items()}}


def describe(choice: dict[str, Any]) -> str:
    """One line for logs: what was chosen, on which scores."""
    name = variant_name(choice.get("sigma_scale"), bool(choice.get("keep_largest")))
    at = f" at iteration {choice['iteration']}" if choice.get("iteration") is not None else ""
    return f"{name} (validation Dice {choice.get('dice', float('nan')):.4f}{at})"


def check_choice(choice: Any) -> str | None:
    """Why a checkpoint's ``meta["inference"]`` is unusable, or None when it is sound."""
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("blend") not in ("gaussian", "uniform"):
        return "inference choice without a blending"
    rows = choice.get("scores")
    if not isinstance(rows, list) or not rows:
        return "inference choice without scores"
    for row in rows:
        ok = (isinstance(row, list | tuple) and len(row) == 3 and isinstance(row[1], bool)
              and isinstance(row[2], int | float)
              and (row[0] is None if choice["blend"] == "uniform"
                   else isinstance(row[0], int | float) and row[0] > 0))
        if not ok:
            return f"inference choice with a bad score {row!r}"
    return None


def apply_choice(settings: PredictSettings, choice: dict[str, Any] | None
                 ) -> tuple[PredictSettings, str | None]:
    """Concrete predict settings: what the user set explicitly, else the best of the run's
    validated candidates that agree with it (when ``settings.tuned``), else the built-in defaults
    (sigma 1/8, no post-processing). A choice scored with another blending (Gaussian vs uniform)
    is not applied. Also returns a log line saying what the run's choice set, or None."""
    sigma, largest = settings.sigma_scale, settings.keep_largest
    note = None
    if settings.tuned and choice and choice.get("blend") == settings.mode:
        gaussian = settings.mode == "gaussian"
        rows = [(s, k, d) for s, k, d in choice["scores"]
                if (largest is None or k == largest)
                and (sigma is None or not gaussian or abs(s - sigma) < 1e-9)]
        if not rows and largest is None:  # an explicit sigma outside the candidates
            rows = [(s, k, d) for s, k, d in choice["scores"] if k == choice["keep_largest"]]
        if rows:
            best = max(rows, key=lambda r: r[2])  # the first listed (default first) wins ties
            set_here = []
            if sigma is None and gaussian:
                sigma = best[0]
                set_here.append(variant_name(sigma, False))
            if largest is None:
                largest = best[1]
                set_here.append("largest component kept" if largest else "no post-processing")
            at = (f" at iteration {choice['iteration']}"
                  if choice.get("iteration") is not None else "")
            if (sigma != DEFAULT_SIGMA and settings.sigma_scale is None and gaussian) or (
                    largest and settings.keep_largest is None):
                note = (f"using the run's choice on its validation set: {', '.join(set_here)} "
                        f"(validation Dice {best[2]:.4f}{at}); --no-tuned for the built-in "
                        "defaults")
    elif settings.tuned and choice and (settings.sigma_scale is None
                                        or settings.keep_largest is None):
        note = (f"not using the run's validated choice: it was scored with {choice.get('blend')} "
                f"blending, this prediction blends {settings.mode}")
    sigma = resolve_sigma(sigma)
    largest = bool(largest)
    return settings.model_copy(update={"sigma_scale": sigma, "keep_largest": largest}), note
