"""open_clip models behind the `EncoderModel` interface: weights required, preprocessing as open_clip's own,
patch features for GS-Bias, and CLS-guided token compression when the tower allows it.

Model loading lives here, beside the other encoder it competes with (the exported bundle,
compression/bundled.py), so the server, the accuracy harness and the quantiser all load models the
same way without reaching into the transport layer.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from adaptclip.adapt.encoder import EncoderModel
from adaptclip.adapt.methods import TextSide
from adaptclip.adapt.settings import FieldError, settings_from_dict, untuned_defaults
from adaptclip.compression.kernel_check import choose_kernels
from adaptclip.compression.tokens import TokenCompressor, UnsupportedTower
from adaptclip.kernels.backend import BACKENDS
from open_clip import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image
from torch import Tensor, nn

# open_clip's templates are callables; "{}" turns each into a format string.
DEFAULT_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)  # auto: see resolve_precision
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message says how to fix it."""


@dataclass
class ModelSpec:
    """One model to host: an open_clip registry name or a JSON model config file, or an exported bundle."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED  # open_clip tag or local checkpoint path
    name: str | None = None  # served name; defaults to the registry name / JSON file stem
    device: str = "auto"  # auto = CUDA when available
    precision: str = "auto"  # auto (half on CUDA, fp32 on the CPU: resolve_precision) | fp32 | fp16 | bf16
    random_init: bool = False  # serve random weights: only for tests and speed benchmarks
    # Test-time adaptation defaults for this model (AdaptSettings fields), e.g. milder crops for
    # 32-px inputs: {"crop_scale": [0.35, 1.0], "augmix": false}.
    adaptation: dict[str, Any] = field(default_factory=dict)
    # CLS-guided token compression (ViT towers): default keep rate per reduction stage (1.0 = off;
    # requests may ask their own `token_keep_rate`), where to reduce, and how. `token_compression:
    # false` serves a tower whose attention the compressor does not know, without compression.
    keep_rate: float = 1.0
    token_reduce_at: list[int] | None = None  # 0-based blocks; None = after 1/4, 1/2, 3/4 of the depth
    token_fuse: bool = True  # merge dropped tokens into one (EViT)
    token_score_layers: int = 1  # CLS attention summed over this many blocks (VTC-CLS when > 1)
    token_compression: bool = True
    # An exported edge bundle folder (`adaptclip quantize`) served through onnxruntime instead of
    # torch; model/pretrained are then unused and precision must stay auto (the bundle says what it is).
    bundle: str | None = None
    # Triton kernels for view rendering, GS-Bias and token selection: auto (on CUDA when triton
    # imports), torch, or triton; each is checked against torch at load and falls back to it.
    kernels: str = "auto"


def supports_patches(model: nn.Module) -> bool:
    """True for open_clip VisionTransformer towers (CLS pooling with a projection)."""
    visual = getattr(model, "visual", model)
    return hasattr(visual, "output_tokens") and getattr(visual, "proj", None) is not None \
        and getattr(visual, "attn_pool", None) is None


@torch.inference_mode()
def image_features(model: nn.Module, images: Tensor, with_patches: bool) -> tuple[Tensor, Tensor | None]:
    """[N, 3, S, S] -> (global [N, D], patches [N, P, D] or None), both unnormalised.

    GS-Bias scores patches in the joint space, so every patch token goes through the same ln_post and
    projection as the CLS token: open_clip's `output_tokens=True` gives tokens after ln_post but before
    `proj`, which is applied here. Toggling `output_tokens` is safe: each model's encoder runs on one thread.
    """
    visual = model.visual
    if not with_patches:
        return model.encode_image(images), None
    if not supports_patches(model):
        raise ValueError(f"{type(visual).__name__} has no patch tokens; GS-Bias's spatial part needs a ViT tower")
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = False
    return pooled, tokens @ visual.proj


@dataclass
class OpenClipText:
    """An open_clip model's text tower: embeddings, template-ensemble classifiers, TPT's prompt side."""

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], Tensor]
    device: torch.device

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        """[N, D] fp32 on the CPU; normalised in fp32 (a bf16 norm is off by up to 0.4 %)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        feats = self.model.encode_text(tokens).float()
        return (F.normalize(feats, dim=-1) if normalize else feats).cpu()

    @torch.inference_mode()
    def classifier(self, labels: Sequence[str], templates: Sequence[str]) -> Tensor:
        """[C, D] with open_clip's own conventions (template ensemble, renormalised), fp32 on the CPU; the
        last renormalisation is redone in fp32, so a half model's rows are unit vectors too."""
        weights = open_clip.build_zero_shot_classifier(
            self.model, self.tokenizer, list(labels), list(templates), num_classes_per_batch=10, device=self.device)
        return F.normalize(weights.T.float(), dim=-1).cpu().contiguous()

    def prompt_side(self, labels: Sequence[str]) -> TextSide:
        return TextSide(self.model, self.tokenizer, tuple(labels))


@dataclass(eq=False)
class TorchModel(EncoderModel):
    """A served open_clip model: the module, its transform, its text tower, optionally a token compressor."""

    module: nn.Module | None = None
    transform: Callable[[Image.Image], Tensor] | None = None
    dtype: torch.dtype = torch.float32
    spec: ModelSpec = field(default_factory=ModelSpec)

    @property
    def runtime(self) -> str:
        return "torch"

    @property
    def precision(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def has_patches(self) -> bool:
        return supports_patches(self.module)

    def preprocess(self, image: Image.Image) -> Tensor:
        return self.transform(image)

    @torch.inference_mode()
    def encode_images(self, images: Tensor, with_patches: bool = False,
                      keep_rate: float = 1.0) -> tuple[Tensor, Tensor | None]:
        images = images.to(self.device, self.dtype)
        want = with_patches and self.has_patches
        if keep_rate < 1.0:
            feats, patches = self.compressor.features(images, want, keep_rate)
        else:
            feats, patches = image_features(self.module, images, want)
        return feats.float().cpu(), None if patches is None else patches.float().cpu()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a model is served in: `auto` is bf16 on a CUDA GPU that runs it natively (Ampere and
    later), fp16 on an older one, fp32 on the CPU (half matmuls there are emulated and slower); the others
    are taken as given. Either half is open_clip's mixed precision: LayerNorms and embeddings stay fp32."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision '{precision}' not supported; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    with torch.cuda.device(device):
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no emulation and no such argument
            native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "fp16"


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


def state_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer: changes whenever the weights change, whatever their source."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _source_label(spec: ModelSpec) -> str:
    """The tag, or the checkpoint's file name (full paths are the operator's business)."""
    if spec.random_init or not spec.pretrained:
        return ""
    return Path(spec.pretrained).name if "/" in spec.pretrained else spec.pretrained


def _compressor(model: nn.Module, spec: ModelSpec, name: str) -> TokenCompressor | None:
    """The tower's token compressor; None where the tower is not a plain CLS-token ViT or the spec turns it
    off. A ViT whose blocks the compressor does not know fails the load, unless `token_compression: false`."""
    asked = spec.keep_rate != 1.0 or spec.token_reduce_at is not None
    if not spec.token_compression:
        if asked:
            raise ModelLoadError(f"model '{name}': keep_rate / token_reduce_at set with token_compression: false")
        return None
    try:
        return TokenCompressor(model, spec.token_reduce_at, spec.token_fuse, spec.token_score_layers)
    except UnsupportedTower as exc:
        if asked or exc.vit:  # a ViT it cannot run: say so at load, never serve silently without it
            raise ModelLoadError(f"model '{name}': token compression: {exc}"
                                 + ("" if asked else "; set `token_compression: false` in its config entry to "
                                    "serve it without")) from None
        return None
    except ValueError as exc:
        raise ModelLoadError(f"model '{name}': token compression: {exc}") from None


def load_model(spec: ModelSpec) -> TorchModel:
    """Create the model and its transforms; refuse to serve unless weights loaded (or random init was asked)."""
    name = register_model_name(spec.model)
    if spec.kernels not in BACKENDS:
        raise ModelLoadError(f"kernels '{spec.kernels}' not supported; use one of {', '.join(BACKENDS)}")
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    pretrained = None if spec.random_init else (spec.pretrained or None)
    if pretrained is None and not spec.random_init:
        raise ModelLoadError(f"no weights given for model '{name}': pass --pretrained TAG (an open_clip tag, "
                             f"downloaded) or --pretrained PATH (a local checkpoint); --random-init only for tests")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=precision, device=device,
            require_pretrained=not spec.random_init, pretrained_text=not spec.random_init)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for missing weights
        raise ModelLoadError(
            f"could not load weights '{pretrained}' for model '{name}': {exc}. Offline or no model hub? Download "
            f"the checkpoint elsewhere and pass --pretrained PATH (a local state-dict file); a JSON model config "
            f"goes in --model") from exc
    model.eval()
    served = spec.name or name
    cfg = open_clip.get_model_config(name) or {}
    image_size = getattr(model.visual, "image_size", cfg.get("vision_cfg", {}).get("image_size", 224))
    if isinstance(image_size, (tuple, list)):
        image_size = int(image_size[0])
    bias = getattr(model, "logit_bias", None)
    pre_cfg = open_clip.get_model_preprocess_cfg(model)
    try:
        adapt_defaults = settings_from_dict(dict(spec.adaptation), untuned_defaults(int(image_size)))
    except FieldError as exc:
        raise ModelLoadError(f"model '{served}': {exc}") from None
    hosted = TorchModel(
        name=served, fingerprint=state_fingerprint(model),
        embed_dim=int(cfg.get("embed_dim", 0)) or int(model.text_projection.shape[-1]),
        image_size=int(image_size), logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=float(bias.item()) if bias is not None else None,
        mean=tuple(float(x) for x in pre_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(x) for x in pre_cfg.get("std", open_clip.OPENAI_DATASET_STD)), device=device,
        adapt_defaults=adapt_defaults, source=_source_label(spec), random_init=spec.random_init,
        text=OpenClipText(model, open_clip.get_tokenizer(name), device), compressor=_compressor(model, spec, served),
        module=model, transform=preprocess, dtype=DTYPES[precision], spec=spec)
    try:
        hosted.keep_rate = hosted.check_keep_rate(spec.keep_rate, "keep_rate")
    except FieldError as exc:
        raise ModelLoadError(f"model '{hosted.name}': {exc}") from None
    hosted.kernels = choose_kernels(hosted, spec.kernels)
    return hosted
