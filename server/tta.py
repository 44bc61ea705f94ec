"""Per-request test-time adaptation: gate on the original view, render views, share encoder batches, adapt."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from adaptclip.adapt.methods import (MethodResult, TextSide, adapt_views, normalized_entropy, skips_views,
                                     stops_after, view_chunks)
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.views import ViewGenerator
from adaptclip.server.cache import SCHEMA
from adaptclip.server.errors import invalid
from adaptclip.server.models import HostedModel
from adaptclip.v1 import classifier_pb2 as pb

METHOD_NAMES = {pb.Adaptation.NONE: "none",
                pb.Adaptation.GS_BIAS: "gs_bias", pb.Adaptation.ZERO: "zero", pb.Adaptation.TPT: "tpt"}
METHOD_ENUMS = {"none": pb.Adaptation.NONE, "gs_bias": pb.Adaptation.GS_BIAS, "zero": pb.Adaptation.ZERO,
                "tpt": pb.Adaptation.TPT}
_OPTIONAL = ("views", "selection_ratio", "steps", "alpha", "beta", "spatial_top_k", "seed", "augmix",
             "skip_entropy", "view_chunk")
MAX_VIEW_SIDE = 4  # huge photos are shrunk to 4x the input size (short side) before cropping views


def settings_from_request(msg: pb.Adaptation, defaults: AdaptSettings) -> AdaptSettings:
    """Request fields over the model's defaults; INVALID_ARGUMENT naming the first bad field."""
    if msg.method != pb.Adaptation.METHOD_UNSPECIFIED and msg.method not in METHOD_NAMES:
        raise invalid("adaptation.method", f"unknown method {msg.method}")
    method = METHOD_NAMES.get(msg.method, defaults.method)
    changes = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    lo, hi = defaults.crop_scale
    if msg.HasField("crop_scale_min"):
        lo = msg.crop_scale_min
    if msg.HasField("crop_scale_max"):
        hi = msg.crop_scale_max
    try:
        return defaults.replace(method=method, crop_scale=(lo, hi), **changes).validate()
    except ValueError as exc:
        field, _, why = str(exc).partition(": ")
        raise invalid(field, why) from None


def settings_to_proto(s: AdaptSettings) -> pb.Adaptation:
    return pb.Adaptation(method=METHOD_ENUMS[s.method], views=s.views, selection_ratio=s.ratio, steps=s.steps,
                         alpha=s.alpha, beta=s.beta, spatial_top_k=s.spatial_top_k, seed=s.seed,
                         crop_scale_min=s.crop_scale[0], crop_scale_max=s.crop_scale[1], augmix=s.augmix,
                         skip_entropy=s.skip_entropy, view_chunk=s.view_chunk)


@lru_cache(maxsize=64)
def _generator(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_scale: tuple[float, float],
               augmix: bool) -> ViewGenerator:
    return ViewGenerator(image_size, mean, std, crop_scale=crop_scale, augmix=augmix)


def render_views(hosted: HostedModel, img: Image.Image, view0: torch.Tensor, s: AdaptSettings) -> torch.Tensor:
    """[V, 3, S, S]: view 0 is the model's own preprocessing, the rest augmented (seeded)."""
    size = hosted.image_size
    short = min(img.size)
    if short > MAX_VIEW_SIDE * size:
        factor = MAX_VIEW_SIDE * size / short
        img = img.resize((round(img.width * factor), round(img.height * factor)), Image.BICUBIC)
    gen = _generator(size, hosted.mean, hosted.std, s.crop_scale, s.augmix)
    # Rendered on the model's device (the generator follows view 0's device), handed to the batcher on CPU.
    views = gen([TF.to_tensor(img)], view0.unsqueeze(0).to(hosted.device), s.views, seed=s.seed)[0]
    return views.cpu()


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def feature_key(fingerprint: str, image_hash: str, s: AdaptSettings, tokens: str = "k1") -> str:
    """Key of an image's view features: model weights, image bytes, everything that shapes the views,
    and the token compression the encoder ran with (`tokens`, see token_tag)."""
    views = "v1" if s.method == "none" else _digest(
        {"views": s.views, "seed": s.seed, "crop": list(s.crop_scale), "augmix": s.augmix})
    return f"adaptclip:{SCHEMA}:features:{fingerprint}:{image_hash}:{views}:{tokens}"


def token_tag(hosted: HostedModel, keep_rate: float) -> str:
    """Cache-key part for token compression: its whole configuration when on."""
    if keep_rate >= 1.0:
        return "k1"
    c = hosted.compressor
    return "k" + _digest({"schedule": c.schedule(keep_rate), "at": c.reduce_at, "fuse": c.fuse,
                          "score": c.score_layers})


def result_key(feat_key: str, label_set_id: str, s: AdaptSettings) -> str:
    """Key of a final answer: the features' key plus the label set and the adaptation's own settings."""
    settings = {"method": s.method} if s.method == "none" else {
        "method": s.method, "ratio": s.ratio, "steps": s.steps, "alpha": s.alpha, "beta": s.beta,
        "top_k": s.spatial_top_k, "skip": s.skip_entropy, "chunk": s.view_chunk, "lr": s.tpt_lr}
    return feat_key.replace(":features:", ":result:", 1) + f":{label_set_id}:{_digest(settings)}"


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Augmented-view and patch features are cached as fp16; a miss rounds them the same way, so a
    hit answers exactly as the miss did. View 0 stays fp32 (zero-shot parity with open_clip)."""
    return x.half().float()


class ImageViews:
    """One image's view features: from the cache when there, decoding and encoding only what is missing."""

    def __init__(self, hosted: HostedModel, s: AdaptSettings, decode: Callable[[], Awaitable[tuple[Image.Image, torch.Tensor]]],
                 timeout_s: float | None, pool: concurrent.futures.Executor,
                 cached: tuple[dict[str, np.ndarray], dict] | None = None, keep_rate: float = 1.0) -> None:
        self.hosted, self.s, self._decode, self.timeout_s, self.pool = hosted, s, decode, timeout_s, pool
        self.keep_rate = keep_rate
        self.feats: torch.Tensor | None = None  # [n, D], view 0 first
        self.patches: torch.Tensor | None = None  # [P, D] of view 0
        self.from_cache = cached is not None
        if cached is not None:
            arrays, _ = cached
            self.feats = torch.cat([torch.from_numpy(arrays["view0"].copy()),
                                    torch.from_numpy(arrays["views"].astype(np.float32))])
            if "patches" in arrays:
                self.patches = torch.from_numpy(arrays["patches"].astype(np.float32))
        self._img: Image.Image | None = None
        self._view0: torch.Tensor | None = None
        self._rendered: torch.Tensor | None = None
        self.dirty = False
        self.decode_us = self.queue_us = self.encode_us = 0

    async def _decoded(self) -> tuple[Image.Image, torch.Tensor]:
        if self._img is None:
            start = time.perf_counter()
            self._img, self._view0 = await self._decode()
            self.decode_us = int((time.perf_counter() - start) * 1e6)
        return self._img, self._view0

    async def original(self, with_patches: bool) -> torch.Tensor:
        """Features [D] of view 0, encoding it (with patch features when asked and available) if needed."""
        want = with_patches and self.hosted.has_patches
        if self.feats is None or (want and self.patches is None):
            _, view0 = await self._decoded()
            r = await self.hosted.batcher.submit(view0.unsqueeze(0), self.timeout_s, with_patches=want,
                                                 keep_rate=self.keep_rate)
            self.queue_us += r.queue_us
            self.encode_us += r.encode_us
            if self.feats is None:
                self.feats = r.features
            if r.patches is not None:
                self.patches = _fp16(r.patches[0])
            self.dirty = True
        return self.feats[0]

    async def first(self, n: int) -> torch.Tensor:
        """Features [n, D] of views 0..n-1, rendering the views and encoding the missing ones."""
        have = self.feats.shape[0]
        if have < n:
            if self._rendered is None:
                img, view0 = await self._decoded()
                loop = asyncio.get_running_loop()
                self._rendered = await loop.run_in_executor(self.pool, render_views, self.hosted, img, view0, self.s)
            part = self._rendered[have:n]
            step = self.hosted.batcher.max_batch
            results = await asyncio.gather(*(self.hosted.batcher.submit(part[i:i + step], self.timeout_s,
                                                                        keep_rate=self.keep_rate)
                                             for i in range(0, part.shape[0], step)))
            self.queue_us += max(r.queue_us for r in results)
            self.encode_us += sum(r.encode_us for r in results)
            self.feats = torch.cat([self.feats, *(_fp16(r.features) for r in results)])
            self.dirty = True
        return self.feats[:n]

    def entry(self) -> dict[str, np.ndarray]:
        arrays = {"view0": self.feats[:1].numpy(), "views": self.feats[1:].half().numpy()}
        if self.patches is not None:
            arrays["patches"] = self.patches.half().numpy()
        return arrays


@dataclass
class Adapted:
    zero_shot: torch.Tensor  # [C] logits of the original view
    result: MethodResult | None  # None when no method ran (NONE, or skipped by the gate)
    report: pb.AdaptationReport
    adapt_us: int


async def classify_with_adaptation(hosted: HostedModel, views: ImageViews, classifier: torch.Tensor,
                                   labels: tuple[str, ...], s: AdaptSettings,
                                   pool: concurrent.futures.Executor) -> Adapted:
    """Zero-shot from view 0 (with patches for GS-Bias); unless confident, take the views and adapt."""
    gs = s.method == "gs_bias"
    feat0 = await views.original(with_patches=gs)
    zero_shot = hosted.logits(F.normalize(feat0.unsqueeze(0), dim=-1), classifier)[0]
    entropy = normalized_entropy(zero_shot)
    report = pb.AdaptationReport(method=METHOD_ENUMS[s.method], views_encoded=1, normalized_entropy=entropy)
    out = Adapted(zero_shot, None, report, 0)
    if s.method == "none":
        return out
    if skips_views(s, entropy):
        report.skipped = True
        report.note = f"original view confident (normalised entropy {entropy:.3f} < {s.skip_entropy:g}): no views"
        return out
    start = time.perf_counter()
    n = 1
    for _, n in view_chunks(s):
        feats = await views.first(n)
        if s.view_chunk and stops_after(s, n, hosted.logit_scale * F.normalize(feats, dim=-1) @ classifier.T):
            report.note = f"selected views agreed after {n} views"
            break
    view_feats = views.feats[:n]
    loop = asyncio.get_running_loop()
    if s.method == "tpt":
        text = TextSide(hosted.model, hosted.tokenizer, labels)
        result = await asyncio.wrap_future(hosted.run_text(adapt_views, s, view_feats, None, classifier,
                                                           hosted.logit_scale, text))
    else:
        patches = views.patches if gs else None
        result = await loop.run_in_executor(pool, adapt_views, s, view_feats, patches, classifier, hosted.logit_scale)
    if gs and result.global_only:
        report.note = (report.note + "; " if report.note else "") + "no patch tokens in this tower: global bias only"
    if hosted.logit_bias is not None and s.method != "zero":
        result = dataclasses.replace(result, logits=result.logits + hosted.logit_bias)
    report.views_encoded = n
    report.steps_run = result.steps_run
    report.global_only = result.global_only
    out.result = result
    out.adapt_us = int((time.perf_counter() - start) * 1e6)
    return out
