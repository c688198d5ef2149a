"""All settings, as pydantic models, in one place.

Every hyper-parameter of ``method/METHOD.md`` is a field here with the reference's default and a one-line
description. A run saves its resolved :class:`RunSettings` (``settings.json`` in the run folder and
inside every checkpoint). Presets are data (:data:`PRESETS`), applied as nested overrides.
Axis convention everywhere: arrays are ``(X, Y, Z)`` (channels first when present), the same order
as NIfTI voxel indices; "in-plane" means X and Y.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crlnseg.types import IntTriple, Triple

__all__ = [
    "Strict",
    "PrepareSettings",
    "ModelSettings",
    "MethodSettings",
    "AugmentSettings",
    "OptimSettings",
    "TrainSettings",
    "RunSettings",
    "PredictSettings",
    "EvaluateSettings",
    "PRESETS",
]



def check_stride(stride: IntTriple | None, patch: IntTriple | None) -> None:
    """A sliding-window stride of 0 never moves and one longer than the patch leaves voxels that
    no patch covers (blended as 0 / 0): each side must lie in 1 .. patch."""
    if stride is None:
        return
    if any(s < 1 for s in stride):
        raise ValueError(f"each side must be at least 1, got {tuple(stride)}")
    if patch is not None and any(s > p for s, p in zip(stride, patch, strict=True)):
        raise ValueError(f"each side must be at most the patch size {tuple(patch)}, got "
                         f"{tuple(stride)}")


def check_patch(patch: IntTriple, total_stride: IntTriple, what: str = "patch") -> None:
    """Both backbones down-sample four times: every side must divide by that axis's total
    stride (16 with the default topology)."""
    if any(p < s or p % s for p, s in zip(patch, total_stride, strict=True)):
        sides = ("a positive multiple of 16" if set(total_stride) == {16}
                 else f"a positive multiple of the model's total stride {tuple(total_stride)}")
        raise ValueError(f"{what}: each side must be {sides}, got {tuple(patch)}")


def _range(v: tuple[float, float], lo: float, hi: float, open_low: bool = False
           ) -> tuple[float, float]:
    """A (LO, HI) range with LO <= HI inside [lo, hi] (lo excluded when ``open_low``)."""
    low_ok = v[0] > lo if open_low else v[0] >= lo
    if not (low_ok and v[0] <= v[1] <= hi):  # NaN fails too
        bound = f"LO > {lo:g}" if open_low else f"LO >= {lo:g}"
        bound += "" if hi == math.inf else f" and HI <= {hi:g}"
        raise ValueError(f"needs LO <= HI with {bound}, got {tuple(v)}")
    return v


class Strict(BaseModel):
    """Base: unknown keys are errors, so a typo in a settings file is caught."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PrepareSettings(Strict):
    """How raw scans become the training cache (``crlnseg prepare``)."""

    orientation: Literal["canonical", "input"] = Field("canonical", description="canonical: transpose and flip every case to the closest RAS axis order first (never resampled; outputs go back to the input's order); input: keep each file's array order")
    target_spacing: Triple | None = Field(None, description="resample to this spacing in mm (X Y Z, canonical axes); planned from the dataset unless set (train.plan); None without a plan keeps each case's spacing")
    normalize: Literal["zscore", "ct", "minmax", "none"] = Field("zscore", description="intensity normalisation; planned (ct for CT data, else per-case zscore) unless set")
    modality: Literal["auto", "ct", "other"] = Field("auto", description="what the plan normalises for; auto: CT when dataset.json names every channel CT (nnU-Net's channel_names)")
    ct_window: tuple[float, float] = Field((-1000.0, 1000.0), description="clip window (HU) for normalize=ct; planned: the 0.5 / 99.5 percentiles of the labelled foreground")
    ct_stats: tuple[float, float] | None = Field(None, description="mean and std for normalize=ct, after clipping; planned: those of the labelled foreground of the whole dataset; None: each case's own")
    crop_nonzero: bool = Field(False, description="crop each case to the bounding box of its non-zero image voxels")
    interpolation: Literal["linear", "bspline"] = Field("bspline", description="image resampling (labels: nearest): linear or cubic B-spline as nnU-Net")
    h5_spacing: Triple = Field((1.0, 1.0, 1.0), description="spacing assumed for HDF5 cases, which store none")

    @field_validator("target_spacing", "h5_spacing")
    @classmethod
    def _positive_spacing(cls, spacing: Triple | None) -> Triple | None:
        if spacing is not None and not all(0 < s < float("inf") for s in spacing):  # NaN too
            raise ValueError(f"spacing must be positive and finite, got {spacing}")
        return spacing

    @field_validator("ct_stats")
    @classmethod
    def _positive_std(cls, stats: tuple[float, float] | None) -> tuple[float, float] | None:
        if stats is not None and not (math.isfinite(stats[0]) and 0 < stats[1] < float("inf")):
            raise ValueError(f"needs a finite mean and a positive std, got {stats}")
        return stats

    @field_validator("ct_window")
    @classmethod
    def _ordered_window(cls, window: tuple[float, float]) -> tuple[float, float]:
        if window[0] >= window[1]:
            raise ValueError(f"the window needs LO < HI, got {window}")
        return window


class ModelSettings(Strict):
    """Backbone and CRLN modules (paper Sec. 3)."""

    backbone: Literal["vnet", "unet"] = Field("vnet", description="V-Net (LA, Pancreas) or 3D U-Net variant (BraTS)")
    in_channels: int = Field(1, ge=1, description="input channels (modalities)")
    num_classes: int = Field(2, ge=2, description="classes C including background")
    base_filters: int = Field(16, ge=2, description="filters of the first backbone level")
    dropout: bool = Field(True, description="dropout in the decoder as in the reference V-Net")
    prototypes_per_class: int = Field(16, ge=1, description="R, prototypes per class")
    prototype_dim: int = Field(64, ge=4, description="F, prototype (and embedding) width")
    strides: tuple[IntTriple, IntTriple, IntTriple, IntTriple] = Field(((2, 2, 2),) * 4, description="down-sampling X Y Z of each of the four levels; 1: the axis is not pooled there (anisotropic data)")
    kernels: tuple[IntTriple, IntTriple, IntTriple, IntTriple, IntTriple] = Field(((3, 3, 3),) * 5, description="convolution kernel X Y Z of each of the five levels; 1 along an axis too coarse to convolve across")
    norm: Literal["batch", "instance"] = Field("batch", description="normalisation of the backbone and its projection head: batch (reference) or instance (nnU-Net's, affine)")
    deep_supervision: bool = Field(False, description="auxiliary heads on the 1/2 and 1/4 decoder levels; the supervised loss of every method becomes nnU-Net's weighted sum over resolutions (weights 1, 1/2, 1/4, normalised). Inference never uses the heads")
    activation: Literal["relu", "leaky_relu"] = Field("relu", description="activation of the backbone and its projection head: relu (reference) or leaky_relu (nnU-Net's, slope 0.01)")

    @field_validator("strides")
    @classmethod
    def _strides_one_or_two(cls, strides: tuple[IntTriple, ...]) -> tuple[IntTriple, ...]:
        if any(s not in (1, 2) for level in strides for s in level):
            raise ValueError(f"each stride must be 1 or 2, got {strides}")
        return strides

    @field_validator("kernels")
    @classmethod
    def _kernels_odd(cls, kernels: tuple[IntTriple, ...]) -> tuple[IntTriple, ...]:
        if any(k not in (1, 3, 5) for level in kernels for k in level):
            raise ValueError(f"each kernel side must be 1, 3 or 5, got {kernels}")
        return kernels

    @property
    def total_stride(self) -> IntTriple:
        """The backbone's down-sampling per axis: patches are multiples of it."""
        return tuple(math.prod(level[a] for level in self.strides) for a in range(3))  # type: ignore[return-value]


class MethodSettings(Strict):
    """The training method and its loss weights (paper Sec. 2, 4, 5)."""

    method: Literal["crln", "mean-teacher", "supervised"] = Field("crln", description="crln, plain mean teacher, or labelled data only")
    rectify: bool = Field(True, description="rectify pseudo-labels with the relationship map M(x) (crln only)")
    positive_supervision: bool = Field(True, description="collaborative positive supervision loss (crln only)")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="EMA teacher decay cap; decay = min(1 - 1/(t+1), cap)")
    warmup_fraction: float = Field(0.02, ge=0, le=1, description="share of iterations with plain (unrectified) pseudo-labels")
    weak_threshold: float = Field(0.7, ge=0, le=1, description="teacher confidence for a voxel to be valid in positive supervision")
    confidence_threshold: float = Field(0.97, ge=0, le=1, description="confidence of a reliable pseudo-label (unsup. weight) and of a certain anchor")
    anchors: int = Field(256, ge=1, description="anchors sampled per class in positive supervision")
    negatives: int = Field(512, ge=1, description="negatives per anchor in positive supervision")
    temperature: float = Field(0.5, gt=0, description="InfoNCE temperature")
    xi: float = Field(0.6, ge=0, description="xi, weight of the prototype summary in the unassertive positive key")
    w_relation: float = Field(0.5, ge=0, description="weight of (CE + Dice)(M(x_l), y)")
    w_supervised: float = Field(0.5, ge=0, description="weight of (CE + Dice)(f(x_l), y)")
    w_unsup: float = Field(0.5, ge=0, description="weight of the pseudo-label loss L_unsup")
    w_cps: float = Field(0.5, ge=0, description="weight of the positive-supervision loss")
    mu_lr: float = Field(2.5e-3, gt=0, description="learning rate of mu's own optimiser")
    mu_view: Literal["weak", "strong"] = Field("weak", description="labelled view mu is fitted on: 'weak' = the student's f and M of the training view (paper, reference); 'strong' = the EMA teacher's f and M of a strong view of the labelled crops: more accurate rectified pseudo-labels, weaker student on LA (benchmarks/RESULTS.md 'mu')")


class AugmentSettings(Strict):
    """Weak and strong views (method/METHOD.md Sec. 1)."""

    weak_intensity: tuple[float, float] = Field((0.75, 1.25), description="weak view intensity scale range")
    rescale: tuple[float, float] = Field((0.5, 1.5), description="strong view in-plane rescale range")
    cutmix_beta: float = Field(4.0, gt=0, description="lambda ~ Beta(b, b) for the CutMix box")
    intensity: tuple[float, float] = Field((0.75, 1.25), description="strong view intensity scale range")
    intensity_p: float = Field(0.8, ge=0, le=1, description="probability of the strong intensity scale")
    noise_sigma: float = Field(0.1, ge=0, description="Gaussian noise sigma")
    noise_clip: float = Field(0.2, ge=0, description="noise clipped to +-this")
    noise_p: float = Field(0.5, ge=0, le=1, description="probability of noise")
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of the strong rot90/flip")
    # nnU-Net's spatial augmentation (data/spatial.py), after the weak view: labelled crops, and
    # the unlabelled weak view before the teacher sees it. Defaults off; nnU-Net's values in [].
    rotation_p: float = Field(0.0, ge=0, le=1, description="probability of a rotation per crop [0.2]")
    rotation: tuple[float, float] = Field((-30.0, 30.0), description="rotation angle range in degrees, drawn per rotated axis [-30 30; in-plane for anisotropic data: -180 180]")
    rotation_axes: Literal["all", "in-plane"] = Field("all", description="rotate about X, Y and Z, or in-plane (about Z) only")
    scale_p: float = Field(0.0, ge=0, le=1, description="probability of a scaling per crop [0.2]")
    scale: tuple[float, float] = Field((0.7, 1.4), description="scale range; > 1 shows a larger field of view (the content shrinks) [0.7 1.4]")
    elastic_p: float = Field(0.0, ge=0, le=1, description="probability of an elastic deformation per crop [0: off in nnU-Net v2; 0.2 in v1]")
    elastic_alpha: tuple[float, float] = Field((0.0, 900.0), description="elastic magnitude range (times the smoothed U(-1, 1) noise) [0 900]")
    elastic_sigma: tuple[float, float] = Field((9.0, 13.0), description="elastic smoothing sigma range in voxels [9 13]")
    mirror_p: Triple = Field((0.0, 0.0, 0.0), description="probability of mirroring along X, Y, Z per crop, after the other spatial transforms [0.5 0.5 0.5]")
    spatial_unlabelled: bool = Field(True, description="apply the spatial transforms to the unlabelled weak view too, before the teacher sees it (pseudo-labels stay aligned; voxels from outside the crop are ignored)")
    # nnU-Net's intensity augmentation (data/intensity.py), labelled crops only: on the unlabelled
    # stream it would change the teacher's weak view. On by default with nnU-Net's probabilities:
    # it helped supervised training and left CRLN unchanged (benchmarks/RESULTS.md 'recipe').
    gaussian_noise_p: float = Field(0.1, ge=0, le=1, description="probability of Gaussian noise per labelled crop")
    gaussian_noise_sigma: tuple[float, float] = Field((0.0, 0.1), description="noise sigma range [0 0.1]")
    blur_p: float = Field(0.2, ge=0, le=1, description="probability of a Gaussian blur per labelled crop, every channel blurred (nnU-Net: each channel with p 0.5)")
    blur_sigma: tuple[float, float] = Field((0.5, 1.0), description="blur sigma range in voxels, drawn per channel [0.5 1]")
    brightness_p: float = Field(0.15, ge=0, le=1, description="probability of a multiplicative brightness change per labelled crop")
    brightness: tuple[float, float] = Field((0.75, 1.25), description="brightness factor range, drawn per channel [0.75 1.25]")
    contrast_p: float = Field(0.15, ge=0, le=1, description="probability of a contrast change per labelled crop")
    contrast: tuple[float, float] = Field((0.75, 1.25), description="contrast factor range around the mean, range kept, drawn per channel [0.75 1.25]")
    gamma_inverted_p: float = Field(0.1, ge=0, le=1, description="probability of a gamma transform of the inverted intensities per labelled crop")
    gamma_p: float = Field(0.3, ge=0, le=1, description="probability of a gamma transform per labelled crop")
    gamma: tuple[float, float] = Field((0.7, 1.5), description="gamma range, drawn per channel, mean and std kept [0.7 1.5]")

    @field_validator("rotation")
    @classmethod
    def _degrees(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, -180.0, 180.0)

    @field_validator("scale", "elastic_sigma", "blur_sigma", "gamma")
    @classmethod
    def _positive_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, 0.0, math.inf, open_low=True)

    @field_validator("elastic_alpha", "gaussian_noise_sigma", "brightness", "contrast")
    @classmethod
    def _non_negative_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, 0.0, math.inf)

    @field_validator("mirror_p")
    @classmethod
    def _probabilities(cls, v: Triple) -> Triple:
        if not all(0 <= p <= 1 for p in v):
            raise ValueError(f"each probability must lie in 0 .. 1, got {tuple(v)}")
        return v


class OptimSettings(Strict):
    """SGD with poly decay (method/METHOD.md Sec. 5)."""

    lr: float = Field(2.5e-3, gt=0, description="initial learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    poly_power: float = Field(0.9, ge=0, description="lr = lr0 * (1 - t/T) ** power")


class TrainSettings(Strict):
    """The loop around one CRLN iteration (``crlnseg train``)."""

    iterations: int = Field(40000, ge=1, description="training iterations")
    plan: bool = Field(True, description="fill prepare.target_spacing, prepare.normalize (and the CT window and statistics), model.strides, model.kernels and train.patch from the dataset fingerprint where no preset, file, option or --set gives them (crlnseg plan)")
    patch: IntTriple = Field((112, 112, 80), description="crop size X Y Z (multiples of the model's total stride, 16 by default)")
    batch_labelled: int = Field(2, ge=1, description="labelled crops per iteration (per process)")
    batch_unlabelled: int = Field(2, ge=0, description="unlabelled crops per iteration (per process)")
    foreground_oversample: float = Field(0.33, ge=0, le=1, description="share of labelled crops centred on foreground")
    seed: int = Field(1337, ge=0, le=2**63 - 1, description="random seed (0 .. 2**63 - 1)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on the CPU)")
    channels_last: bool | None = Field(None, description="channels-last 3D memory format; None: on (faster on the CPU and on CUDA, benchmarks/RESULTS.md)")
    activation_checkpointing: bool = Field(False, description="memory-saving mode: recompute the student's full-resolution activations in the backward pass (same results); on the CPU freed tensors also go back to the OS (crlnseg.train.allocator). 112x112x80 on a 2-core CPU: ~0.65x the peak memory, 1.1-1.2x the time")
    num_workers: int = Field(2, ge=0, description="data loader worker processes")
    log_every: int = Field(20, ge=1, description="iterations between metrics.jsonl lines")
    checkpoint_every: int = Field(1000, ge=1, description="iterations between periodic checkpoints")
    val_every: int = Field(1000, ge=1, description="iterations between validations (with --val)")
    val_stride: IntTriple | None = Field(None, description="sliding-window stride for validation, uniform blending as the literature's (LA: 18 18 4); None: predict's default, Gaussian at overlap 0.5")

    @model_validator(mode="after")
    def _val_stride_within_patch(self) -> TrainSettings:
        try:
            check_stride(self.val_stride, self.patch)
        except ValueError as err:
            raise ValueError(f"val_stride: {err}") from None
        return self


class RunSettings(Strict):
    """Everything a training run needs; saved with the run and inside every checkpoint."""

    prepare: PrepareSettings = Field(default_factory=PrepareSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    method: MethodSettings = Field(default_factory=MethodSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @model_validator(mode="after")
    def _patch_fits_the_model(self) -> RunSettings:
        try:
            check_patch(self.train.patch, self.model.total_stride, "train.patch")
        except ValueError as err:
            if (self.train.plan and "strides" not in self.model.model_fields_set
                    and all(p % 2 == 0 for p in self.train.patch)):
                # The plan's strides come later, from the data: a patch for them needs them.
                raise ValueError(f"{err} (a patch for anisotropic strides needs model.strides "
                                 "too; crlnseg plan shows the planned ones)") from None
            raise
        bottleneck = math.prod(p // s for p, s in zip(self.train.patch, self.model.total_stride,
                                                       strict=True))
        if self.model.norm == "instance" and bottleneck < 2:
            raise ValueError(f"model.norm=instance needs more than one bottleneck voxel: "
                             f"train.patch {tuple(self.train.patch)} / total stride "
                             f"{tuple(self.model.total_stride)} leaves one")
        return self


class PredictSettings(Strict):
    """Sliding-window inference (``crlnseg predict`` and ``crlnseg rectify``)."""

    mode: Literal["gaussian", "uniform"] = Field("gaussian", description="patch blending: Gaussian importance (sigma = sigma_scale * patch) or uniform average")
    sigma_scale: float | None = Field(None, gt=0, description="Gaussian sigma as a share of the patch side; None: the one the run chose on its validation set (checkpoint meta 'inference', with `tuned`), else 1/8 (nnU-Net's and MONAI's; on LA, 1/3 helped CRLN models by ~1 Dice point but cost mean-teacher and supervised models up to 20: benchmarks/RESULTS.md 'Blending across methods')")
    overlap: float = Field(0.5, ge=0, lt=1, description="overlap between neighbouring patches (share of the patch) when no stride is given")
    stride: IntTriple | None = Field(None, description="explicit patch stride X Y Z in voxels (literature LA protocol: 18 18 4); overrides overlap")
    patch: IntTriple | None = Field(None, description="patch size X Y Z; None uses the training patch of the run")
    batch_size: int = Field(2, ge=1, description="patches per forward pass")
    tta: bool = Field(False, description="test-time augmentation: mean softmax over the 8 flips of X, Y, Z")
    rectify: bool = Field(True, description="output softmax(f + (1 - mu) * M) of the EMA model; False: softmax(f)")
    keep_largest: bool | None = Field(None, description="keep the largest connected component of each class; None: as the run chose on its validation set (with `tuned`), else False")
    tuned: bool = Field(True, description="use the blending sigma and keep_largest the run chose on its validation set where not given explicitly (crlnseg.inference.choice); False: the built-in defaults")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on the CPU)")

    @field_validator("stride")
    @classmethod
    def _stride_positive(cls, stride: IntTriple | None) -> IntTriple | None:
        check_stride(stride, None)  # against the patch once the run's is known (Predictor)
        return stride


# Presets: nested overrides of RunSettings (method/METHOD.md Sec. 2-5 and 6).
PRESETS: dict[str, dict[str, Any]] = {
    "la8": {"model": {"prototypes_per_class": 16}, "method": {"xi": 0.6, "w_cps": 0.5},
            "train": {"patch": (112, 112, 80)}},
    "la16": {"model": {"prototypes_per_class": 16}, "method": {"xi": 0.9, "w_cps": 0.5},
             "train": {"patch": (112, 112, 80)}},
    "pancreas6": {"model": {"prototypes_per_class": 4}, "method": {"xi": 0.6, "w_cps": 1.0},
                  "train": {"patch": (96, 96, 96)}},
    "pancreas12": {"model": {"prototypes_per_class": 16}, "method": {"xi": 0.3, "w_cps": 0.5},
                   "train": {"patch": (96, 96, 96)}},
    "brats25": {"model": {"backbone": "unet", "prototypes_per_class": 4}, "method": {"xi": 0.1},
                "train": {"patch": (96, 96, 96)}},
    "brats50": {"model": {"backbone": "unet", "prototypes_per_class": 8}, "method": {"xi": 1.0},
                "train": {"patch": (96, 96, 96)}},
    # Small enough for a laptop CPU; see benchmarks/RESULTS.md for what it reaches on LA.
    "cpu": {"model": {"base_filters": 8, "prototypes_per_class": 8, "prototype_dim": 32},
            "train": {"patch": (64, 64, 32), "iterations": 1000, "num_workers": 1,
                      "checkpoint_every": 250, "val_every": 250, "log_every": 10},
            "method": {"warmup_fraction": 0.1}},
}


class EvaluateSettings(Strict):
    """Options of ``crlnseg evaluate``."""

    classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="labels to evaluate; None: every non-zero GT label (union over cases)")
    voxel_units: bool = Field(False, description="distances in voxels (spacing 1) instead of mm")
    bootstrap: int = Field(
        0, ge=0, description="bootstrap resamples for the 95% interval of each mean; 0: none")
    seed: int = Field(0, description="seed of the bootstrap")
    workers: int = Field(1, ge=1, description="processes computing cases in parallel")
    threads: int | None = Field(
        None, ge=1, description="threads of each process's surface-distance queries; None: the "
        "CPU cores divided among the processes")
    allow_missing: bool = Field(
        False, description="score cases present on one side only as failures instead of stopping")
