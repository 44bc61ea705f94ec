"""A classify response as the JSON record `adaptclip classify --json` prints and labelling jobs store."""
from __future__ import annotations

from adaptclip.v1 import classifier_pb2 as pb


def _scores(top) -> list[dict]:
    return [{"label": s.label, "probability": s.probability, "logit": s.logit} for s in top]


def response_record(path: str, resp: pb.ClassifyResponse) -> dict:
    """The JSON line of one classified image (later fields are added, these stay)."""
    rec = {"image": path, "top": _scores(resp.top), "model": resp.model, "label_set_id": resp.label_set_id,
           "request_id": resp.request_id}
    if resp.zero_shot_top:
        a = resp.adaptation
        rec["zero_shot_top"] = _scores(resp.zero_shot_top)
        rec["adaptation"] = {"method": pb.Adaptation.Method.Name(a.method).lower(), "views_encoded": a.views_encoded,
                             "skipped": a.skipped, "fell_back": a.fell_back, "steps_run": a.steps_run, "global_only": a.global_only,
                             "normalized_entropy": a.normalized_entropy, "adapt_ms": resp.timings.adapt_us / 1000}
    return rec
