"""The model interface adaptation runs against: an image encoder, optionally a text tower, fixed label sets.

Two implementations live in compression/: `TorchModel` (an open_clip model, optionally with CLS-guided
token compression) and `BundleModel` (an exported ONNX bundle run by onnxruntime, which has no text
tower and classifies with the label sets it carries). The server hosts either; the accuracy harness
evaluates either. Nothing here knows which implementation it talks to: what a model can do is said by
`text`, `has_patches`, `compressor` and `fixed_label_sets`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from adaptclip.adapt.methods import TextSide
from adaptclip.adapt.settings import AdaptSettings, FieldError, validate_keep_rate
from adaptclip.kernels.backend import KernelBackends


class Unsupported(Exception):
    """A valid request this model cannot serve (TPT or a new label set without a text tower, ...)."""


class TextTower(Protocol):
    """A model's text side: embeddings, zero-shot classifiers, and what TPT needs to tune prompts."""

    def encode(self, texts: Sequence[str], normalize: bool = True) -> Tensor: ...
    def classifier(self, labels: Sequence[str], templates: Sequence[str]) -> Tensor: ...
    def prompt_side(self, labels: Sequence[str]) -> TextSide: ...


class Compressor(Protocol):
    """CLS-guided token compression of an image tower (compression.tokens.TokenCompressor)."""

    reduce_at: tuple[int, ...]
    fuse: bool
    score_layers: int

    def schedule(self, keep_rate: float) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class FixedLabelSet:
    """A label set a model carries with its classifier precomputed (an exported bundle's)."""

    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...]
    classifier: Tensor  # [C, D] L2-normalised


@dataclass(eq=False)
class EncoderModel(ABC):
    """What every hosted model is: its identity, preprocessing and encoder, its classifiers, its defaults."""

    name: str
    fingerprint: str  # changes whenever the weights (or the exported graph) change
    embed_dim: int
    image_size: int
    logit_scale: float
    logit_bias: float | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    adapt_defaults: AdaptSettings
    source: str = ""  # pretrained tag, checkpoint or bundle file name (no full paths)
    random_init: bool = False
    keep_rate: float = 1.0  # default token keep rate for requests that do not set one
    text: TextTower | None = None
    compressor: Compressor | None = None
    fixed_label_sets: tuple[FixedLabelSet, ...] = field(default=())
    kernels: KernelBackends = field(default_factory=KernelBackends)  # torch or Triton per hot path

    @property
    @abstractmethod
    def runtime(self) -> str:
        """'torch', or 'onnxruntime:<providers>'."""

    @property
    @abstractmethod
    def precision(self) -> str:
        """fp32 / fp16 / bf16, or the bundle's bit widths (w8a8, ...)."""

    @property
    @abstractmethod
    def has_patches(self) -> bool:
        """Whether encode_images can return patch features (GS-Bias's spatial bias)."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Tensor:
        """The model's own inference transform: [3, S, S] float, normalised."""

    @abstractmethod
    def encode_images(self, images: Tensor, with_patches: bool = False,
                      keep_rate: float = 1.0) -> tuple[Tensor, Tensor | None]:
        """[N, 3, S, S] preprocessed -> fp32 CPU features [N, D] (+ patches [N, P, D] when asked and
        available), not normalised."""

    def close(self) -> None:
        """Free what the model holds beyond memory (sessions, threads)."""

    def _fixed(self, labels: Sequence[str], templates: Sequence[str]) -> FixedLabelSet | None:
        return next((f for f in self.fixed_label_sets
                     if f.labels == tuple(labels) and f.templates == tuple(templates)), None)

    def can_classify(self, labels: Sequence[str], templates: Sequence[str]) -> bool:
        """Any label set with a text tower; otherwise only the ones the model carries."""
        return self.text is not None or self._fixed(labels, templates) is not None

    def classifier(self, labels: Sequence[str], templates: Sequence[str]) -> Tensor:
        """[C, D] zero-shot classifier: a carried one when it matches, else built by the text tower."""
        fixed = self._fixed(labels, templates)
        if fixed is not None:
            return fixed.classifier
        if self.text is None:
            raise Unsupported(f"model '{self.name}' has no text tower and carries no label set with these labels "
                              f"and templates")
        return self.text.classifier(labels, templates)

    def check_keep_rate(self, value: float, field: str) -> float:
        """A keep rate this model can run (FieldError naming `field` otherwise), rounded to float32 as
        the proto field carries it, so a request's 0.7 and the config's 0.7 share encoder batches."""
        rate = float(np.float32(validate_keep_rate(value, field)))
        if rate < 1.0 and self.compressor is None:
            raise FieldError(field, f"model '{self.name}' has no token compression (its image tower cannot "
                                    f"drop tokens)")
        return rate

    def logits(self, feats: Tensor, classifier: Tensor) -> Tensor:
        """Zero-shot logits of normalised features exactly as open_clip computes them: own scale (and bias)."""
        out = self.logit_scale * feats @ classifier.T
        return out + self.logit_bias if self.logit_bias is not None else out
