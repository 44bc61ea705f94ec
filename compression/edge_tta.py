"""Test-time adaptation of one image on the edge: numpy views, onnxruntime encoding, numpy GS-Bias / ZERO.

The torch-free counterpart of `adaptclip.adapt.loop.adapt_image` as the server runs it for a bundle
(tests/test_edge_tta.py checks the decisions and logits against it on the same features): zero-shot
from view 0 (with its patch features for GS-Bias when the bundle has them), the confidence gate
(`skip_entropy`), the augmented views encoded chunk by chunk with the early stop of `view_chunk`,
then the method (compression/edge_adapt.py) on features at the server's precision (view 0 fp32, the
other views and the patches rounded to fp16, as its cache stores them). Views are rendered by
compression/edge_views.py from draws made up front, so chunk k+1 is rendered on a worker thread
while chunk k is encoded (onnxruntime and numpy release the GIL) and any chunking gives the same views.

Settings come from the bundle's recorded adaptation block (`EdgeModel.adaptation`) under the
caller's overrides; fields this version does not apply (TPT's, or ones a newer adaptclip added)
are reported as ignored, never an error. Importing this module must never pull torch or grpc.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
from PIL import Image

from adaptclip.adapt.gate import gate_active, outside_top_k, signals, views_out_of_distribution
from adaptclip.adapt.pieces import RENDER_CHUNK, first_piece, render_pieces, view_chunks
from adaptclip.adapt.settings import AdaptSettings, settings_from_dict, untuned_defaults
from adaptclip.compression import edge_adapt
from adaptclip.compression.edge_model import EdgeModel, softmax
from adaptclip.compression.edge_views import ViewRenderer

MIN_AGREEING = 2  # as adapt.loop: selected views that must agree before a chunked run stops
_NOT_ON_EDGE = frozenset({"tpt_lr"})  # AdaptSettings fields that mean nothing without a text tower


def edge_settings(block: dict[str, Any], overrides: dict[str, Any] | None = None,
                  image_size: int = 224) -> tuple[AdaptSettings, list[str]]:
    """(settings, ignored field names) from a bundle's recorded block under `overrides` (unset = None
    values are dropped), over the untuned defaults for the input size, as a torch model's block is.
    Raises adapt.settings.FieldError for a bad value, ValueError for TPT."""
    known = {f.name for f in dataclasses.fields(AdaptSettings)} - _NOT_ON_EDGE
    ignored = sorted(k for k in block if k not in known)
    base = settings_from_dict({k: v for k, v in block.items() if k in known}, untuned_defaults(image_size))
    settings = settings_from_dict({k: v for k, v in (overrides or {}).items() if v is not None}, base)
    if settings.method == "tpt":
        raise ValueError("adaptation method tpt needs a text tower, which a bundle has not (use gs_bias or zero)")
    return settings, ignored


def spin_while_adapting(s: AdaptSettings) -> bool:
    """Whether onnxruntime's workers should spin-wait between ops (`EdgeModel(spin=)`) while `s` runs:
    yes unless AugMix views render on the CPU beside the encoder. Spinning workers hold the cores
    the renderer needs (ViT-B-32, 32 AugMix views, two threads: 407 -> 350 ms an image with spinning
    off), while crops alone render in ~1 ms and spinning's quicker hand-offs win (the CIFAR model, 32
    views: 28 vs 40 ms); BENCHMARKS.md, issue 17."""
    return s.method == "none" or not s.use_augmix


@dataclass
class EdgeAnswer:
    """One image: adapted and zero-shot logits/probabilities [C], what the adaptation did, timings."""

    logits: np.ndarray
    probs: np.ndarray
    zero_shot: np.ndarray
    report: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _fp16(x: np.ndarray) -> np.ndarray:
    """Rounded to fp16 and back, as the server's cache (adapt.loop.view_precision) rounds views and patches."""
    return x.astype(np.float16).astype(np.float32)


def views_agree(view_logits: np.ndarray, ratio: float) -> bool:
    """As adapt.loop.views_agree: at least MIN_AGREEING confidence-selected views predict one class."""
    kept = edge_adapt.confident_views(view_logits, ratio)
    if len(kept) < MIN_AGREEING:
        return False
    top = view_logits[kept].argmax(-1)
    return bool((top == top[0]).all())


class EdgeAdapter:
    """Adapts images for one bundle, label set and settings; `close` stops its render thread."""

    def __init__(self, model: EdgeModel, settings: AdaptSettings, label_set: str | None = None,
                 render_chunk: int = RENDER_CHUNK) -> None:
        self.model, self.s, self.render_chunk = model, settings.validate(), max(1, render_chunk)
        self.labels, self.weights = model.label_set(label_set)
        self.renderer = ViewRenderer.for_bundle(model.pre, crop_scale=settings.crop_scale, augmix=settings.use_augmix)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edge-views")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pieces(self) -> Iterator[tuple[int, int, bool]]:
        """(lo, hi, ends a loop chunk): the loop's chunks cut into render pieces (adapt/pieces.py)."""
        for lo, hi in view_chunks(self.s):
            for start, stop in render_pieces(lo, hi, self.render_chunk, first_piece(self.s)):
                yield start, stop, stop == hi

    def classify(self, image: Image.Image, seed: int | None = None) -> EdgeAnswer:
        """The adaptive loop on one RGB image; views drawn with `seed` (default: the settings' seed)."""
        s, model, times = self.s, self.model, {"render_ms": 0.0, "encode_ms": 0.0, "adapt_ms": 0.0}
        started = time.perf_counter()
        gs = s.method == "gs_bias"
        view0 = model.preprocess(image)
        ahead = None if s.method == "none" or s.views < 2 else self._pool.submit(
            self._prepare, image, s.seed if seed is None else seed)
        start = time.perf_counter()
        feat0, patches = model.encode(view0[None], with_patches=gs)
        times["encode_ms"] += 1000 * (time.perf_counter() - start)
        zero_shot = model.logits(feat0)[0]
        entropy = edge_adapt.normalized_entropy(zero_shot)
        report = {"method": s.method, "views_encoded": 1, "skipped": False, "fell_back": False, "steps_run": 0,
                  "global_only": False, "normalized_entropy": entropy, "note": ""}
        answer = EdgeAnswer(zero_shot, softmax(zero_shot), zero_shot, report, times)
        if s.method == "none":
            return self._done(answer, started)
        if entropy < s.skip_entropy:
            report["skipped"] = True
            report["note"] = f"original view confident (normalised entropy {entropy:.3f} < {s.skip_entropy:g}): no views"
            return self._done(answer, started)
        feats = self._views(ahead, feat0, report, times)
        start = time.perf_counter()
        if feats.ndim == 2 and feats.shape[0] > 1 and gate_active(s):
            unit = _unit(feats)
            view_logits = model.logit_scale * unit @ self.weights.T
            entropies = edge_adapt.view_entropy(view_logits) / max(np.log(view_logits.shape[-1]), 1e-12)
            why = views_out_of_distribution(s, signals(entropies.tolist(), view_logits.argmax(-1).tolist(),
                                                       (unit[1:] @ unit[0]).tolist()))
            if why:
                return self._fall_back(answer, why, start, started)
        logits, probs, steps = self._method(feats, None if patches is None else patches[0])
        best = np.flatnonzero(probs == probs.max())
        why = outside_top_k(s, np.argsort(-zero_shot, kind="stable").tolist(), int(best[np.argmax(logits[best])]))
        if why:
            return self._fall_back(answer, why, start, started)
        answer.logits, answer.probs, report["steps_run"] = logits, probs, steps
        times["adapt_ms"] = 1000 * (time.perf_counter() - start)
        if gs and patches is None:
            report["global_only"] = True
            note = model.patch_note
            report["note"] = f"{report['note']}; {note}" if report["note"] else note
        return self._done(answer, started)

    def _prepare(self, image: Image.Image, seed: int) -> tuple[Callable[[int, int], tuple[np.ndarray, float]], Future]:
        """On the worker while view 0 is encoded: the draws, and the first piece of views when no
        confidence gate can skip them (as the server's ImageViews; a skipped image renders nothing).
        Returns the piece renderer and the first piece's (views, seconds)."""
        pixels = self.renderer.prepare(image)
        params = self.renderer.sample(seed, self.s.views - 1, *pixels.shape[:2])

        def render(lo: int, hi: int) -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            return self.renderer.render(pixels, params.select(lo - 1, hi - 1)), time.perf_counter() - start

        first: Future = Future()
        if self.s.skip_entropy <= 0.0:
            first.set_result(render(*next(self._pieces())[:2]))
        return render, first

    def _views(self, ahead: Future | None, feat0: np.ndarray, report: dict[str, Any],
               times: dict[str, float]) -> np.ndarray:
        """Features [n, D] of views 0..n-1 (view 0 fp32, the rest fp16-rounded), rendering piece k + 1
        on the worker thread while piece k is encoded, stopping early as the loop does."""
        s = self.s
        pieces = list(self._pieces())
        feats = [feat0.astype(np.float32)]
        if ahead is None or not pieces:  # one view: the method runs on the original alone, as the torch loop does
            return feats[0]
        render, pending = ahead.result()
        if not pending.done():
            pending = self._pool.submit(render, *pieces[0][:2])
        for i, (lo, hi, chunk_end) in enumerate(pieces):
            views, render_s = pending.result()
            if i + 1 < len(pieces):
                pending = self._pool.submit(render, *pieces[i + 1][:2])
            start = time.perf_counter()
            feats.append(_fp16(self.model.encode(views)[0]))
            times["encode_ms"] += 1000 * (time.perf_counter() - start)
            times["render_ms"] += 1000 * render_s
            report["views_encoded"] = hi
            if chunk_end and s.view_chunk and hi < s.views:
                all_feats = np.concatenate(feats)
                if views_agree(self.model.logit_scale * _unit(all_feats) @ self.weights.T, s.ratio):
                    report["note"] = f"selected views agreed after {hi} views"
                    pending.cancel()
                    return all_feats
        return np.concatenate(feats)

    def _method(self, feats: np.ndarray, patches: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
        """(logits, probs, steps) of GS-Bias or ZERO, as adapt.methods.adapt_views plus the loop's logit bias."""
        s, scale, unit = self.s, self.model.logit_scale, _unit(feats)
        if s.method == "gs_bias":
            unit_patches = None if patches is None else _unit(_fp16(patches))
            res = edge_adapt.gs_bias(unit, unit_patches, self.weights, logit_scale=scale, selection_ratio=s.ratio,
                                     steps=s.steps, alpha=s.alpha, beta=s.beta, top_k_patches=s.spatial_top_k)
            logits = res.logits + (self.model.logit_bias or 0.0)
            return logits, softmax(res.logits), int(res.steps_run)
        view_logits = scale * unit @ self.weights.T
        votes = edge_adapt.zero_logits(view_logits, s.ratio)
        return view_logits[edge_adapt.confident_views(view_logits, s.ratio)].mean(0), votes, 0

    def _fall_back(self, answer: EdgeAnswer, why: str, start: float, started: float) -> EdgeAnswer:
        """The safety gate's zero-shot answer after the views were encoded (as adapt.loop._fall_back)."""
        answer.timings_ms["adapt_ms"] = 1000 * (time.perf_counter() - start)
        report = answer.report
        report["fell_back"] = True
        note = f"safety gate: {why}: zero-shot answer"
        report["note"] = f"{report['note']}; {note}" if report["note"] else note
        return self._done(answer, started)

    def _done(self, answer: EdgeAnswer, started: float) -> EdgeAnswer:
        answer.timings_ms["total_ms"] = 1000 * (time.perf_counter() - started)
        return answer
