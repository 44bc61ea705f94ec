"""Conversions between the API's messages and the compute layer's plain types (settings, reports, scores)."""
from __future__ import annotations

import torch
from adaptclip.adapt.loop import Report
from adaptclip.adapt.settings import AdaptSettings, FieldError
from adaptclip.v1 import classifier_pb2 as pb

METHOD_NAMES = {pb.Adaptation.NONE: "none",
                pb.Adaptation.GS_BIAS: "gs_bias", pb.Adaptation.ZERO: "zero", pb.Adaptation.TPT: "tpt"}
METHOD_ENUMS = {name: enum for enum, name in METHOD_NAMES.items()}
_OPTIONAL = ("views", "selection_ratio", "steps", "alpha", "beta", "spatial_top_k", "seed", "augmix",
             "skip_entropy", "view_chunk", "gate_entropy_rise", "gate_agreement", "gate_top_k",
             "gate_similarity")


def settings_from_request(msg: pb.Adaptation, defaults: AdaptSettings) -> AdaptSettings:
    """Request fields over the model's defaults; FieldError naming the first bad field."""
    if msg.method != pb.Adaptation.METHOD_UNSPECIFIED and msg.method not in METHOD_NAMES:
        raise FieldError("adaptation.method", f"unknown method {msg.method}")
    method = METHOD_NAMES.get(msg.method, defaults.method)
    changes = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    lo, hi = defaults.crop_scale
    if msg.HasField("crop_scale_min"):
        lo = msg.crop_scale_min
    if msg.HasField("crop_scale_max"):
        hi = msg.crop_scale_max
    return defaults.replace(method=method, crop_scale=(lo, hi), **changes).validate()


def settings_to_proto(s: AdaptSettings) -> pb.Adaptation:
    return pb.Adaptation(method=METHOD_ENUMS[s.method], views=s.views, selection_ratio=s.ratio, steps=s.steps,
                         alpha=s.alpha, beta=s.beta, spatial_top_k=s.spatial_top_k, seed=s.seed,
                         crop_scale_min=s.crop_scale[0], crop_scale_max=s.crop_scale[1], augmix=s.use_augmix,
                         skip_entropy=s.skip_entropy, view_chunk=s.view_chunk, gate_entropy_rise=s.gate_entropy_rise,
                         gate_agreement=s.gate_agreement, gate_top_k=s.gate_top_k,
                         gate_similarity=s.gate_similarity)


def report_to_proto(r: Report) -> pb.AdaptationReport:
    return pb.AdaptationReport(method=METHOD_ENUMS[r.method], views_encoded=r.views_encoded, skipped=r.skipped,
                               steps_run=r.steps_run, global_only=r.global_only,
                               normalized_entropy=r.normalized_entropy, note=r.note, fell_back=r.fell_back)


def fill_top(field, labels: tuple[str, ...], logits: torch.Tensor, probs: torch.Tensor, k: int) -> None:
    """Top-k by probability, ties broken by logit (ZERO's votes tie often)."""
    order = sorted(range(len(labels)), key=lambda i: (-float(probs[i]), -float(logits[i])))[:k]
    for i in order:
        field.add(label=labels[i], probability=float(probs[i]), logit=float(logits[i]), index=i)
