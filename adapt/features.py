"""Image features for adaptation: global embeddings of every view, patch embeddings for GS-Bias.

GS-Bias scores patches in the joint space, so every patch token goes through the same ln_post and
projection as the CLS token. open_clip's `output_tokens=True` gives tokens after ln_post but
before `proj`; the projection is applied here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def supports_patches(model: nn.Module) -> bool:
    """True for open_clip VisionTransformer towers (CLS pooling with a projection)."""
    visual = getattr(model, "visual", model)
    return hasattr(visual, "output_tokens") and getattr(visual, "proj", None) is not None \
        and getattr(visual, "attn_pool", None) is None


@torch.inference_mode()
def image_features(model: nn.Module, images: Tensor, with_patches: bool) -> tuple[Tensor, Tensor | None]:
    """[N, 3, S, S] -> (global [N, D], patches [N, P, D] or None), both unnormalised.

    Toggling `output_tokens` is safe because each model's encoder runs on one thread.
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
