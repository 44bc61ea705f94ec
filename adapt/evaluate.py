"""In-process accuracy evaluation of zero-shot and test-time adaptation under distribution shifts.

No gRPC, but the served code path piece by piece, so what is measured is what is served: images
are decoded as the server does (PIL, RGB), corrupted by `adapt.shifts` (then stored as 8-bit, like a
corrupted file), view 0 is the model's own preprocessing, the other views come from the server's
`render_views` (seeded per image: `seed + index`), and every method runs through
`adapt.methods.adapt_views` with the server's gate (`skips_views`) and chunked early stop
(`view_chunks` / `stops_after`). The views of an image are encoded once, all views of
`batch_images` images in one encoder call (larger than the server's batches, so the encoder time
per view is a batched-throughput figure) and kept in fp32 (the server rounds augmented-view
features to fp16 for its cache); all methods, gate thresholds and chunk sizes are then scored on the
same features: a chunked run uses the prefix of the views the server would have encoded before
stopping, and chunk sizes that stop at the same view count share one adaptation run.

Cost per image = views encoded x the run's mean encoder time per view (batched) + view rendering
(whenever views are needed) + the method's own wall time. Output records are shaped like
clip_benchmark's (`dataset`, `model`, `pretrained`, `task`, `metrics`: acc1 / acc5 /
mean_per_class_recall) plus `method`, `shift`, `adaptation` and `cost`.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from adaptclip.adapt.methods import TextSide, adapt_views, normalized_entropy, skips_views, stops_after, view_chunks
from adaptclip.adapt.metrics import classification_metrics, ranked_classes
from adaptclip.adapt.settings import METHODS, AdaptSettings
from adaptclip.adapt.shifts import SHIFT_NAMES, Shift, get_shift
from adaptclip.server.decode import IMAGE_SUFFIXES
from adaptclip.server.models import HostedModel
from adaptclip.server.tta import render_views


@dataclass(frozen=True)
class Dataset:
    """Images of a folder with one subfolder per class; labels index `classes`."""

    name: str
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...]


def load_folder(root: str | Path, classes: Sequence[str] | None = None, limit_per_class: int | None = None,
                seed: int = 0) -> Dataset:
    """Class subfolders of `root` (sorted names, or `classes` in that label order). With
    `limit_per_class`, a seeded random subset of each class, the same for every method and shift."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    names = tuple(classes) if classes else tuple(folders)
    if not names:
        raise ValueError(f"no class subfolders under {root}")
    missing = [c for c in names if c not in folders]
    if missing:
        raise ValueError(f"class folder(s) missing under {root}: {', '.join(missing[:5])}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if limit_per_class is not None and len(files) > limit_per_class:
            files = sorted(random.Random(f"{seed}:{name}").sample(files, limit_per_class))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"no images under {root}")
    return Dataset(root.name, names, tuple(paths), tuple(labels))


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


@dataclass
class _Outcome:
    top: list[int]
    views: int
    method_ms: float


@dataclass
class _ImageRun:
    label: int
    entropy: float
    zero_shot: list[int]
    render_ms: float = 0.0
    outcomes: dict[tuple[str, int], _Outcome] = field(default_factory=dict)


@dataclass
class _Timing:
    encode_s: float = 0.0
    views: int = 0

    @property
    def ms_per_view(self) -> float:
        return 1000.0 * self.encode_s / max(1, self.views)


def views_used(settings: AdaptSettings, view_logits: torch.Tensor) -> int:
    """How many views the server encodes before its chunked early stop, given all V views' logits."""
    for _, hi in view_chunks(settings):
        if stops_after(settings, hi, view_logits[:hi]):
            return hi
    return settings.views


def decode_shifted(path: Path, shift: Shift, seed: int) -> Image.Image:
    """Decode as the server does, corrupt, and store as 8-bit RGB (as a corrupted file would be)."""
    img = Image.open(path).convert("RGB")
    if shift.name == "clean":
        return img
    out = shift(TF.to_tensor(img), seed)
    return Image.fromarray((out * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


class _Run:
    """One evaluation: the model, classifier and plan, and the per-image outcomes per shift."""

    def __init__(self, hosted: HostedModel, data: Dataset, classifier: torch.Tensor, base: AdaptSettings,
                 plan: EvalPlan, progress: Callable[[str], None] | None) -> None:
        self.hosted, self.data, self.classifier, self.base, self.plan = hosted, data, classifier, base, plan
        self.progress = progress or (lambda msg: None)
        self.adapting = [m for m in plan.methods if m != "none"]
        self.need_views = bool(self.adapting) and base.views > 1
        self.text = TextSide(hosted.model, hosted.tokenizer, data.classes) if "tpt" in plan.methods else None
        self.timing = _Timing()

    def _encode(self, images: torch.Tensor, with_patches: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        start = time.perf_counter()
        feats, patches = self.hosted.encode_images(images, with_patches=with_patches)
        self.timing.encode_s += time.perf_counter() - start
        self.timing.views += images.shape[0]
        return feats, patches

    def shift(self, shift: Shift) -> list[_ImageRun]:
        runs: list[_ImageRun] = []
        n, step, started = len(self.data.paths), self.plan.batch_images, time.perf_counter()
        for lo in range(0, n, step):
            index = range(lo, min(n, lo + step))
            pils = [decode_shifted(self.data.paths[i], shift, self.base.seed + i) for i in index]
            view0 = torch.stack([self.hosted.preprocess(p) for p in pils])
            feats0, patches = self._encode(view0, with_patches="gs_bias" in self.plan.methods)
            extra, render_ms = None, [0.0] * len(pils)
            if self.need_views:
                rendered = []
                for j, (i, pil) in enumerate(zip(index, pils)):
                    start = time.perf_counter()
                    rendered.append(render_views(self.hosted, pil, view0[j], self.base.replace(seed=self.base.seed + i))[1:])
                    render_ms[j] = 1000.0 * (time.perf_counter() - start)
                extra, _ = self._encode(torch.cat(rendered), with_patches=False)
            per = self.base.views - 1
            for j, i in enumerate(index):
                feats = feats0[j:j + 1] if extra is None else torch.cat([feats0[j:j + 1], extra[j * per:(j + 1) * per]])
                runs.append(self._image(i, feats, None if patches is None else patches[j], render_ms[j]))
            self.progress(f"{shift.name}: {len(runs)}/{n} images, {time.perf_counter() - started:.0f} s")
        return runs

    def _image(self, index: int, feats: torch.Tensor, patches: torch.Tensor | None, render_ms: float) -> _ImageRun:
        """Zero-shot and every (method, chunk) outcome of one image from its encoded views."""
        scale = self.hosted.logit_scale
        view_logits = scale * F.normalize(feats, dim=-1) @ self.classifier.T
        run = _ImageRun(self.data.labels[index], normalized_entropy(view_logits[0]), ranked_classes(view_logits[0]),
                        render_ms)
        by_views: dict[tuple[str, int], _Outcome] = {}  # chunk sizes that stop at the same view count agree
        for method in self.adapting:
            for chunk in self.plan.view_chunks:
                s = self.base.replace(method=method, view_chunk=chunk)
                n = views_used(s, view_logits)
                if (method, n) not in by_views:
                    start = time.perf_counter()
                    res = adapt_views(s, feats[:n], patches, self.classifier, scale, self.text)
                    ms = 1000.0 * (time.perf_counter() - start)
                    top = ranked_classes(res.probs, tie_break=res.logits) if method == "zero" else \
                        ranked_classes(res.logits)
                    by_views[(method, n)] = _Outcome(top, n, ms)
                run.outcomes[(method, chunk)] = by_views[(method, n)]
        return run


def _record(run: _Run, shift: Shift, s: AdaptSettings, images: list[_ImageRun], meta: dict[str, Any]) -> dict[str, Any]:
    """One clip_benchmark-shaped result: metrics, settings and mean per-image cost."""
    tops, views, method_ms, render_ms, skipped = [], [], [], [], 0
    for img in images:
        if s.method == "none" or skips_views(s, img.entropy):
            tops.append(img.zero_shot)
            views.append(1)
            skipped += s.method != "none"
            continue
        out = img.outcomes[(s.method, s.view_chunk)]
        tops.append(out.top)
        views.append(out.views)
        method_ms.append(out.method_ms)
        render_ms.append(img.render_ms)
    n = len(images)
    per_view = run.timing.ms_per_view
    cost = {"views_encoded": sum(views) / n, "skipped_fraction": skipped / n, "encoder_ms_per_view": per_view,
            "render_ms": sum(render_ms) / n, "method_ms": sum(method_ms) / n}
    cost["per_image_ms"] = per_view * cost["views_encoded"] + cost["render_ms"] + cost["method_ms"]
    metrics = classification_metrics(tops, [img.label for img in images], len(run.data.classes))
    adaptation = dataclasses.asdict(s)
    adaptation["selection_ratio"] = s.ratio
    return {**meta, "metrics": metrics, "method": s.method, "shift": shift.name,
            "shift_parameter": shift.parameter, "adaptation": adaptation,
            "cost": cost, "images": n}


def evaluate(hosted: HostedModel, data: Dataset, classifier: torch.Tensor, base: AdaptSettings, plan: EvalPlan, *,
             model: str, pretrained: str, extra: dict[str, Any] | None = None,
             progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Score every (shift, method, gate threshold, chunk size) of `plan` on `data`.

    classifier: [C, D] normalised text classifier for `data.classes`. base: the view and method
    settings (its method, skip_entropy and view_chunk are replaced by the plan's). extra: fields
    copied into every record (e.g. the subsample size). Returns one record per combination;
    NONE gets one per shift.
    """
    base = base.validate()
    run = _Run(hosted, data, classifier, base, plan, progress)
    meta = {"dataset": data.name, "model": model, "pretrained": pretrained, "task": "zeroshot_classification",
            "language": "en", **(extra or {})}
    per_shift = [(shift, run.shift(shift)) for shift in plan.shifts]
    records = []
    for shift, images in per_shift:
        if "none" in plan.methods:
            records.append(_record(run, shift, base.replace(method="none", skip_entropy=0.0, view_chunk=0), images, meta))
        for method in run.adapting:
            for chunk in plan.view_chunks:
                for threshold in plan.skip_entropies:
                    s = base.replace(method=method, view_chunk=chunk, skip_entropy=threshold)
                    records.append(_record(run, shift, s, images, meta))
    return records
