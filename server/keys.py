"""Cache keys: everything an entry depends on, so a key never answers for other weights, views or settings."""
from __future__ import annotations

import hashlib
import json

import torch

from adaptclip.adapt.draws import DRAWS
from adaptclip.adapt.encoder import EncoderModel
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.views import augmix_renderer
from adaptclip.server.cache import SCHEMA


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def feature_key(fingerprint: str, image_hash: str, s: AdaptSettings, tokens: str = "k1",
                device: torch.device = torch.device("cpu")) -> str:
    """Key of an image's view features: model weights, image bytes, everything that shapes the views
    (the draw algorithm's version, and with AugMix the code that renders it on the model's `device`)
    and the token compression the encoder ran with (`tokens`)."""
    shape = {"views": s.views, "seed": s.seed, "crop": list(s.crop_scale), "augmix": s.use_augmix, "draws": DRAWS}
    if s.use_augmix:
        shape["render"] = augmix_renderer(device)
    views = "v1" if s.method == "none" else _digest(shape)
    return f"adaptclip:{SCHEMA}:features:{fingerprint}:{image_hash}:{views}:{tokens}"


def token_tag(model: EncoderModel, keep_rate: float) -> str:
    """Cache-key part for token compression: its whole configuration when on."""
    if keep_rate >= 1.0:
        return "k1"
    c = model.compressor
    return "k" + _digest({"schedule": c.schedule(keep_rate), "at": c.reduce_at, "fuse": c.fuse,
                          "score": c.score_layers})


def result_key(feat_key: str, label_set_id: str, s: AdaptSettings) -> str:
    """Key of a final answer: the features' key plus the label set and the adaptation's own settings."""
    settings = {"method": s.method} if s.method == "none" else {
        "method": s.method, "ratio": s.ratio, "steps": s.steps, "alpha": s.alpha, "beta": s.beta,
        "top_k": s.spatial_top_k, "skip": s.skip_entropy, "chunk": s.view_chunk, "lr": s.tpt_lr,
        "gate": [s.gate_entropy_rise, s.gate_agreement, s.gate_top_k, s.gate_similarity]}
    return feat_key.replace(":features:", ":result:", 1) + f":{label_set_id}:{_digest(settings)}"


def classifier_key(fingerprint: str, label_set_id: str) -> str:
    """Key of a label set's text classifier for one model's weights (built once, shared by replicas)."""
    return f"adaptclip:{SCHEMA}:classifier:{fingerprint}:{label_set_id}"
