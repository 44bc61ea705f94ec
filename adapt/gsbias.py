"""GS-Bias: global and spatial logit biases learned per image at test time (ICML 2025).

Follows the official loop (GitHub hzhxmu/GS-Bias, run_gsbias.py) step for step, but with the
closed-form gradient of the marginal entropy instead of autograd, so no graph is built and
nothing flows through the model. Deviations from the official code, all deliberate:

- The official code computes logits in fp16 (`.half()`); here everything runs in the input
  dtype promoted to at least float32, for reproducible early stops across devices.
- The official confidence selection keeps `int(V * ratio)` views and breaks (NaN loss) when that
  is 0; here it is clamped to at least one view.
- The official early stop divides by the first loss (ZeroDivisionError when it is exactly 0);
  here the test is `|H_t - H_0| > 0.25 |H_0|`, which is the same otherwise and stops on any
  movement when H_0 == 0.
- The official `argsort` of the view entropies is not stable; here it is, so ties resolve
  deterministically (lowest view index first).
- The official top-K saliency re-runs every step on logits that include the current spatial
  bias; the bias is constant over patches, so a softmax over patches ignores it and the top-K
  set is computed once (mathematically identical).

`backend="triton"` (or "auto" with CUDA features) runs the same loop as adaptclip.kernels.gsbias's
fused kernels (equal to 1e-4 in fp32), for up to its MAX_VIEWS views and MAX_PATCHES patches; larger
inputs run here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adaptclip.adapt.selection import confident_views, marginal_entropy_and_grad
from adaptclip.kernels.backend import resolve

# The official loop stops once the global loss moved more than 25 % from its first value.
_EARLY_STOP_FRACTION = 0.25


@dataclass(frozen=True)
class GSBiasResult:
    """Adapted logits of view 0 plus what produced them, for diagnostics.

    `global_bias` / `spatial_bias` are the momentum-averaged biases actually added to the logits
    (the official `prompt_history_*` after the loop). `steps_run` counts the gradient updates each
    image received: `steps` unless the early stop fired first. Shapes: [C] / [C] / [] unbatched,
    [B, C] / [B, C] / [B] batched.
    """

    logits: Tensor
    global_bias: Tensor
    spatial_bias: Tensor
    steps_run: Tensor


def _check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _validate(view_feats: Tensor, patch_feats: Tensor | None, text_classifier: Tensor, *,
              logit_scale: float, selection_ratio: float, steps: int, alpha: float, beta: float,
              top_k_patches: int, momentum: float) -> None:
    """Reject bad shapes and hyper-parameters up front, naming the offending argument."""
    if view_feats.ndim not in (2, 3) or view_feats.shape[-2] < 1:
        raise ValueError(f"view_feats must be [V, D] or [B, V, D] with V >= 1, got {tuple(view_feats.shape)}")
    if text_classifier.ndim != 2 or text_classifier.shape[0] < 1:
        raise ValueError(f"text_classifier must be [C, D] with C >= 1, got {tuple(text_classifier.shape)}")
    if text_classifier.shape[1] != view_feats.shape[-1]:
        raise ValueError(f"text_classifier has D={text_classifier.shape[1]} but view_feats has "
                         f"D={view_feats.shape[-1]}")
    if patch_feats is not None:
        if patch_feats.ndim != view_feats.ndim or patch_feats.shape[-2] < 1:
            raise ValueError(f"patch_feats must be [P, D] (or [B, P, D] when view_feats is batched) with "
                             f"P >= 1, got {tuple(patch_feats.shape)}")
        if patch_feats.shape[-1] != view_feats.shape[-1]:
            raise ValueError(f"patch_feats has D={patch_feats.shape[-1]} but view_feats has "
                             f"D={view_feats.shape[-1]}")
        if patch_feats.ndim == 3 and patch_feats.shape[0] != view_feats.shape[0]:
            raise ValueError(f"patch_feats has batch {patch_feats.shape[0]} but view_feats has "
                             f"batch {view_feats.shape[0]}")
    if _check_finite("logit_scale", logit_scale) <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale!r}")
    if not 0.0 < _check_finite("selection_ratio", selection_ratio) <= 1.0:
        raise ValueError(f"selection_ratio must be in (0, 1], got {selection_ratio!r}")
    _check_int("steps", steps, 0)
    _check_finite("alpha", alpha)
    _check_finite("beta", beta)
    _check_int("top_k_patches", top_k_patches, 1)
    if not 0.0 <= _check_finite("momentum", momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")


@torch.no_grad()
def gs_bias(view_feats: Tensor, patch_feats: Tensor | None, text_classifier: Tensor, *,
            logit_scale: float = 100.0, selection_ratio: float = 0.1, steps: int = 1,
            alpha: float = 10.0, beta: float = 1.0, top_k_patches: int = 16,
            momentum: float = 0.9, backend: str = "torch") -> GSBiasResult:
    """Run GS-Bias on one image ([V, D], [P, D]) or a batch ([B, V, D], [B, P, D]).

    view_feats: L2-normalised global features of the V views, view 0 the original.
    patch_feats: L2-normalised patch features of the original view (through ln_post and proj),
        or None for global-only adaptation: the spatial bias then stays zero.
    text_classifier: [C, D] L2-normalised class embeddings.
    selection_ratio: fraction of lowest-entropy views kept for the global loss; `int(V * ratio)`
        as in the official code, clamped to at least 1 view.
    top_k_patches: most salient patches kept for the spatial loss; clamped to P when larger.
    Early stop is decided per image, so a batch gives the same result as its images one by one.
    backend: "torch", "triton" or "auto", on view_feats' device (see the module docstring).
    Returns the adapted logits `s * f_0 W^T + b_g + b_s` and diagnostics (see GSBiasResult).
    """
    _validate(view_feats, patch_feats, text_classifier, logit_scale=logit_scale,
              selection_ratio=selection_ratio, steps=steps, alpha=alpha, beta=beta,
              top_k_patches=top_k_patches, momentum=momentum)
    if resolve(backend, view_feats.device) == "triton":
        from adaptclip.kernels import gsbias as fused

        n_patches = 0 if patch_feats is None else patch_feats.shape[-2]
        if view_feats.shape[-2] <= fused.MAX_VIEWS and n_patches <= fused.MAX_PATCHES:
            return GSBiasResult(*fused.gs_bias(
                view_feats, patch_feats, text_classifier, logit_scale=logit_scale, selection_ratio=selection_ratio,
                steps=steps, alpha=alpha, beta=beta, top_k_patches=top_k_patches, momentum=momentum))
    batched = view_feats.ndim == 3
    dtype = torch.promote_types(view_feats.dtype, torch.float32)
    device = view_feats.device
    feats = (view_feats if batched else view_feats.unsqueeze(0)).to(dtype)
    weights = text_classifier.to(device=device, dtype=dtype)
    n_batch = feats.shape[0]
    n_classes = weights.shape[0]

    view_logits = logit_scale * feats @ weights.T  # [B, V, C]
    patch_logits = None
    if patch_feats is not None:
        patches = (patch_feats if batched else patch_feats.unsqueeze(0)).to(device=device, dtype=dtype)
        all_patch_logits = logit_scale * patches @ weights.T  # [B, P, C]
        # Saliency: per class a softmax over the patches, summed over classes.
        saliency = torch.softmax(all_patch_logits, dim=-2).sum(dim=-1)  # [B, P]
        k_patches = min(top_k_patches, all_patch_logits.shape[1])
        top = torch.topk(saliency, k=k_patches, dim=-1).indices
        patch_logits = torch.gather(all_patch_logits, 1, top.unsqueeze(-1).expand(-1, -1, n_classes))

    bias_g = torch.zeros(n_batch, n_classes, device=device, dtype=dtype)
    bias_s = torch.zeros_like(bias_g)
    hist_g, hist_s = bias_g, bias_s  # at step 0 the history is the bias itself
    active = torch.ones(n_batch, dtype=torch.bool, device=device)
    steps_run = torch.zeros(n_batch, dtype=torch.long, device=device)
    first_loss = None
    for step in range(steps):
        cur_g = momentum * bias_g + (1 - momentum) * hist_g
        cur_s = momentum * bias_s + (1 - momentum) * hist_s

        logits = view_logits + cur_g.unsqueeze(1)
        keep = confident_views(logits, selection_ratio)
        kept = torch.gather(logits, 1, keep.unsqueeze(-1).expand(-1, -1, n_classes))
        loss_g, grad_g = marginal_entropy_and_grad(kept)

        if step == 0:
            first_loss = loss_g
        else:  # checked before this step's update, as in the official loop's `break`
            active &= ~((loss_g - first_loss).abs() > _EARLY_STOP_FRACTION * first_loss.abs())
        live = active.unsqueeze(-1)
        # d cur / d b is 1 at step 0 (history == b) and `momentum` afterwards.
        slope = 1.0 if step == 0 else momentum
        hist_g = torch.where(live, cur_g, hist_g)
        bias_g = torch.where(live, bias_g - alpha * slope * grad_g, bias_g)
        if patch_logits is not None:
            _, grad_s = marginal_entropy_and_grad(patch_logits + cur_s.unsqueeze(1))
            hist_s = torch.where(live, cur_s, hist_s)
            bias_s = torch.where(live, bias_s - beta * slope * grad_s, bias_s)
        steps_run += active.long()

    hist_g = momentum * bias_g + (1 - momentum) * hist_g
    hist_s = momentum * bias_s + (1 - momentum) * hist_s
    adapted = view_logits[:, 0] + hist_g + hist_s
    if not batched:
        return GSBiasResult(adapted[0], hist_g[0], hist_s[0], steps_run[0])
    return GSBiasResult(adapted, hist_g, hist_s, steps_run)


def gs_bias_logits(view_feats: Tensor, patch_feats: Tensor | None, text_classifier: Tensor, *,
                   logit_scale: float = 100.0, selection_ratio: float = 0.1, steps: int = 1,
                   alpha: float = 10.0, beta: float = 1.0, top_k_patches: int = 16,
                   momentum: float = 0.9, backend: str = "torch") -> Tensor:
    """Adapted logits of view 0 ([C], or [B, C] batched); see `gs_bias` for the arguments."""
    return gs_bias(view_feats, patch_feats, text_classifier, logit_scale=logit_scale,
                   selection_ratio=selection_ratio, steps=steps, alpha=alpha, beta=beta,
                   top_k_patches=top_k_patches, momentum=momentum, backend=backend).logits
