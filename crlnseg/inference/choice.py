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

if TYPE_CHECKING:
    from crlnseg.settings import PredictSettings

__all__ = ["DEFAULT_SIGMA", "CANDIDATE_SIGMAS", "variant_name", "candidates", "choose",
           "describe", "apply_choice"]

DEFAULT_SIGMA = 1.0 / 8.0  # nnU-Net's and MONAI's; the built-in default of crlnseg predict
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
    stored in a checkpoint's ``meta["inference"]``."""
    best = max(scores, key=lambda c: (scores[c], -list(scores).index(c)))
    sigma, largest = best
    return {"sigma_scale": sigma, "keep_largest": largest, "iteration": iteration,
            "val_dice": {variant_name(*c): round(float(v), 6) for c, v in scores.items()}}


def describe(choice: dict[str, Any]) -> str:
    """One line for logs: what was chosen, on which scores."""
    name = variant_name(choice.get("sigma_scale"), bool(choice.get("keep_largest")))
    dice = choice.get("val_dice", {})
    at = f" at iteration {choice['iteration']}" if choice.get("iteration") is not None else ""
    return f"{name} (validation Dice {dice.get(name, float('nan')):.4f}{at})"


def apply_choice(settings: PredictSettings, choice: dict[str, Any] | None
                 ) -> tuple[PredictSettings, str | None]:
    """Concrete predict settings: what the user set explicitly, else the run's ``choice`` (when
    ``settings.tuned``), else the built-in defaults (sigma 1/8, no post-processing). Also returns
    a log line when the run's choice changed something, else None."""
    tuned = choice if settings.tuned and choice else {}
    sigma = settings.sigma_scale
    if sigma is None:
        sigma = tuned.get("sigma_scale") or DEFAULT_SIGMA
    largest = settings.keep_largest
    if largest is None:
        largest = bool(tuned.get("keep_largest", False))
    note = None
    sigma_used = settings.sigma_scale is None and sigma != DEFAULT_SIGMA
    used = (sigma_used and settings.mode == "gaussian") or (settings.keep_largest is None
                                                            and largest)
    if used and choice is not None:
        note = (f"using the run's choice on its validation set: {describe(choice)}; "
                "--no-tuned for the built-in defaults")
    return settings.model_copy(update={"sigma_scale": sigma, "keep_largest": largest}), note
