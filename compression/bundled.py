"""An exported edge bundle (`adaptclip quantize`) behind the `EncoderModel` interface, run by onnxruntime.

It runs the bundle with the edge runner's own code (compression/edge.py: same preprocessing, same
session), so a served answer equals `adaptclip edge classify`'s. A bundle carries no text tower,
which bounds what it can do: it classifies with the label sets it was exported with (its
`fixed_label_sets`), GS-Bias gets its spatial bias from the graph's patch output (bundles of format
1 have none: global bias only, said in the report's note and GetModelInfo), ZERO works as usual, and
TPT and text embeddings are refused (`text` is None). Its adaptation defaults are those recorded in
the bundle at export, under the config entry's `adaptation:` block.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from adaptclip.adapt.encoder import EncoderModel, FixedLabelSet
from adaptclip.compression.edge_model import EdgeModel, default_providers, read_manifest, recorded_adaptation
from adaptclip.compression.edge_tta import edge_settings, spin_while_adapting
from adaptclip.compression.models import ModelLoadError, ModelSpec

_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass(eq=False)
class BundleModel(EncoderModel):
    """Encoder = an onnxruntime session over the bundle's graph; classifiers = the bundle's label sets."""

    edge: EdgeModel | None = None

    @property
    def runtime(self) -> str:
        return "onnxruntime:" + ",".join(self.edge.session.get_providers())

    @property
    def precision(self) -> str:
        return _bits(self.edge)

    @property
    def has_patches(self) -> bool:
        return self.edge.has_patches

    def preprocess(self, image: Image.Image) -> Tensor:
        return torch.from_numpy(self.edge.preprocess(image))

    def encode_images(self, images: Tensor, with_patches: bool = False,
                      keep_rate: float = 1.0) -> tuple[Tensor, Tensor | None]:
        """[N, 3, H, W] preprocessed -> fp32 features [N, D] (+ patches [N, P, D] when asked and exported)."""
        if keep_rate < 1.0:
            raise ValueError("an exported bundle cannot drop tokens")
        feats, patches = self.edge.encode(images.detach().cpu().numpy(), with_patches)
        return (torch.from_numpy(np.asarray(feats, dtype=np.float32)),
                None if patches is None else torch.from_numpy(np.asarray(patches, dtype=np.float32)))


def _bits(edge: EdgeModel) -> str:
    return str(edge.manifest.get("quantization", {}).get("bits", "onnx"))


def _fingerprint(edge: EdgeModel) -> str:
    """Hash of the ONNX graph, the preprocessing and the patch output used: what the answers depend on (a
    format-1 manifest over the same graph adapts globally only, so it must not share cached results)."""
    h = hashlib.blake2b(digest_size=16)
    with open(edge.root / edge.manifest["onnx"]["file"], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps([edge.pre, edge.patches_name], sort_keys=True).encode())
    return "onnx-" + h.hexdigest()


def load_bundle(spec: ModelSpec) -> BundleModel:
    """Open spec.bundle with the device's onnxruntime provider (auto: CUDA when present, else CPU)."""
    if spec.device not in ("auto", "cpu", "cuda"):
        raise ModelLoadError(f"bundle '{spec.bundle}': device must be auto, cpu or cuda, got '{spec.device}'")
    if spec.keep_rate != 1.0:
        raise ModelLoadError(f"bundle '{spec.bundle}': keep_rate: an exported bundle cannot drop tokens")
    if spec.precision != "auto":  # its graph is fp32 or INT8 as exported; GetModelInfo reports which
        raise ModelLoadError(f"bundle '{spec.bundle}': precision '{spec.precision}': an exported bundle runs at the "
                             f"precision it was exported with; leave precision at auto")
    if spec.device == "cuda" and "CUDAExecutionProvider" not in default_providers():
        raise ModelLoadError(f"bundle '{spec.bundle}': device cuda asked, but this onnxruntime has no CUDA provider "
                             f"(install onnxruntime-gpu)")
    try:
        manifest = read_manifest(spec.bundle)
        size = int(manifest["preprocess"]["size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load bundle '{spec.bundle}': {exc}") from exc
    try:
        adapt_defaults, ignored = edge_settings(recorded_adaptation(manifest), dict(spec.adaptation), size)
    except ValueError as exc:  # adapt.settings.FieldError included
        raise ModelLoadError(f"bundle '{spec.bundle}': {exc}") from None
    # The server renders views on its CPU beside the graph too, so its defaults decide how the graph's
    # workers wait; requests pick their method, so defaults of no adaptation count as GS-Bias's views.
    adapting = adapt_defaults.replace(method="gs_bias") if adapt_defaults.method == "none" else adapt_defaults
    try:
        edge = EdgeModel(spec.bundle, None if spec.device == "auto" else _PROVIDERS[spec.device],
                         spin=spin_while_adapting(adapting))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load bundle '{spec.bundle}': {exc}") from exc
    if ignored:
        logging.getLogger(__name__).warning("bundle %s: recorded adaptation setting(s) not applied: %s",
                                            spec.bundle, ", ".join(ignored))
    fixed = tuple(FixedLabelSet(name, tuple(edge.label_set(name)[0]), tuple(edge.templates[name]),
                                torch.from_numpy(edge.label_set(name)[1].copy()))
                  for name in edge.label_set_names)
    return BundleModel(
        name=spec.name or f"{edge.name}-{_bits(edge)}", fingerprint=_fingerprint(edge),
        embed_dim=int(edge.manifest["model"]["embed_dim"]), image_size=edge.image_size,
        logit_scale=edge.logit_scale, logit_bias=edge.logit_bias,
        mean=tuple(float(x) for x in edge.pre["mean"]), std=tuple(float(x) for x in edge.pre["std"]),
        device=torch.device("cpu"), adapt_defaults=adapt_defaults, source=spec.bundle.rstrip("/").rsplit("/", 1)[-1],
        fixed_label_sets=fixed, edge=edge)
