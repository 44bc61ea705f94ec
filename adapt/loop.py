"""The one adaptive loop: zero-shot from the original view, a confidence gate, views encoded in chunks
with an early stop, then the method — driven by a view source, so the server (encoder batches and the
cache behind it) and the accuracy harness (features encoded up front) run exactly the same decisions
on features of exactly the same precision.
"""
from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptclip.adapt.gate import ViewSignals, gate_active, outside_top_k, signals, views_out_of_distribution
from adaptclip.adapt.methods import MethodResult
from adaptclip.adapt.pieces import view_chunks
from adaptclip.adapt.selection import confident_views, normalized_entropy, view_entropy
from adaptclip.adapt.settings import AdaptSettings

MIN_AGREEING = 2  # selected views that must agree before a chunked run stops


class ViewSource(Protocol):
    """One image's features, encoded on demand."""

    async def original(self, with_patches: bool) -> tuple[Tensor, Tensor | None]:
        """View 0's features [D] and, when asked and the tower has them, its patch features [P, D]."""

    async def first(self, n: int) -> Tensor:
        """Features [n, D] of views 0..n-1 (view 0 the original)."""


# (settings, view features [n, D], patch features [P, D] or None) -> the method's result
MethodRunner = Callable[[AdaptSettings, Tensor, Tensor | None], Awaitable[MethodResult]]


@dataclass
class Report:
    """What the adaptation did (the API's AdaptationReport)."""

    method: str
    views_encoded: int = 1
    skipped: bool = False
    fell_back: bool = False  # views encoded, but the safety gate answered zero-shot
    steps_run: int = 0
    global_only: bool = False
    normalized_entropy: float = 0.0
    note: str = ""


@dataclass
class Outcome:
    zero_shot: Tensor  # [C] logits of the original view
    result: MethodResult | None  # None when no method ran (NONE, or skipped by the gate)
    report: Report
    adapt_us: int = 0


def view_precision(feats: Tensor) -> Tensor:
    """Features as adaptation sees them: view 0 in fp32 (zero-shot parity with open_clip), the augmented
    views rounded to fp16, as the cache stores them, so a cached answer equals a computed one."""
    return feats if feats.shape[0] <= 1 else torch.cat([feats[:1], feats[1:].half().float()])


def patch_precision(patches: Tensor) -> Tensor:
    """Patch features rounded to fp16, as cached."""
    return patches.half().float()


def skips_views(settings: AdaptSettings, entropy: float) -> bool:
    """The confidence gate: an adapting method answers zero-shot, without views, below skip_entropy."""
    return settings.method != "none" and entropy < settings.skip_entropy


def views_agree(view_logits: Tensor, ratio: float) -> bool:
    """True when at least MIN_AGREEING confidence-selected views all predict the same class. A selection
    of one view would "agree" with itself and stop after every first chunk."""
    kept = confident_views(view_logits, ratio)
    if kept.numel() < MIN_AGREEING:
        return False
    top = view_logits[kept].argmax(-1)
    return bool((top == top[0]).all())


def stops_after(settings: AdaptSettings, hi: int, view_logits: Tensor) -> bool:
    """After encoding views [0, hi) (their logits given): stop early, before the last chunk, once the
    selected views agree. Never stops without view_chunk."""
    return bool(settings.view_chunk) and hi < settings.views and views_agree(view_logits, settings.ratio)


def zero_shot_logits(feats: Tensor, classifier: Tensor, logit_scale: float, logit_bias: float | None) -> Tensor:
    """open_clip's zero-shot logits of unnormalised features [N, D]: own scale, and bias when the model has one."""
    out = logit_scale * F.normalize(feats, dim=-1) @ classifier.T
    return out + logit_bias if logit_bias is not None else out


def check_deadline(deadline: float | None, where: str) -> None:
    """TimeoutError once `deadline` (a time.monotonic() instant) has passed: nobody waits for the answer."""
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"deadline passed {where}")


async def adapt_image(source: ViewSource, s: AdaptSettings, classifier: Tensor, logit_scale: float,
                      logit_bias: float | None, run_method: MethodRunner, deadline: float | None = None) -> Outcome:
    """Zero-shot from view 0 (with patches for GS-Bias); unless the gate skips, take the views and adapt.
    Past `deadline` (time.monotonic()) it raises TimeoutError before the next chunk of views and before
    the method, so work nobody waits for is not started."""
    gs = s.method == "gs_bias"
    feat0, patches = await source.original(with_patches=gs)
    zero_shot = zero_shot_logits(feat0.unsqueeze(0), classifier, logit_scale, logit_bias)[0]
    entropy = normalized_entropy(zero_shot)
    report = Report(s.method, normalized_entropy=entropy)
    out = Outcome(zero_shot, None, report)
    if s.method == "none":
        return out
    if skips_views(s, entropy):
        report.skipped = True
        report.note = f"original view confident (normalised entropy {entropy:.3f} < {s.skip_entropy:g}): no views"
        return out
    start = time.perf_counter()
    n, feats = 1, feat0.unsqueeze(0)
    for lo, n in view_chunks(s):
        check_deadline(deadline, f"after {lo} of {s.views} views")
        feats = view_precision(await source.first(n))
        if s.view_chunk and stops_after(s, n, logit_scale * F.normalize(feats, dim=-1) @ classifier.T):
            report.note = f"selected views agreed after {n} views"
            break
    if n > 1 and gate_active(s):
        unit = F.normalize(feats, dim=-1)
        why = views_out_of_distribution(s, view_signals(logit_scale * unit @ classifier.T, unit))
        if why:
            return _fall_back(out, n, why, start)
    check_deadline(deadline, f"after {n} views, before {s.method}")
    result = await run_method(s, feats, patch_precision(patches) if gs and patches is not None else None)
    if s.gate_top_k:  # the zero-shot ranking only when the top-k test is on
        why = outside_top_k(s, torch.argsort(zero_shot, descending=True, stable=True).tolist(), answer_top1(result))
        if why:
            return _fall_back(out, n, why, start)
    if gs and result.global_only:
        report.note = (report.note + "; " if report.note else "") + "no patch tokens in this tower: global bias only"
    if logit_bias is not None and s.method != "zero":
        result = replace(result, logits=result.logits + logit_bias)
    report.views_encoded, report.steps_run, report.global_only = n, result.steps_run, result.global_only
    out.result = result
    out.adapt_us = int((time.perf_counter() - start) * 1e6)
    return out


def view_signals(view_logits: Tensor, unit_feats: Tensor) -> ViewSignals:
    """The safety gate's signals from the logits [V, C] and unit features [V, D] of view 0 and its
    augmented views."""
    logits = view_logits.float()
    norm = math.log(logits.shape[-1]) if logits.shape[-1] > 1 else 1.0
    unit = unit_feats.float()
    return signals((view_entropy(logits) / norm).tolist(), logits.argmax(-1).tolist(), (unit[1:] @ unit[0]).tolist())


def answer_top1(result: MethodResult) -> int:
    """The class a response ranks first: highest probability, ties (ZERO's votes) broken by logit."""
    best = result.probs == result.probs.max()
    return int(torch.where(best, result.logits.float(), torch.tensor(float("-inf"))).argmax())


def _fall_back(out: Outcome, n: int, why: str, start: float) -> Outcome:
    """The safety gate's zero-shot answer after `n` views were encoded."""
    out.adapt_us = int((time.perf_counter() - start) * 1e6)
    out.report.fell_back, out.report.views_encoded = True, n
    out.report.note = (out.report.note + "; " if out.report.note else "") + f"safety gate: {why}: zero-shot answer"
    return out
