"""Test-time adaptation settings: the official GS-Bias ImageNet values as defaults, per-model overridable."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

METHODS = ("none", "gs_bias", "zero", "tpt")
# Each method's own default selection ratio (GS-Bias and TPT: 10 % of 64 views; ZERO: 30 %).
METHOD_RATIO = {"none": 0.1, "gs_bias": 0.1, "zero": 0.3, "tpt": 0.1}
# Each method's official view pipeline: GS-Bias's AugMixAugmenter on ImageNet; ZERO's crop + flip;
# TPT's AugMix only for fine-grained sets, so off unless asked for.
METHOD_AUGMIX = {"none": False, "gs_bias": True, "zero": False, "tpt": False}
MAX_VIEWS = 1024
MAX_STEPS = 100


class FieldError(ValueError):
    """A value a caller set is invalid: which field (dotted path, e.g. `adaptation.views`) and why.

    Compute code raises it; the service turns it into INVALID_ARGUMENT with the field first.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def validate_keep_rate(value: object, field: str = "keep_rate") -> float:
    """Token compression's keep rate per reduction stage as a float in (0, 1]; FieldError otherwise (NaN too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(field, f"must be a finite number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise FieldError(field, f"must be in (0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class AdaptSettings:
    method: str = "none"
    views: int = 64
    selection_ratio: float | None = None  # None = the method's own default (METHOD_RATIO)
    steps: int = 1
    alpha: float = 10.0
    beta: float = 1.0
    spatial_top_k: int = 16
    seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    augmix: bool | None = None  # None = the method's own (METHOD_AUGMIX)
    skip_entropy: float = 0.0  # answer zero-shot when the original view's normalised entropy is below
    view_chunk: int = 0  # encode views in chunks, stop once the selected views agree; 0 = one batch
    tpt_lr: float = 5e-3
    # The safety gate (adapt/gate.py): answer zero-shot when the views look out of distribution.
    gate_entropy_rise: float = 1.0  # fall back when the views' entropy exceeds view 0's by more; 1 = off
    gate_agreement: float = 0.0  # fall back when fewer views agree with view 0's top-1; 0 = off
    gate_top_k: int = 0  # keep the adapted top-1 only within the zero-shot top-k; 0 = off
    gate_similarity: float = 1.0  # fall back when the views' mean cosine to view 0 exceeds this; 1 = off

    @property
    def ratio(self) -> float:
        return METHOD_RATIO[self.method] if self.selection_ratio is None else self.selection_ratio

    @property
    def use_augmix(self) -> bool:
        """AugMix on the views: as set, else the method's official choice."""
        return METHOD_AUGMIX[self.method] if self.augmix is None else self.augmix

    def replace(self, **changes: Any) -> AdaptSettings:
        return dataclasses.replace(self, **changes)

    def validate(self, prefix: str = "adaptation") -> AdaptSettings:
        """Raise FieldError('<prefix>.<field>', why) for the first bad field; return self."""
        def bad(name: str, why: str) -> FieldError:
            return FieldError(f"{prefix}.{name}", why)

        def finite(name: str, value: float) -> float:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value!r}")
            return float(value)

        if self.method not in METHODS:
            raise bad("method", f"unknown method {self.method!r}; one of {', '.join(METHODS)}")
        if not 1 <= self.views <= MAX_VIEWS:
            raise bad("views", f"must be in 1..{MAX_VIEWS}, got {self.views}")
        if self.selection_ratio is not None and not 0.0 < finite("selection_ratio", self.selection_ratio) <= 1.0:
            raise bad("selection_ratio", f"must be in (0, 1], got {self.selection_ratio}")
        if not 0 <= self.steps <= MAX_STEPS:
            raise bad("steps", f"must be in 0..{MAX_STEPS}, got {self.steps}")
        if finite("alpha", self.alpha) < 0:
            raise bad("alpha", f"must be >= 0, got {self.alpha}")
        if finite("beta", self.beta) < 0:
            raise bad("beta", f"must be >= 0, got {self.beta}")
        if self.spatial_top_k < 1:
            raise bad("spatial_top_k", f"must be >= 1, got {self.spatial_top_k}")
        lo, hi = (finite("crop_scale_min", self.crop_scale[0]), finite("crop_scale_max", self.crop_scale[1]))
        if not 0.0 < lo <= 1.0:
            raise bad("crop_scale_min", f"must be in (0, 1], got {lo}")
        if not lo <= hi <= 1.0:
            raise bad("crop_scale_max", f"must be in [crop_scale_min, 1], got {hi}")
        if not 0.0 <= finite("skip_entropy", self.skip_entropy) <= 1.0:
            raise bad("skip_entropy", f"must be in [0, 1], got {self.skip_entropy}")
        if not 0 <= self.view_chunk <= MAX_VIEWS:
            raise bad("view_chunk", f"must be in 0..{MAX_VIEWS}, got {self.view_chunk}")
        if finite("tpt_lr", self.tpt_lr) <= 0:
            raise bad("tpt_lr", f"must be > 0, got {self.tpt_lr}")
        if not 0.0 <= finite("gate_entropy_rise", self.gate_entropy_rise) <= 1.0:
            raise bad("gate_entropy_rise", f"must be in [0, 1], got {self.gate_entropy_rise}")
        if not 0.0 <= finite("gate_agreement", self.gate_agreement) <= 1.0:
            raise bad("gate_agreement", f"must be in [0, 1], got {self.gate_agreement}")
        if not 0.0 <= finite("gate_similarity", self.gate_similarity) <= 1.0:
            raise bad("gate_similarity", f"must be in [0, 1], got {self.gate_similarity}")
        if isinstance(self.gate_top_k, bool) or not isinstance(self.gate_top_k, int) or self.gate_top_k < 0:
            raise bad("gate_top_k", f"must be an int >= 0, got {self.gate_top_k!r}")
        return self


SMALL_INPUT = 128  # px: below it AugMix's ops (posterize, shear, solarize...) erase what little there is


def untuned_defaults(image_size: int) -> AdaptSettings:
    """What a model without a tuned `adaptation:` block adapts with (`adaptclip tune` writes one).

    The official views are ImageNet's at 224 px: crops down to 8 % of the area and AugMix. A crop of a
    small input keeps far fewer pixels, so the smallest crop scales with the input (8 % x 224 / side,
    at most 90 %: 56 % at 32 px), and small inputs get no AugMix. The safety gate is on: an image whose
    views are clearly less certain than the original (mean normalised entropy up by more than 0.1)
    answers zero-shot, which is what protects a tower that never saw crops.
    """
    side = max(1, int(image_size))
    low = round(min(0.9, max(0.08, 0.08 * 224 / side)), 2)
    return AdaptSettings(crop_scale=(low, 1.0), augmix=False if side < SMALL_INPUT else None,
                         gate_entropy_rise=0.1)


def settings_from_dict(data: dict[str, Any], base: AdaptSettings | None = None) -> AdaptSettings:
    """Per-model overrides from the server config (`adaptation:` in a model entry)."""
    base = base or AdaptSettings()
    names = {f.name for f in dataclasses.fields(AdaptSettings)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FieldError("adaptation", f"unknown setting(s): {', '.join(unknown)}")
    if "crop_scale" in data:
        data = dict(data, crop_scale=tuple(float(x) for x in data["crop_scale"]))
    return base.replace(**data).validate("adaptation")
