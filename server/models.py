"""Loading and hosting open_clip models: weights required, preprocessing as open_clip's own."""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import open_clip
import torch
from PIL import Image

from adaptclip.adapt.settings import AdaptSettings, settings_from_dict
from adaptclip.adapt.features import image_features, supports_patches
from adaptclip.compression.tokens import TokenCompressor, validate_keep_rate
from adaptclip.server.batcher import Batcher
from adaptclip.server.config import BatchingConfig, ModelSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message says how to fix it."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def register_model_name(model: str) -> str:
    """open_clip name for `model`: a registry name, or the stem of a JSON config file it registers."""
    path = Path(model)
    if model.endswith(".json"):
        if not path.is_file():
            raise ModelLoadError(f"model config file not found: {model}")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(model) is None and not model.startswith(("hf-hub:", "local-dir:")):
        raise ModelLoadError(f"unknown model '{model}': not an open_clip model name "
                             f"(see open_clip.list_models()) nor a JSON model config file")
    return model


def state_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer: changes whenever the weights change, whatever their source."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class HostedModel:
    """One served model: the open_clip module, its transform and tokenizer, and its batcher."""

    name: str
    spec: ModelSpec
    model: torch.nn.Module | None  # None for an exported bundle (server/bundled.py)
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor] | None
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    embed_dim: int
    image_size: int
    logit_scale: float
    logit_bias: float | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    adapt_defaults: AdaptSettings
    compressor: TokenCompressor | None = None  # None: the tower cannot drop tokens
    batcher: Batcher | None = None
    _executor: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="text"))

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, with_patches: bool = False,
                      keep_rate: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, 3, H, W] preprocessed -> fp32 CPU features [N, D] (+ patches [N, P, D]), not normalised."""
        images = images.to(self.device, self.dtype)
        want = with_patches and self.has_patches
        if keep_rate < 1.0:
            feats, patches = self.compressor.features(images, want, keep_rate)
        else:
            feats, patches = image_features(self.model, images, want)
        return feats.float().cpu(), None if patches is None else patches.float().cpu()

    @property
    def has_patches(self) -> bool:
        return supports_patches(self.model)

    @property
    def has_text(self) -> bool:
        """False for exported bundles: no TPT, no text embeddings, only their own label sets."""
        return True

    @property
    def runtime(self) -> str:
        return "torch"

    @property
    def precision(self) -> str:
        return self.spec.precision

    def supports(self, ls: Any) -> bool:
        """Whether this model can classify with label set `ls` (any, given a text tower)."""
        return True

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=normalize).float().cpu()

    @torch.inference_mode()
    def build_classifier(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        """[C, D] text classifier with open_clip's own conventions (template ensemble, renormalised)."""
        weights = open_clip.build_zero_shot_classifier(
            self.model, self.tokenizer, list(labels), list(templates), num_classes_per_batch=10, device=self.device)
        return weights.T.float().cpu().contiguous()

    def check_keep_rate(self, value: float, field: str) -> float:
        """A valid keep rate this model can run (ValueError naming `field` otherwise), rounded to float32
        as the proto field carries it, so a request's 0.7 and the config's 0.7 share encoder batches."""
        rate = float(np.float32(validate_keep_rate(value, field)))
        if rate < 1.0 and self.compressor is None:
            why = "an exported bundle" if self.runtime != "torch" else "not a plain ViT tower"
            raise ValueError(f"{field}: model '{self.name}' has no token compression ({why})")
        return rate

    def logits(self, feats: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits exactly as open_clip computes them, with the model's own scale (and bias)."""
        out = self.logit_scale * feats @ classifier.T
        return out + self.logit_bias if self.logit_bias is not None else out

    def run_text(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Text-tower work off the event loop, one at a time."""
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def load_model(spec: ModelSpec) -> HostedModel:
    """Create the model and its transforms; refuse to serve unless weights loaded (or random init was asked)."""
    name = register_model_name(spec.model)
    if spec.precision not in _DTYPES:
        raise ModelLoadError(f"precision '{spec.precision}' not supported; use one of {', '.join(_DTYPES)}")
    device = resolve_device(spec.device)
    pretrained = spec.pretrained or None
    if spec.random_init:
        pretrained = None
    elif pretrained is None:
        raise ModelLoadError(f"no weights given for model '{name}': pass --pretrained TAG (an open_clip tag, "
                             f"downloaded) or --pretrained PATH (a local checkpoint); --random-init only for tests")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=spec.precision, device=device,
            require_pretrained=not spec.random_init, pretrained_text=not spec.random_init)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for missing weights
        raise ModelLoadError(
            f"could not load weights '{pretrained}' for model '{name}': {exc}. Offline or no model hub? Download "
            f"the checkpoint elsewhere and pass --pretrained PATH (a local state-dict file); a JSON model config "
            f"goes in --model") from exc
    model.eval()
    cfg = open_clip.get_model_config(name) or {}
    image_size = getattr(model.visual, "image_size", cfg.get("vision_cfg", {}).get("image_size", 224))
    if isinstance(image_size, (tuple, list)):
        image_size = int(image_size[0])
    bias = getattr(model, "logit_bias", None)
    pre_cfg = open_clip.get_model_preprocess_cfg(model)
    try:
        adapt_defaults = settings_from_dict(dict(spec.adaptation))
    except ValueError as exc:
        raise ModelLoadError(f"model '{spec.name or name}': {exc}") from None
    try:
        compressor = TokenCompressor(model, spec.token_reduce_at, spec.token_fuse, spec.token_score_layers)
    except ValueError as exc:
        if spec.keep_rate != 1.0 or spec.token_reduce_at is not None:
            raise ModelLoadError(f"model '{spec.name or name}': token compression: {exc}") from None
        compressor = None
    hosted = HostedModel(
        name=spec.name or name, spec=spec, model=model, preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name), device=device, dtype=_DTYPES[spec.precision],
        fingerprint=state_fingerprint(model), embed_dim=int(cfg.get("embed_dim", 0)) or int(model.text_projection.shape[-1]),
        image_size=int(image_size), logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(bias.item()) if bias is not None else None,
        mean=tuple(float(x) for x in pre_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(x) for x in pre_cfg.get("std", open_clip.OPENAI_DATASET_STD)), adapt_defaults=adapt_defaults,
        compressor=compressor)
    try:
        hosted.check_keep_rate(spec.keep_rate, "keep_rate")
    except ValueError as exc:
        raise ModelLoadError(f"model '{hosted.name}': {exc}") from None
    return hosted


def attach_batcher(hosted: HostedModel, cfg: BatchingConfig) -> None:
    hosted.batcher = Batcher(hosted.encode_images, max_batch=cfg.max_batch_size,
                             max_delay_s=cfg.max_queue_delay_ms / 1000.0, max_queue=cfg.max_queue_size,
                             name=hosted.name)


def warm_up(hosted: HostedModel) -> None:
    """One image and one text forward so the first request does not pay for lazy init."""
    size = hosted.image_size
    hosted.encode_images(torch.zeros(1, 3, size, size))
    if hosted.spec.keep_rate < 1.0:
        hosted.encode_images(torch.zeros(1, 3, size, size), True, hosted.spec.keep_rate)
    if hosted.has_text:
        hosted.encode_texts(["a photo"])
