"""Test-time adaptation math for the torch-free edge runner: GS-Bias and ZERO in numpy.

Each function equals a torch one, tested to 1e-4 on logits (tests/test_edge_adapt.py):

- `gs_bias`                   = `adaptclip.adapt.gsbias.gs_bias` (same loop, same deliberate deviations
                                from the official code: at least one kept view, stable sort, early
                                stop `|H_t - H_0| > 0.25 |H_0|` checked before the update, top-K once)
- `zero_logits`               = `adaptclip.adapt.peers.zero_logits` (including its tie-break walk)
- `marginal_entropy_and_grad` = `adaptclip.adapt.selection.marginal_entropy_and_grad`
- `view_entropy`, `kept_count`, `confident_order`, `confident_views`, `normalized_entropy`
                              = their namesakes in `adaptclip.adapt.selection`

Everything is computed in float64 whatever the input dtype. The torch path runs in float32, whose
rounding moves logits by ~1e-5 at logit scale 100; a float32 numpy copy would add its own, different
rounding of the same size (BLAS order differs), so neither precision reproduces torch bit for bit.
float64 makes the edge answer the exact-arithmetic one to ~1e-12, so its gap to torch is torch's own
error alone, and the discrete choices (entropy ranking, top-K patches, early stop) are decided on
values that do not depend on the CPU. The cost is negligible beside the encoder: [V, C] and [P, C]
matrices, one matmul each (14 ms for V=64, P=196, C=1000, D=512, T=1 on one core).
The one place float32 and float64 part: a view so confident that its float32 softmax underflows (top-2
logit gap beyond ~90) gets a zero or denormal entropy in torch, so torch ranks such views by rounding
and this module by their true entropies (seen only with synthetic logits, e.g. N(0, 1) x 100).
Importing this module must never pull torch or grpc.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The official loop stops once the global loss moved more than 25 % from its first value.
_EARLY_STOP_FRACTION = 0.25
_DTYPE = np.float64


@dataclass(frozen=True)
class GSBiasResult:
    """Adapted logits of view 0 plus what produced them, as `adaptclip.adapt.gsbias.GSBiasResult`.

    Shapes: [C] / [C] / [C] / int unbatched, [B, C] / [B, C] / [B, C] / [B] int64 batched.
    """

    logits: np.ndarray
    global_bias: np.ndarray
    spatial_bias: np.ndarray
    steps_run: np.ndarray | int


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.exp(x - top).sum(axis=axis)) + np.squeeze(top, axis=axis)


def view_entropy(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy of each row of `logits` [..., V, C] -> [..., V] (float64)."""
    log_p = _log_softmax(np.asarray(logits, _DTYPE))
    return -(np.exp(log_p) * log_p).sum(axis=-1)


def normalized_entropy(logits: np.ndarray) -> float:
    """Entropy of softmax(logits) [C] divided by log(C): 0 = certain, 1 = uniform (the confidence gate)."""
    n_classes = np.shape(logits)[-1]
    if n_classes < 2:
        return 0.0
    return float(view_entropy(logits) / math.log(n_classes))


def kept_count(n_views: int, ratio: float) -> int:
    """How many confident views a selection keeps: official `int(V * ratio)`, at least one."""
    return max(1, int(n_views * ratio))


def confident_order(logits: np.ndarray) -> np.ndarray:
    """View indices [..., V] by increasing entropy; a stable sort, so ties go to the lower index."""
    return np.argsort(view_entropy(logits), axis=-1, kind="stable")


def confident_views(logits: np.ndarray, ratio: float) -> np.ndarray:
    """Indices [..., k] of the k = kept_count(V, ratio) lowest-entropy views, most confident first."""
    return confident_order(logits)[..., :kept_count(np.shape(logits)[-2], ratio)]


def marginal_entropy_and_grad(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marginal entropy of `logits` [..., N, C] and its gradient w.r.t. a bias [..., C] added to every
    row, in closed form (log-sum-exp form with the official finfo.min clamp):
    dH/db_j = mean_v p_vj * (sum_c p_vc log p̄_c - log p̄_j). Returns (H [...], grad [..., C])."""
    logits = np.asarray(logits, _DTYPE)
    if logits.ndim < 2 or logits.shape[-2] == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., N, C] with N, C >= 1, got {logits.shape}")
    log_p = _log_softmax(logits)
    p = np.exp(log_p)
    log_p_bar = _logsumexp(log_p, axis=-2) - math.log(logits.shape[-2])
    log_p_bar = np.maximum(log_p_bar, np.finfo(_DTYPE).min)
    entropy = -(np.exp(log_p_bar) * log_p_bar).sum(axis=-1)
    cross = (p * log_p_bar[..., None, :]).sum(axis=-1, keepdims=True)  # sum_c p_vc log p̄_c
    grad = (p * (cross - log_p_bar[..., None, :])).mean(axis=-2)
    return entropy, grad


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _int_at_least(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_ratio(selection_ratio: float) -> float:
    if not 0.0 < _finite("selection_ratio", selection_ratio) <= 1.0:
        raise ValueError(f"selection_ratio must be in (0, 1], got {selection_ratio!r}")
    return float(selection_ratio)


def _validate(feats: np.ndarray, patches: np.ndarray | None, weights: np.ndarray, *, logit_scale: float,
              selection_ratio: float, steps: int, alpha: float, beta: float, top_k_patches: int,
              momentum: float) -> None:
    """The checks of the torch `_validate`, in its order and with its messages."""
    if feats.ndim not in (2, 3) or feats.shape[-2] < 1:
        raise ValueError(f"view_feats must be [V, D] or [B, V, D] with V >= 1, got {feats.shape}")
    if weights.ndim != 2 or weights.shape[0] < 1:
        raise ValueError(f"text_classifier must be [C, D] with C >= 1, got {weights.shape}")
    if weights.shape[1] != feats.shape[-1]:
        raise ValueError(f"text_classifier has D={weights.shape[1]} but view_feats has D={feats.shape[-1]}")
    if patches is not None:
        if patches.ndim != feats.ndim or patches.shape[-2] < 1:
            raise ValueError(f"patch_feats must be [P, D] (or [B, P, D] when view_feats is batched) with "
                             f"P >= 1, got {patches.shape}")
        if patches.shape[-1] != feats.shape[-1]:
            raise ValueError(f"patch_feats has D={patches.shape[-1]} but view_feats has D={feats.shape[-1]}")
        if patches.ndim == 3 and patches.shape[0] != feats.shape[0]:
            raise ValueError(f"patch_feats has batch {patches.shape[0]} but view_feats has batch {feats.shape[0]}")
    if _finite("logit_scale", logit_scale) <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale!r}")
    _check_ratio(selection_ratio)
    _int_at_least("steps", steps, 0)
    _finite("alpha", alpha)
    _finite("beta", beta)
    _int_at_least("top_k_patches", top_k_patches, 1)
    if not 0.0 <= _finite("momentum", momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")


def _top_patch_logits(patch_feats: np.ndarray, weights: np.ndarray, logit_scale: float,
                      top_k: int) -> np.ndarray:
    """Logits [B, K, C] of the K most salient patches (per class a softmax over patches, summed).

    The spatial bias is constant over patches, so the set is computed once. Exact saliency ties go
    to the lower patch index (torch.topk leaves them unspecified)."""
    all_logits = logit_scale * patch_feats @ weights.T  # [B, P, C]
    log_p = _log_softmax(np.swapaxes(all_logits, -1, -2))  # softmax over the P patches
    saliency = np.exp(log_p).sum(axis=-2)  # [B, P]
    top = np.argsort(-saliency, axis=-1, kind="stable")[:, :min(top_k, all_logits.shape[1])]
    return np.take_along_axis(all_logits, top[..., None], axis=1)


def gs_bias(view_feats: np.ndarray, patch_feats: np.ndarray | None, text_classifier: np.ndarray, *,
            logit_scale: float = 100.0, selection_ratio: float = 0.1, steps: int = 1,
            alpha: float = 10.0, beta: float = 1.0, top_k_patches: int = 16,
            momentum: float = 0.9) -> GSBiasResult:
    """GS-Bias on one image ([V, D], [P, D] or None) or a batch ([B, V, D], [B, P, D] or None).

    Same arguments and result as the torch `gs_bias`: L2-normalised view features (view 0 the
    original), patch features of view 0 (None: global bias only, spatial bias stays zero),
    [C, D] L2-normalised classifier. Early stop is per image, so a batch equals its images one by one.
    """
    feats = np.asarray(view_feats, _DTYPE)
    weights = np.asarray(text_classifier, _DTYPE)
    patches = None if patch_feats is None else np.asarray(patch_feats, _DTYPE)
    _validate(feats, patches, weights, logit_scale=logit_scale, selection_ratio=selection_ratio, steps=steps,
              alpha=alpha, beta=beta, top_k_patches=top_k_patches, momentum=momentum)
    batched = feats.ndim == 3
    if not batched:
        feats = feats[None]
        patches = None if patches is None else patches[None]
    view_logits = logit_scale * feats @ weights.T  # [B, V, C]
    patch_logits = None if patches is None else _top_patch_logits(patches, weights, logit_scale, top_k_patches)

    bias_g = np.zeros((view_logits.shape[0], view_logits.shape[2]), _DTYPE)  # [B, C]
    bias_s = np.zeros_like(bias_g)
    hist_g, hist_s = bias_g, bias_s  # at step 0 the history is the bias itself
    active = np.ones(len(bias_g), bool)
    steps_run = np.zeros(len(bias_g), np.int64)
    first_loss = None
    for step in range(steps):
        cur_g = momentum * bias_g + (1 - momentum) * hist_g
        cur_s = momentum * bias_s + (1 - momentum) * hist_s
        logits = view_logits + cur_g[:, None]
        kept = np.take_along_axis(logits, confident_views(logits, selection_ratio)[..., None], axis=1)
        loss_g, grad_g = marginal_entropy_and_grad(kept)
        if first_loss is None:
            first_loss = loss_g
        else:  # checked before this step's update, as in the official loop's `break`
            active &= ~(np.abs(loss_g - first_loss) > _EARLY_STOP_FRACTION * np.abs(first_loss))
        live = active[:, None]
        slope = 1.0 if step == 0 else momentum  # d cur / d b: 1 while the history is b itself
        hist_g = np.where(live, cur_g, hist_g)
        bias_g = np.where(live, bias_g - alpha * slope * grad_g, bias_g)
        if patch_logits is not None:
            _, grad_s = marginal_entropy_and_grad(patch_logits + cur_s[:, None])
            hist_s = np.where(live, cur_s, hist_s)
            bias_s = np.where(live, bias_s - beta * slope * grad_s, bias_s)
        steps_run += active

    hist_g = momentum * bias_g + (1 - momentum) * hist_g
    hist_s = momentum * bias_s + (1 - momentum) * hist_s
    adapted = view_logits[:, 0] + hist_g + hist_s
    if not batched:
        return GSBiasResult(adapted[0], hist_g[0], hist_s[0], int(steps_run[0]))
    return GSBiasResult(adapted, hist_g, hist_s, steps_run)


def zero_logits(view_logits: np.ndarray, selection_ratio: float = 0.3) -> np.ndarray:
    """ZERO: vote shares [C] (or [B, C]) of the argmaxes of the most confident views [V, C] / [B, V, C].

    As the torch `zero_logits`: keep the kept_count(V, ratio) lowest-entropy views, count their
    argmax votes; a tie between the most-voted classes goes to the first tied class met walking the
    discarded views by increasing entropy, then the kept ones (one extra vote). Exact logit ties
    within a view go to the lowest class index. float64 out.
    """
    logits = np.asarray(view_logits, _DTYPE)
    if logits.ndim not in (2, 3) or 0 in logits.shape:
        raise ValueError(f"view_logits must be [V, C] or [B, V, C], got {logits.shape}")
    _check_ratio(selection_ratio)
    batch = logits if logits.ndim == 3 else logits[None]
    n_classes = batch.shape[-1]
    k = kept_count(batch.shape[-2], selection_ratio)
    preds = np.take_along_axis(batch.argmax(axis=-1), confident_order(batch), axis=1)  # most confident first
    votes = (preds[:, :k, None] == np.arange(n_classes)).sum(axis=1).astype(_DTYPE)  # [B, C]
    tied = votes == votes.max(axis=-1, keepdims=True)
    walk = np.concatenate([preds[:, k:], preds[:, :k]], axis=1)
    hits = np.take_along_axis(tied, walk, axis=1)  # does this view vote for a tied class?
    winner = np.take_along_axis(walk, hits.argmax(axis=1)[:, None], axis=1)[:, 0]  # first hit
    votes[np.arange(len(votes)), winner] += tied.sum(axis=-1) > 1
    probs = votes / votes.sum(axis=-1, keepdims=True)
    return probs if logits.ndim == 3 else probs[0]
