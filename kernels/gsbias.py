"""GS-Bias for a whole batch of images in four launches, whatever the number of steps.

Why: the torch loop (adaptclip.adapt.gsbias.gs_bias) runs a few dozen small kernels per step
(softmaxes, an argsort, gathers, the closed-form gradient, the momentum updates) plus a top-k
and the two GEMMs, each launch doing microseconds of work. Here:

1. `_logits_kernel` (twice: views, then patches): s * F W^T in fp32, tiled over rows and classes.
   fp16/bf16 inputs of one dtype go to tensor cores with fp32 accumulation (their products are
   exact in fp32); anything else is upcast and multiplied in IEEE fp32 (no TF32).
2. `_saliency_kernel`: per (image, class tile) the softmax over patches of each class, summed
   over the tile's classes: partial saliencies [B, class tiles, P].
3. `_adapt_kernel`, one program per image, looping over class tiles of BLOCK_C (so C is not
   bounded by a block): the top-K patches, then per step the view entropies (online over C),
   the confident views, the marginal entropies and their closed-form gradients, the early stop
   and the momentum updates, then the final logits `s f_0 W^T + h_g + h_s`.

Reference (must equal it to 1e-4 in fp32, logits and biases): `adaptclip.adapt.gsbias.gs_bias`,
same keyword arguments; the result is a `GSBiasOutput` with GSBiasResult's fields in its order
(kernels sit below adapt and cannot import it: `GSBiasResult(*out)` converts). All math is fp32
whatever the input dtype, as there.
Ties: confident views rank by (entropy, view index), as the reference's stable argsort; salient
patches by (-saliency, patch index), where torch.topk leaves ties unspecified. Near-ties (within
rounding) and an early stop that lands on the 25 % threshold within rounding may resolve
differently from the reference, as between any two summation orders.

Limits: V <= 256 views (ranking is a [V, V] comparison in registers), P <= 1024 patches; CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1 (see adaptclip.kernels._common).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from adaptclip.kernels._common import check_device, is_interpreted, launch

_STOP_FRACTION = tl.constexpr(0.25)  # the official loop stops once the global loss moved > 25 % from its first
_FLOAT32_MIN = tl.constexpr(-3.4028234663852886e38)  # torch.finfo(float32).min: the reference's log p̄ clamp
MAX_VIEWS, MAX_PATCHES = 256, 1024  # adapt.gsbias runs larger inputs with torch
_BLOCK_C = 128  # classes per tile of the adaptation loop


class GSBiasOutput(NamedTuple):
    """adaptclip.adapt.gsbias.GSBiasResult's fields, in its order: [C] / [C] / [C] / [] unbatched,
    [B, C] / [B, C] / [B, C] / [B] batched; the biases are the momentum-averaged ones added."""

    logits: Tensor
    global_bias: Tensor
    spatial_bias: Tensor
    steps_run: Tensor


@triton.jit
def _logits_kernel(a, w, out, M, N, K, scale, F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = scale * a[M, K] @ w[N, K]^T, fp32 output; both inputs contiguous."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(a + rm[:, None].to(tl.int64) * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        y = tl.load(w + rn[None, :].to(tl.int64) * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                    other=0.0)
        if F32_DOT:  # scaled first, as the reference's (s * F) @ W^T
            acc = tl.dot(x.to(tl.float32) * scale, y.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, y, acc)
    if not F32_DOT:
        acc = acc * scale
    tl.store(out + rm[:, None].to(tl.int64) * N + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _saliency_kernel(patch_logits, parts, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """parts[b, t, p] = sum over the classes c of tile t of softmax over patches of logits[b, :, c]."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = patch_logits + b * P * C
    col_max = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    col_sum = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, P, BLOCK_P):  # online max / sum of exp over the patches, per class
        rows = p0 + tl.arange(0, BLOCK_P)
        x = tl.load(base + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < P) & cmask[None, :],
                    other=float("-inf"))
        x = tl.where(cmask[None, :], x, 0.0)
        new_max = tl.maximum(col_max, tl.max(x, axis=0))
        col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(x - new_max[None, :]), axis=0)
        col_max = new_max
    out = parts + (b * tl.num_programs(1) + tile) * P
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        x = tl.load(base + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < P) & cmask[None, :], other=0.0)
        soft = tl.where(cmask[None, :], tl.exp(x - col_max[None, :]) / col_sum[None, :], 0.0)
        tl.store(out + rows, tl.sum(soft, axis=1), mask=rows < P)


@triton.jit
def _saliency(parts, idx, valid, P, n_tiles):
    """Saliency of patches idx: the class tiles' partial sums, always added in tile order."""
    total = tl.zeros(idx.shape, tl.float32)
    for t in range(0, n_tiles):
        total += tl.load(parts + t * P + idx, mask=valid, other=0.0)
    return total


@triton.jit
def _top_patches(parts, P, n_tiles, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KP: tl.constexpr):
    """Indices [BLOCK_KP] of the most salient patches, most salient first (ties: lower index)."""
    prow = tl.arange(0, BLOCK_P)
    sal = _saliency(parts, prow, prow < P, P, n_tiles)
    rank = tl.zeros((BLOCK_P,), tl.int32)
    for q0 in range(0, P, BLOCK_Q):  # rank = patches that come before, counted a chunk at a time
        q = q0 + tl.arange(0, BLOCK_Q)
        sq = _saliency(parts, q, q < P, P, n_tiles)
        before = (sq[None, :] > sal[:, None]) | ((sq[None, :] == sal[:, None]) & (q[None, :] < prow[:, None]))
        rank += tl.sum((before & (q[None, :] < P)).to(tl.int32), axis=1)
    slot = tl.arange(0, BLOCK_KP)
    return tl.sum(tl.where((rank[None, :] == slot[:, None]) & (prow[None, :] < P), prow[None, :], 0), axis=1)


@triton.jit
def _cur(bias, hist, cmask, momentum, keep):
    """Momentum-averaged bias of one class tile: r * b + (1 - r) * h, and the stored b and h."""
    b = tl.load(bias, mask=cmask, other=0.0)
    h = tl.load(hist, mask=cmask, other=0.0)
    return momentum * b + keep * h, b, h


@triton.jit
def _marginal(logits, row_max, row_logsum, rmask, cmask, log_n):
    """For a tile of N kept rows: p [rows, BLOCK_C] and log p̄ [BLOCK_C] (log mean softmax, clamped).

    log p = (l - max) - log sum exp(l - max), never l - lse: lse ~ logit scale would cost its ulp.
    """
    lp = tl.where(rmask[:, None], (logits - row_max[:, None]) - row_logsum[:, None], float("-inf"))
    lp = tl.where(cmask[None, :], lp, 0.0)  # padding classes stay finite; callers mask them out
    top = tl.max(lp, axis=0)
    log_p_bar = top + tl.log(tl.sum(tl.exp(lp - top[None, :]), axis=0)) - log_n
    return tl.exp(lp), tl.maximum(log_p_bar, _FLOAT32_MIN)


@triton.jit
def _online_lse(row_max, row_sum, x):
    """One tile of an online log-sum-exp over columns (x: -inf where padded)."""
    new_max = tl.maximum(row_max, tl.max(x, axis=1))
    return new_max, row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)


@triton.jit
def _adapt_kernel(view_logits, patch_logits, parts, bias_g, hist_g, bias_s, hist_s, logits_out, steps_out,
                  V, C, P, n_tiles, k_views, k_patches, steps, alpha, beta, momentum, keep, log_kv, log_kp,
                  HAS_PATCHES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_KV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KP: tl.constexpr):
    """The GS-Bias loop of one image; the biases live in the [B, C] state buffers between passes."""
    b = tl.program_id(0).to(tl.int64)
    vl = view_logits + b * V * C
    pl = patch_logits + b * P * C
    bg, hg, bs, hs = bias_g + b * C, hist_g + b * C, bias_s + b * C, hist_s + b * C
    vrow = tl.arange(0, BLOCK_V)
    kv_valid = tl.arange(0, BLOCK_KV) < k_views
    kp_valid = tl.arange(0, BLOCK_KP) < k_patches
    if HAS_PATCHES:
        kp_rows = _top_patches(parts + b * n_tiles * P, P, n_tiles, BLOCK_P, BLOCK_Q, BLOCK_KP)
    else:
        kp_rows = tl.zeros((BLOCK_KP,), tl.int32)
    first = 0.0
    active = 1
    steps_run = 0
    for step in range(steps):
        # Pass A: every view's entropy (online over classes) and the kept patches' log-sum-exp.
        v_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
        v_sum = tl.zeros((BLOCK_V,), tl.float32)
        v_dot = tl.zeros((BLOCK_V,), tl.float32)  # sum_c exp(l - max) * (l - max)
        p_max = tl.full((BLOCK_KP,), float("-inf"), tl.float32)
        p_sum = tl.zeros((BLOCK_KP,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            cur_g, _, _ = _cur(bg + cols, hg + cols, cmask, momentum, keep)
            x = tl.load(vl + vrow[:, None] * C + cols[None, :], mask=(vrow[:, None] < V) & cmask[None, :], other=0.0)
            x = tl.where(cmask[None, :], x + cur_g[None, :], float("-inf"))
            new_max = tl.maximum(v_max, tl.max(x, axis=1))
            d = tl.where(cmask[None, :], x - new_max[:, None], 0.0)
            e = tl.where(cmask[None, :], tl.exp(d), 0.0)
            shift = tl.where(v_sum > 0, v_max - new_max, 0.0) * v_sum  # 0 on the first tile (max -inf)
            v_dot = tl.exp(v_max - new_max) * (v_dot + shift) + tl.sum(e * d, axis=1)
            v_sum = tl.exp(v_max - new_max) * v_sum + tl.sum(e, axis=1)
            v_max = new_max
            if HAS_PATCHES:
                cur_s, _, _ = _cur(bs + cols, hs + cols, cmask, momentum, keep)
                y = tl.load(pl + kp_rows[:, None] * C + cols[None, :], mask=kp_valid[:, None] & cmask[None, :],
                            other=0.0)
                p_max, p_sum = _online_lse(p_max, p_sum, tl.where(cmask[None, :], y + cur_s[None, :], float("-inf")))
        entropy = tl.where(vrow < V, tl.log(v_sum) - v_dot / v_sum, float("inf"))
        if HAS_PATCHES:
            p_logsum = tl.log(p_sum)

        # The k_views most confident views, most confident first (stable: ties to the lower index).
        before = (entropy[None, :] < entropy[:, None]) | (
            (entropy[None, :] == entropy[:, None]) & (vrow[None, :] < vrow[:, None]))
        rank = tl.sum((before & (vrow[None, :] < V)).to(tl.int32), axis=1)
        pick = (rank[None, :] == tl.arange(0, BLOCK_KV)[:, None]) & (vrow[None, :] < V)
        kv_rows = tl.sum(tl.where(pick, vrow[None, :], 0), axis=1)
        kv_max = tl.sum(tl.where(pick, v_max[None, :], 0.0), axis=1)
        kv_logsum = tl.sum(tl.where(pick, tl.log(v_sum)[None, :], 0.0), axis=1)

        # Pass B: marginal entropies and sum_c p_vc log p̄_c of the kept rows.
        loss_g = 0.0
        cross_g = tl.zeros((BLOCK_KV,), tl.float32)
        cross_s = tl.zeros((BLOCK_KP,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            cur_g, _, _ = _cur(bg + cols, hg + cols, cmask, momentum, keep)
            x = tl.load(vl + kv_rows[:, None] * C + cols[None, :], mask=kv_valid[:, None] & cmask[None, :], other=0.0)
            p, log_p_bar = _marginal(x + cur_g[None, :], kv_max, kv_logsum, kv_valid, cmask, log_kv)
            loss_g -= tl.sum(tl.where(cmask, tl.exp(log_p_bar) * log_p_bar, 0.0), axis=0)
            cross_g += tl.sum(tl.where(cmask[None, :], p * log_p_bar[None, :], 0.0), axis=1)
            if HAS_PATCHES:
                cur_s, _, _ = _cur(bs + cols, hs + cols, cmask, momentum, keep)
                y = tl.load(pl + kp_rows[:, None] * C + cols[None, :], mask=kp_valid[:, None] & cmask[None, :],
                            other=0.0)
                p, log_p_bar = _marginal(y + cur_s[None, :], p_max, p_logsum, kp_valid, cmask, log_kp)
                cross_s += tl.sum(tl.where(cmask[None, :], p * log_p_bar[None, :], 0.0), axis=1)

        # Early stop, checked before this step's update as in the official loop.
        first = tl.where(step == 0, loss_g, first)
        active = tl.where((tl.abs(loss_g - first) > _STOP_FRACTION * tl.abs(first)) & (step > 0), 0, active)
        upto = C * active  # classes to update: all while active, none once stopped
        slope = tl.where(step == 0, 1.0, momentum)  # d cur / d b: 1 at step 0 (h == b), r afterwards
        tl.debug_barrier()

        # Pass C: gradients and the momentum updates, stored only while the image is active.
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            cur_g, b_g, _ = _cur(bg + cols, hg + cols, cmask, momentum, keep)
            x = tl.load(vl + kv_rows[:, None] * C + cols[None, :], mask=kv_valid[:, None] & cmask[None, :], other=0.0)
            p, log_p_bar = _marginal(x + cur_g[None, :], kv_max, kv_logsum, kv_valid, cmask, log_kv)
            grad = tl.sum(tl.where(kv_valid[:, None], p * (cross_g[:, None] - log_p_bar[None, :]), 0.0), axis=0)
            tl.store(hg + cols, cur_g, mask=cols < upto)
            tl.store(bg + cols, b_g - alpha * slope * (grad / k_views), mask=cols < upto)
            if HAS_PATCHES:
                cur_s, b_s, _ = _cur(bs + cols, hs + cols, cmask, momentum, keep)
                y = tl.load(pl + kp_rows[:, None] * C + cols[None, :], mask=kp_valid[:, None] & cmask[None, :],
                            other=0.0)
                p, log_p_bar = _marginal(y + cur_s[None, :], p_max, p_logsum, kp_valid, cmask, log_kp)
                grad = tl.sum(tl.where(kp_valid[:, None], p * (cross_s[:, None] - log_p_bar[None, :]), 0.0), axis=0)
                tl.store(hs + cols, cur_s, mask=cols < upto)
                tl.store(bs + cols, b_s - beta * slope * (grad / k_patches), mask=cols < upto)
        steps_run += active
        tl.debug_barrier()

    # After the loop h = r * b + (1 - r) * h once more; the answer is s f_0 W^T + h_g + h_s.
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        h_g, _, _ = _cur(bg + cols, hg + cols, cmask, momentum, keep)
        h_s, _, _ = _cur(bs + cols, hs + cols, cmask, momentum, keep)
        tl.store(hg + cols, h_g, mask=cmask)
        tl.store(hs + cols, h_s, mask=cmask)
        tl.store(logits_out + b * C + cols, tl.load(vl + cols, mask=cmask, other=0.0) + h_g + h_s, mask=cmask)
    tl.store(steps_out + b, steps_run.to(tl.int64))


def _validate(view_feats: Tensor, patch_feats: Tensor | None, text_classifier: Tensor, selection_ratio: float,
              steps: int, top_k_patches: int, momentum: float, logit_scale: float) -> None:
    """The reference's shape and range checks that the launch depends on."""
    if view_feats.ndim not in (2, 3) or not 1 <= view_feats.shape[-2] <= MAX_VIEWS:
        raise ValueError(f"view_feats must be [V, D] or [B, V, D] with 1 <= V <= {MAX_VIEWS}, "
                         f"got {tuple(view_feats.shape)}")
    if text_classifier.ndim != 2 or text_classifier.shape[0] < 1 or text_classifier.shape[1] != view_feats.shape[-1]:
        raise ValueError(f"text_classifier must be [C, D] with C >= 1 and D = {view_feats.shape[-1]}, "
                         f"got {tuple(text_classifier.shape)}")
    if patch_feats is not None and (patch_feats.ndim != view_feats.ndim or patch_feats.shape[-1] != view_feats.shape[-1]
                                    or not 1 <= patch_feats.shape[-2] <= MAX_PATCHES
                                    or patch_feats.shape[:-2] != view_feats.shape[:-2]):
        raise ValueError(f"patch_feats must be [P, D] (or [B, P, D] when batched) like view_feats with "
                         f"1 <= P <= {MAX_PATCHES}, got {tuple(patch_feats.shape)}")
    if not 0.0 < selection_ratio <= 1.0 or not 0.0 <= momentum <= 1.0 or not logit_scale > 0:
        raise ValueError(f"need 0 < selection_ratio <= 1, 0 <= momentum <= 1, logit_scale > 0, got "
                         f"{selection_ratio!r}, {momentum!r}, {logit_scale!r}")
    for name, value, minimum in (("steps", steps, 0), ("top_k_patches", top_k_patches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _logits(feats: Tensor, weights: Tensor, logit_scale: float) -> Tensor:
    """scale * feats [M, D] @ weights [C, D]^T as fp32 [M, C]."""
    feats, weights = feats.contiguous(), weights.contiguous()
    (m, k), n = feats.shape, weights.shape[0]
    out = torch.empty(m, n, device=feats.device, dtype=torch.float32)
    # Tensor cores for one 16-bit dtype; the interpreter's dot cannot multiply bf16 (numpy has none).
    tensor_cores = (torch.float16,) if is_interpreted(_logits_kernel) else (torch.float16, torch.bfloat16)
    half = feats.dtype == weights.dtype and feats.dtype in tensor_cores
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    launch(_logits_kernel, grid)(feats, weights, out, m, n, k, float(logit_scale), F32_DOT=not half,
                         BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8)
    return out


def gs_bias(view_feats: Tensor, patch_feats: Tensor | None, text_classifier: Tensor, *,
            logit_scale: float = 100.0, selection_ratio: float = 0.1, steps: int = 1,
            alpha: float = 10.0, beta: float = 1.0, top_k_patches: int = 16,
            momentum: float = 0.9) -> GSBiasOutput:
    """The kernels' GS-Bias: same arguments and result as adaptclip.adapt.gsbias.gs_bias.

    Inputs may be fp32, fp16 or bf16 (computed in fp32); results are fp32 ([C] / [B, C], steps
    int64), on view_feats' device. Early stop is per image, as in the reference.
    """
    _validate(view_feats, patch_feats, text_classifier, selection_ratio, steps, top_k_patches, momentum,
              logit_scale)
    check_device("view_feats", view_feats, _adapt_kernel)
    batched = view_feats.ndim == 3
    feats = view_feats if batched else view_feats.unsqueeze(0)
    device = feats.device
    n_batch, n_views, dim = feats.shape
    weights = text_classifier.to(device)
    n_classes = weights.shape[0]
    view_logits = _logits(feats.reshape(-1, dim), weights, logit_scale)
    k_views = max(1, int(n_views * selection_ratio))

    has_patches = patch_feats is not None
    if has_patches:
        patches = (patch_feats if batched else patch_feats.unsqueeze(0)).to(device)
        n_patches = patches.shape[1]
        patch_logits = _logits(patches.reshape(-1, dim), weights, logit_scale)
        n_tiles = triton.cdiv(n_classes, 64)
        parts = torch.empty(n_batch, n_tiles, n_patches, device=device, dtype=torch.float32)
        launch(_saliency_kernel, (n_batch, n_tiles))(patch_logits, parts, n_patches, n_classes, BLOCK_P=64, BLOCK_C=64)
    else:  # the patch arguments are never read
        n_patches, n_tiles, patch_logits, parts = 1, 1, view_logits, view_logits
    k_patches = min(top_k_patches, n_patches)

    state = torch.zeros(4, n_batch, n_classes, device=device, dtype=torch.float32)  # b_g, h_g, b_s, h_s
    logits = torch.empty(n_batch, n_classes, device=device, dtype=torch.float32)
    steps_run = torch.empty(n_batch, device=device, dtype=torch.int64)
    launch(_adapt_kernel, (n_batch,))(
        view_logits, patch_logits, parts, state[0], state[1], state[2], state[3], logits, steps_run,
        n_views, n_classes, n_patches, n_tiles, k_views, k_patches, steps, float(alpha), float(beta),
        float(momentum), float(1 - momentum), math.log(k_views), math.log(k_patches),
        HAS_PATCHES=has_patches, BLOCK_C=_BLOCK_C, BLOCK_V=triton.next_power_of_2(n_views),
        BLOCK_KV=triton.next_power_of_2(k_views), BLOCK_P=triton.next_power_of_2(n_patches), BLOCK_Q=32,
        BLOCK_KP=triton.next_power_of_2(k_patches), num_warps=8)
    if not batched:
        return GSBiasOutput(logits[0], state[1, 0], state[3, 0], steps_run[0])
    return GSBiasOutput(logits, state[1], state[3], steps_run)
