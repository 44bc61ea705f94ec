"""Hosting an exported edge bundle (`adaptclip quantize`) through onnxruntime, as a model like any other.

The server runs the bundle with the edge runner's own code (compression/edge.py: same preprocessing,
same session), so a served answer equals `adaptclip edge classify`'s. A bundle carries no text
tower, which bounds what it can do: it classifies with the label sets it was exported with (inline
or by id), GS-Bias adapts the global bias only (the ONNX graph returns no patch tokens), ZERO works
as usual, and TPT and text embeddings are refused with FAILED_PRECONDITION naming the field.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from adaptclip.adapt.settings import settings_from_dict
from adaptclip.compression.edge import EdgeModel, default_providers
from adaptclip.server.config import ModelSpec
from adaptclip.server.labels import LabelSetDef, label_set_id
from adaptclip.server.models import HostedModel, ModelLoadError

_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class NoTextTower(ValueError):
    """The model cannot run text through a text tower (an exported bundle)."""


@dataclass
class BundleModel(HostedModel):
    """An exported bundle behind HostedModel's interface: encoder = onnxruntime session, fixed label sets."""

    edge: EdgeModel | None = None
    bundled: tuple[tuple[str, LabelSetDef], ...] = ()  # (bundle's label set name, its definition)

    @property
    def runtime(self) -> str:
        return "onnxruntime:" + ",".join(self.edge.session.get_providers())

    @property
    def precision(self) -> str:
        return _bits(self.edge)

    @property
    def has_patches(self) -> bool:
        return False

    @property
    def has_text(self) -> bool:
        return False

    def encode_images(self, images: torch.Tensor, with_patches: bool = False,
                      keep_rate: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, 3, H, W] preprocessed -> fp32 features [N, D] from the ONNX graph (no patch tokens)."""
        if keep_rate < 1.0:
            raise ValueError("an exported bundle cannot drop tokens")
        feats = self.edge.encode_images(images.detach().cpu().numpy())
        return torch.from_numpy(np.asarray(feats, dtype=np.float32)), None

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        raise NoTextTower(f"model '{self.name}' is an exported bundle without a text tower")

    def build_classifier(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        """The bundle's precomputed classifier for exactly these labels and templates."""
        wanted = label_set_id(labels, templates)
        for name, ls in self.bundled:
            if ls.id == wanted:
                return torch.from_numpy(self.edge.label_set(name)[1].copy())
        raise NoTextTower(self.label_set_hint())

    def supports(self, ls: LabelSetDef) -> bool:
        return any(b.id == ls.id for _, b in self.bundled)

    def label_set_hint(self) -> str:
        sets = "; ".join(f"'{name}' ({len(ls.labels)} labels, label_set_id {ls.id})" for name, ls in self.bundled)
        return (f"model '{self.name}' is an exported bundle without a text tower: it classifies only with the "
                f"label sets it carries, sent inline with the same labels and templates or by id: {sets}")


def _bits(edge: EdgeModel) -> str:
    return str(edge.manifest.get("quantization", {}).get("bits", "onnx"))


def _fingerprint(edge: EdgeModel) -> str:
    """Hash of the ONNX graph and the preprocessing: what the features depend on."""
    h = hashlib.blake2b(digest_size=16)
    with open(edge.root / edge.manifest["onnx"]["file"], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps(edge.pre, sort_keys=True).encode())
    return "onnx-" + h.hexdigest()


def load_bundle(spec: ModelSpec) -> BundleModel:
    """Open spec.bundle with the device's onnxruntime provider (auto: CUDA when present, else CPU)."""
    if spec.device not in ("auto", "cpu", "cuda"):
        raise ModelLoadError(f"bundle '{spec.bundle}': device must be auto, cpu or cuda, got '{spec.device}'")
    if spec.keep_rate != 1.0:
        raise ModelLoadError(f"bundle '{spec.bundle}': keep_rate: an exported bundle cannot drop tokens")
    if spec.device == "cuda" and "CUDAExecutionProvider" not in default_providers():
        raise ModelLoadError(f"bundle '{spec.bundle}': device cuda asked, but this onnxruntime has no CUDA provider "
                             f"(install onnxruntime-gpu)")
    try:
        edge = EdgeModel(spec.bundle, None if spec.device == "auto" else _PROVIDERS[spec.device])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load bundle '{spec.bundle}': {exc}") from exc
    try:
        adapt_defaults = settings_from_dict(dict(spec.adaptation))
    except ValueError as exc:
        raise ModelLoadError(f"bundle '{spec.bundle}': {exc}") from None
    if adapt_defaults.method == "tpt":
        raise ModelLoadError(f"bundle '{spec.bundle}': adaptation method tpt needs a text tower")
    bundled = []
    for name in edge.label_set_names:
        labels, templates = tuple(edge.label_set(name)[0]), tuple(edge.templates[name])
        bundled.append((name, LabelSetDef(label_set_id(labels, templates), labels, templates)))
    return BundleModel(
        name=spec.name or f"{edge.name}-{_bits(edge)}", spec=spec, model=None,
        preprocess=lambda img: torch.from_numpy(edge.preprocess(img)), tokenizer=None,
        device=torch.device("cpu"), dtype=torch.float32, fingerprint=_fingerprint(edge),
        embed_dim=int(edge.manifest["model"]["embed_dim"]), image_size=edge.image_size,
        logit_scale=edge.logit_scale, logit_bias=edge.logit_bias,
        mean=tuple(float(x) for x in edge.pre["mean"]), std=tuple(float(x) for x in edge.pre["std"]),
        adapt_defaults=adapt_defaults, compressor=None, edge=edge, bundled=tuple(bundled))

