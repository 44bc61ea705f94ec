"""Per-request test-time adaptation: gate on the original view, render views, share encoder batches, adapt."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from adaptclip.adapt.methods import MethodResult, TextSide, adapt_views, normalized_entropy, views_agree
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.views import ViewGenerator
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
    views = gen([TF.to_tensor(img)], view0.unsqueeze(0), s.views, seed=s.seed)[0]
    return views.cpu()


@dataclass
class Adapted:
    zero_shot: torch.Tensor  # [C] logits of the original view
    result: MethodResult | None  # None when no method ran (NONE, or skipped by the gate)
    report: pb.AdaptationReport
    queue_us: int
    encode_us: int
    adapt_us: int


async def classify_with_adaptation(hosted: HostedModel, img: Image.Image, view0: torch.Tensor,
                                   classifier: torch.Tensor, labels: tuple[str, ...], s: AdaptSettings,
                                   timeout_s: float | None, pool: concurrent.futures.Executor) -> Adapted:
    """Encode the original view (with patches for GS-Bias); unless confident, encode views and adapt."""
    gs = s.method == "gs_bias"
    first = await hosted.batcher.submit(view0.unsqueeze(0), timeout_s, with_patches=gs)
    zero_shot = hosted.logits(F.normalize(first.features, dim=-1), classifier)[0]
    entropy = normalized_entropy(zero_shot)
    report = pb.AdaptationReport(method=METHOD_ENUMS[s.method], views_encoded=1, normalized_entropy=entropy)
    out = Adapted(zero_shot, None, report, first.queue_us, first.encode_us, 0)
    if s.method == "none":
        return out
    if entropy < s.skip_entropy:
        report.skipped = True
        report.note = f"original view confident (normalised entropy {entropy:.3f} < {s.skip_entropy:g}): no views"
        return out
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    views = await loop.run_in_executor(pool, render_views, hosted, img, view0, s)
    feats = [first.features]
    chunk = s.view_chunk or max(1, s.views - 1)
    max_batch = hosted.batcher.max_batch
    for lo in range(1, s.views, chunk):
        part = views[lo:lo + chunk]
        results = await asyncio.gather(*(hosted.batcher.submit(part[i:i + max_batch], timeout_s)
                                         for i in range(0, part.shape[0], max_batch)))
        feats += [r.features for r in results]
        out.encode_us += sum(r.encode_us for r in results)
        out.queue_us += max(r.queue_us for r in results)
        if s.view_chunk and lo + chunk < s.views:
            sofar = hosted.logit_scale * F.normalize(torch.cat(feats), dim=-1) @ classifier.T
            if views_agree(sofar, s.ratio):
                report.note = f"selected views agreed after {sofar.shape[0]} views"
                break
    view_feats = torch.cat(feats)
    patches = first.patches[0] if first.patches is not None else None
    if s.method == "tpt":
        text = TextSide(hosted.model, hosted.tokenizer, labels)
        result = await asyncio.wrap_future(hosted.run_text(adapt_views, s, view_feats, None, classifier,
                                                           hosted.logit_scale, text))
    else:
        result = await loop.run_in_executor(pool, adapt_views, s, view_feats, patches, classifier, hosted.logit_scale)
    if gs and patches is None:
        report.note = (report.note + "; " if report.note else "") + "no patch tokens in this tower: global bias only"
    if hosted.logit_bias is not None and s.method != "zero":
        result = MethodResult(result.logits + hosted.logit_bias, result.probs, result.steps_run, result.global_only)
    report.views_encoded = view_feats.shape[0]
    report.steps_run = result.steps_run
    report.global_only = result.global_only
    out.result = result
    out.adapt_us = int((time.perf_counter() - start) * 1e6)
    return out
