"""One entry point for every adaptation method over already-encoded views (`adapt_views`).

The adaptive loop (adapt/loop.py) calls it for the server and the accuracy harness alike.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptclip.adapt.gsbias import gs_bias
from adaptclip.adapt.peers import CLASS_CHUNK, tpt_logits, zero_logits
from adaptclip.adapt.selection import confident_views
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.kernels.backend import resolve


@dataclass(frozen=True)
class MethodResult:
    logits: Tensor  # [C] adapted logits (ZERO: mean logit of its kept views)
    probs: Tensor  # [C] (ZERO: its vote shares)
    steps_run: int
    global_only: bool
    global_bias: Tensor | None = None  # GS-Bias's learned biases [C], kept with the cached result
    spatial_bias: Tensor | None = None


@dataclass(frozen=True)
class TextSide:
    """What TPT needs to re-run the text tower: the model, its tokenizer, the class names, and how many
    prompts go through the tower at once with autograd (None: all, as the paper; see tpt_logits)."""

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], Tensor]
    labels: Sequence[str]
    class_chunk: int | None = CLASS_CHUNK


def adapt_views(settings: AdaptSettings, view_feats: Tensor, patch_feats: Tensor | None, classifier: Tensor,
                logit_scale: float, text: TextSide | None = None, gs_backend: str = "torch",
                device: torch.device | str | None = None, deadline: float | None = None) -> MethodResult:
    """Adapted prediction for one image from its V view features ([V, D], view 0 the original).

    view_feats / patch_feats ([P, D] of view 0, or None) may be unnormalised: they are
    L2-normalised here. GS-Bias without patch features adapts the global bias only.
    gs_backend: GS-Bias's backend (adapt.gsbias), run on `device` (None: the features' device) when
    it resolves to the kernels there; results come back on the features' device. TPT checks
    `deadline` (a time.monotonic() instant) between its steps and raises TimeoutError past it.
    """
    feats = F.normalize(view_feats.float(), dim=-1)
    if settings.method == "gs_bias":
        patches = None if patch_feats is None else F.normalize(patch_feats.float(), dim=-1)
        home, where = feats.device, torch.device(device) if device is not None else feats.device
        if where != home and resolve(gs_backend, where) == "triton":
            feats, classifier = feats.to(where), _resident(classifier, where)
            patches = None if patches is None else patches.to(where)
        res = gs_bias(feats, patches, classifier, logit_scale=logit_scale, selection_ratio=settings.ratio,
                      steps=settings.steps, alpha=settings.alpha, beta=settings.beta,
                      top_k_patches=settings.spatial_top_k, backend=gs_backend)
        logits = res.logits.to(home)
        return MethodResult(logits, logits.softmax(-1), int(res.steps_run), patches is None,
                            res.global_bias.to(home), res.spatial_bias.to(home))
    view_logits = logit_scale * feats @ classifier.T
    if settings.method == "zero":
        votes = zero_logits(view_logits, settings.ratio)
        mean_kept = view_logits[confident_views(view_logits, settings.ratio)].mean(0)
        return MethodResult(mean_kept, votes, 0, False)
    if settings.method == "tpt":
        if text is None:
            raise ValueError("TPT needs the text tower (TextSide)")
        logits = tpt_logits(text.model, text.tokenizer, list(text.labels), feats, logit_scale=logit_scale,
                            lr=settings.tpt_lr, steps=settings.steps, selection_ratio=settings.ratio,
                            class_chunk=text.class_chunk, deadline=deadline)
        return MethodResult(logits.detach().float(), logits.detach().float().softmax(-1), settings.steps, False)
    raise ValueError(f"no adaptation for method {settings.method!r}")


_RESIDENT: dict[tuple[int, str], Tensor] = {}


def _resident(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`, copied once per tensor object and dropped with it: the label-set store hands
    every request of a label set the same classifier, so the GPU path copies it once, not per request."""
    key = (id(tensor), str(device))
    copy = _RESIDENT.get(key)
    if copy is None:
        copy = _RESIDENT[key] = tensor.to(device)
        weakref.finalize(tensor, _RESIDENT.pop, key, None)
    return copy
