"""In-process accuracy evaluation of zero-shot and test-time adaptation under distribution shifts.

No gRPC, but the served decisions, so what is measured is what is served: images are decoded as the
server does (PIL, RGB), corrupted by `adapt.shifts` (then stored as 8-bit, like a corrupted file),
view 0 is the model's own preprocessing, the other views come from `adapt.views.render_views`
(seeded per image: `seed + index`), everything is encoded at the model's own token keep rate, and
every (method, gate threshold, chunk size) runs through `adapt.loop.adapt_image`, the loop the
server runs, on features of the same precision. The difference is only in how the encoder is
driven: all views of `batch_images` images go through it in one call, up front (larger batches than
the server's, so the encoder time per view is a batched-throughput figure), and the loop then reads
the prefix it asks for; a method's run is shared by every combination that hands it the same views.

Cost per image = views encoded x the run's mean encoder time per view (batched) + view rendering
(whenever views are needed) + the method's own wall time. Output records are shaped like
clip_benchmark's (`dataset`, `model`, `pretrained`, `task`, `metrics`: acc1 / acc5 /
mean_per_class_recall) plus `method`, `shift`, `adaptation` and `cost`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adaptclip.adapt.data import Dataset, decode_shifted
from adaptclip.adapt.encoder import EncoderModel
from adaptclip.adapt.loop import adapt_image
from adaptclip.adapt.methods import MethodResult, adapt_views
from adaptclip.adapt.metrics import classification_metrics, ranked_classes
from adaptclip.adapt.settings import METHODS, AdaptSettings
from adaptclip.adapt.shifts import SHIFT_NAMES, Shift, get_shift
from adaptclip.adapt.views import render_views


@dataclass(frozen=True)
class EvalPlan:
    """What to score: methods x shifts x gate thresholds x chunk sizes, over one view setting."""

    methods: tuple[str, ...] = METHODS
    shifts: tuple[Shift, ...] = tuple(get_shift(name) for name in SHIFT_NAMES)
    skip_entropies: tuple[float, ...] = (0.0,)
    view_chunks: tuple[int, ...] = (0,)
    batch_images: int = 16  # images whose views share one encoder batch

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {self.methods}")
        if not self.shifts:
            raise ValueError("at least one shift")
        if not all(0.0 <= t <= 1.0 for t in self.skip_entropies) or not self.skip_entropies:
            raise ValueError(f"skip_entropies must be in [0, 1], got {self.skip_entropies}")
        if not all(c >= 0 for c in self.view_chunks) or not self.view_chunks:
            raise ValueError(f"view_chunks must be >= 0, got {self.view_chunks}")
        if self.batch_images < 1:
            raise ValueError(f"batch_images must be >= 1, got {self.batch_images}")

    def settings(self, base: AdaptSettings) -> list[AdaptSettings]:
        """Every combination scored: NONE once, then each adapting method x chunk size x gate threshold."""
        out = [base.replace(method="none", skip_entropy=0.0, view_chunk=0)] if "none" in self.methods else []
        return out + [base.replace(method=m, view_chunk=c, skip_entropy=t) for m in self.methods if m != "none"
                      for c in self.view_chunks for t in self.skip_entropies]


@dataclass
class Scored:
    """One image under one setting: ranked classes, views encoded, whether the confidence gate skipped the
    views or the safety gate fell back to zero-shot, method time."""

    top: list[int]
    views: int
    skipped: bool
    method_ms: float
    fell_back: bool = False


@dataclass
class ImageRun:
    label: int
    zero_shot: list[int]
    render_ms: float = 0.0
    scored: dict[AdaptSettings, Scored] = field(default_factory=dict)


class Precomputed:
    """A ViewSource over one image's features encoded up front."""

    def __init__(self, feats: Tensor, patches: Tensor | None) -> None:
        self.feats, self.patches = feats, patches

    async def original(self, with_patches: bool) -> tuple[Tensor, Tensor | None]:
        return self.feats[0], self.patches if with_patches else None

    async def first(self, n: int) -> Tensor:
        return self.feats[:n]


class Run:
    """One evaluation: the model, classifier and plan; encodes a shift's images and scores each setting."""

    def __init__(self, model: EncoderModel, data: Dataset, classifier: Tensor, base: AdaptSettings,
                 plan: EvalPlan, progress: Callable[[str], None] | None = None) -> None:
        self.model, self.data, self.classifier, self.base, self.plan = model, data, classifier, base, plan
        self.progress = progress or (lambda msg: None)
        self.settings = plan.settings(base)
        self.need_views = any(s.method != "none" for s in self.settings) and base.views > 1
        self.text = model.text.prompt_side(data.classes) if "tpt" in plan.methods and model.text else None
        if "tpt" in plan.methods and self.text is None:
            raise ValueError(f"TPT needs a text tower; model '{model.name}' has none")
        self.encode_s, self.encoded = 0.0, 0

    @property
    def ms_per_view(self) -> float:
        return 1000.0 * self.encode_s / max(1, self.encoded)

    def _encode(self, images: Tensor, with_patches: bool) -> tuple[Tensor, Tensor | None]:
        start = time.perf_counter()
        feats, patches = self.model.encode_images(images, with_patches, self.model.keep_rate)
        self.encode_s += time.perf_counter() - start
        self.encoded += images.shape[0]
        return feats, patches

    def features(self, shift: Shift) -> Iterator[tuple[int, Precomputed, float]]:
        """(image index, its encoded views, view rendering ms) for every image under `shift`, encoded
        `batch_images` images at a time (tune reads these directly)."""
        n, step = len(self.data.paths), self.plan.batch_images
        for lo in range(0, n, step):
            index = range(lo, min(n, lo + step))
            pils = [decode_shifted(self.data.paths[i], shift, self.base.seed + i) for i in index]
            view0 = torch.stack([self.model.preprocess(p) for p in pils])
            feats0, patches = self._encode(view0, with_patches="gs_bias" in self.plan.methods)
            extra, render_ms = None, [0.0] * len(pils)
            if self.need_views:
                rendered = []
                for j, (i, pil) in enumerate(zip(index, pils)):
                    start = time.perf_counter()
                    rendered.append(render_views(self.model, pil, view0[j], self.base.replace(seed=self.base.seed + i))[1:])
                    render_ms[j] = 1000.0 * (time.perf_counter() - start)
                extra, _ = self._encode(torch.cat(rendered), with_patches=False)
            per = self.base.views - 1
            for j, i in enumerate(index):
                feats = feats0[j:j + 1] if extra is None else torch.cat([feats0[j:j + 1], extra[j * per:(j + 1) * per]])
                yield i, Precomputed(feats, None if patches is None else patches[j]), render_ms[j]

    def shift(self, shift: Shift) -> list[ImageRun]:
        runs: list[ImageRun] = []
        n, started = len(self.data.paths), time.perf_counter()
        for i, source, render_ms in self.features(shift):
            runs.append(asyncio.run(self._image(i, source, render_ms)))
            if len(runs) % self.plan.batch_images == 0 or len(runs) == n:
                self.progress(f"{shift.name}: {len(runs)}/{n} images, {time.perf_counter() - started:.0f} s")
        return runs

    async def _image(self, index: int, source: Precomputed, render_ms: float) -> ImageRun:
        """Every setting of the plan on one image, through the served loop; a method's run is shared by
        the settings that give it the same views."""
        memo: dict[tuple[str, int], tuple[MethodResult, float]] = {}

        async def run_method(s: AdaptSettings, feats: Tensor, patches: Tensor | None) -> MethodResult:
            key = (s.method, feats.shape[0])
            if key not in memo:
                start = time.perf_counter()
                res = adapt_views(s, feats, patches, self.classifier, self.model.logit_scale, self.text,
                                  self.model.kernels.gs_bias, self.model.device)
                memo[key] = (res, 1000.0 * (time.perf_counter() - start))
            return memo[key][0]

        run: ImageRun | None = None
        for s in self.settings:
            out = await adapt_image(source, s, self.classifier, self.model.logit_scale, self.model.logit_bias,
                                    run_method)
            if run is None:
                run = ImageRun(self.data.labels[index], ranked_classes(out.zero_shot), render_ms)
            if out.result is None:
                ran = memo.get((s.method, out.report.views_encoded))
                run.scored[s] = Scored(run.zero_shot, out.report.views_encoded, out.report.skipped,
                                       ran[1] if ran and out.report.fell_back else 0.0, out.report.fell_back)
                continue
            res = out.result
            top = ranked_classes(res.probs, tie_break=res.logits) if s.method == "zero" else ranked_classes(res.logits)
            run.scored[s] = Scored(top, out.report.views_encoded, False, memo[(s.method, out.report.views_encoded)][1])
        return run


def _record(run: Run, shift: Shift, s: AdaptSettings, images: list[ImageRun], meta: dict[str, Any]) -> dict[str, Any]:
    """One clip_benchmark-shaped result: metrics, settings and mean per-image cost."""
    scored = [img.scored[s] for img in images]
    adapted = [(img, sc) for img, sc in zip(images, scored) if s.method != "none" and not sc.skipped]
    n = len(images)
    per_view = run.ms_per_view
    cost = {"views_encoded": sum(sc.views for sc in scored) / n,
            "skipped_fraction": sum(sc.skipped for sc in scored) / n,
            "fell_back_fraction": sum(sc.fell_back for sc in scored) / n, "encoder_ms_per_view": per_view,
            "render_ms": sum(img.render_ms for img, _ in adapted) / n,
            "method_ms": sum(sc.method_ms for _, sc in adapted) / n}
    cost["per_image_ms"] = per_view * cost["views_encoded"] + cost["render_ms"] + cost["method_ms"]
    metrics = classification_metrics([sc.top for sc in scored], [img.label for img in images], len(run.data.classes))
    adaptation = dataclasses.asdict(s)
    adaptation["selection_ratio"] = s.ratio
    return {**meta, "metrics": metrics, "method": s.method, "shift": shift.name,
            "shift_parameter": shift.parameter, "adaptation": adaptation, "cost": cost, "images": n}


def evaluate(model: EncoderModel, data: Dataset, classifier: Tensor, base: AdaptSettings, plan: EvalPlan, *,
             model_name: str, pretrained: str, extra: dict[str, Any] | None = None,
             progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Score every (shift, method, gate threshold, chunk size) of `plan` on `data`.

    classifier: [C, D] normalised text classifier for `data.classes`. base: the view and method
    settings (its method, skip_entropy and view_chunk are replaced by the plan's). extra: fields
    copied into every record (e.g. the subsample size). Returns one record per combination;
    NONE gets one per shift.
    """
    base = base.validate()
    run = Run(model, data, classifier, base, plan, progress)
    meta = {"dataset": data.name, "model": model_name, "pretrained": pretrained, "task": "zeroshot_classification",
            "language": "en", **(extra or {})}
    per_shift = [(shift, run.shift(shift)) for shift in plan.shifts]
    return [_record(run, shift, s, images, meta) for shift, images in per_shift for s in run.settings]
