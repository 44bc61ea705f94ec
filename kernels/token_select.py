"""One token-compression stage (EViT-style top-k by CLS attention, plus the fused token) in one
launch, and the CLS-attention score that drives it in another.

Why: the torch stage (adaptclip.compression.tokens.reduce_tokens) is a topk, a sort, a gather of
the kept tokens, a scatter and an einsum for the fused token, a concatenation and an index
gather: about ten launches and three copies of the kept tokens per reduction. Here one program
per (image, BLOCK_D channels) ranks the patch scores, copies each kept token once to its slot
and accumulates the dropped ones into the fused token.

Reference (the kernel must equal it): `adaptclip.compression.tokens.reduce_tokens`, same
arguments and results: the CLS token, the k best-scored patch tokens in their current order
(ascending position, as `topk(...).indices.sort()` keeps them), and with `fuse` (when something
is dropped or a fused token exists) the score-weighted mean of the dropped patches and the old
fused token, accumulated in fp32 and cast to x's dtype; the kept patches' indices.

Ties: a patch ranks by (score descending, position ascending), so among equal scores at the
k-th place the earlier positions are kept. torch.topk leaves that unspecified (on CPU it depends
on its partial sort), so the reference may keep other tied patches: equal scores, other tokens.

Scoring: `cls_attention(block, y)` equals `compression.tokens.cls_attention` (the head-averaged
softmax over keys of q_cls . k_j / sqrt(d_head)). The query projection and its fold into the
key weights (two batched GEMMs, a few percent of the work) stay torch, written as the reference
writes them; `_cls_scores_kernel` does the rest per image: the [H, L] logits against y in its
own dtype (the reference first copies y to fp32; here y is read twice, for the softmax statistics
and then the probabilities, in 64-token chunks), the softmax per head and the head mean.

Limits: scores are read as fp32 (the compressor's CLS attention is fp32); the scoring is not
differentiable (SPDFQ, which optimises images through it, keeps the torch path); CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1 (see adaptclip.kernels._common).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from adaptclip.kernels._common import FLOAT_DTYPES, check_device, launch

_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(float32).tiny: the reference's mass clamp


@triton.jit
def _select_kernel(x, index, scores, out, out_index, n_patch, k, D,
                   stride_xn, stride_xt, stride_in, stride_ip, stride_sn, stride_on, stride_ot,
                   FUSE: tl.constexpr, FUSED_IN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """One program: BLOCK_D channels of one image's reduced tokens (CLS, kept patches, fused)."""
    n = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    row_x = x + n * stride_xn
    row_out = out + n * stride_on
    row_s = scores + n * stride_sn
    tl.store(row_out + d, tl.load(row_x + d, mask=dmask), mask=dmask)  # CLS

    total = tl.zeros((BLOCK_D,), tl.float32)
    mass = 0.0
    kept_before = 0
    for p0 in range(0, n_patch, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < n_patch
        sp = tl.load(row_s + p, mask=pmask, other=0.0).to(tl.float32)
        rank = tl.zeros((BLOCK_P,), tl.int32)  # patches ranked before p: higher score, or equal and earlier
        for q0 in range(0, n_patch, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            sq = tl.load(row_s + q, mask=q < n_patch, other=0.0).to(tl.float32)
            before = (sq[None, :] > sp[:, None]) | ((sq[None, :] == sp[:, None]) & (q[None, :] < p[:, None]))
            rank += tl.sum((before & (q[None, :] < n_patch)).to(tl.int32), axis=1)
        keep = (rank < k) & pmask
        kept = keep.to(tl.int32)
        slot = kept_before + tl.cumsum(kept, axis=0) - kept  # kept patches keep their order
        rows = tl.load(row_x + (1 + p)[:, None] * stride_xt + d[None, :], mask=pmask[:, None] & dmask[None, :],
                       other=0.0)
        tl.store(row_out + (1 + slot)[:, None] * stride_ot + d[None, :], rows, mask=keep[:, None] & dmask[None, :])
        if d_block == 0:
            idx = tl.load(index + n * stride_in + p * stride_ip, mask=keep)
            tl.store(out_index + n * k + slot, idx, mask=keep)
        if FUSE:
            weight = tl.where(pmask & (rank >= k), sp, 0.0)  # dropped patches only
            total += tl.sum(weight[:, None] * rows.to(tl.float32), axis=0)
            mass += tl.sum(weight, axis=0)
        kept_before += tl.sum(kept, axis=0)

    if FUSE:
        if FUSED_IN:
            w_old = tl.load(row_s + n_patch).to(tl.float32)
            total += w_old * tl.load(row_x + (1 + n_patch) * stride_xt + d, mask=dmask, other=0.0).to(tl.float32)
            mass += w_old
        fused = total / tl.maximum(mass, _TINY)
        tl.store(row_out + (1 + k) * stride_ot + d, fused.to(out.dtype.element_ty), mask=dmask)


def reduce_tokens(x: Tensor, index: Tensor, scores: Tensor, k: int, fuse: bool,
                  fused: bool) -> tuple[Tensor, Tensor, bool]:
    """The kernel: same arguments and results as adaptclip.compression.tokens.reduce_tokens.

    x: [N, 1 + K (+ 1 fused), D], CLS first and the fused token last when `fused`; index: [N, K];
    scores: [N, K (+ 1)] over the patch tokens (and the fused token). Returns (x, index, fused).
    """
    n, tokens, dim = x.shape
    n_patch = index.shape[1] if index.ndim == 2 else -1
    if x.dtype not in FLOAT_DTYPES or index.shape[0] != n or tokens != 1 + n_patch + int(fused):
        raise ValueError(f"x must be float [N, 1 + K{' + 1' if fused else ''}, D] for index [N, K], got "
                         f"{x.dtype} {tuple(x.shape)} and {tuple(index.shape)}")
    if scores.ndim != 2 or scores.shape[0] != n or scores.shape[1] < n_patch + int(fused):
        raise ValueError(f"scores must be [N, {n_patch}{' + 1' if fused else ''}], got {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_patch:
        raise ValueError(f"k must be an int in 1..{n_patch}, got {k!r}")
    check_device("x", x, _select_kernel)
    fuse = bool(fuse) and (k < n_patch or bool(fused))
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(n, 1 + k + int(fuse), dim, device=x.device, dtype=x.dtype)
    out_index = torch.empty(n, k, device=x.device, dtype=index.dtype)
    block_d = min(triton.next_power_of_2(dim), 128)
    launch(_select_kernel, (n, triton.cdiv(dim, block_d)))(
        x, index, scores, out, out_index, n_patch, k, dim, x.stride(0), x.stride(1), index.stride(0),
        index.stride(1), scores.stride(0), out.stride(0), out.stride(1), FUSE=fuse, FUSED_IN=bool(fused),
        BLOCK_P=32, BLOCK_Q=64, BLOCK_D=block_d)
    return out, out_index, fuse


@triton.jit
def _head_logits(y, folded, l, H, L, D, stride_yl, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_H, BLOCK_L] fp32 logits folded[h] . y[l] of one image for the tokens l (-inf past L)."""
    h = tl.arange(0, BLOCK_H)
    logits = tl.zeros((BLOCK_H, l.shape[0]), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(folded + h[:, None] * D + d[None, :], mask=(h[:, None] < H) & (d[None, :] < D), other=0.0)
        keys = tl.load(y + l[None, :] * stride_yl + d[:, None], mask=(d[:, None] < D) & (l[None, :] < L), other=0.0)
        logits = tl.dot(q, keys.to(tl.float32), logits, input_precision="ieee")
    return tl.where(l[None, :] < L, logits, float("-inf"))


@triton.jit
def _cls_scores_kernel(y, folded, out, H, L, D, stride_yn, stride_yl, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """One image: out[l] = mean over heads h of softmax over l of folded[h] . y[l], in fp32."""
    n = tl.program_id(0).to(tl.int64)
    y = y + n * stride_yn
    folded = folded + n * H * D
    head_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    head_sum = tl.zeros((BLOCK_H,), tl.float32)
    for l0 in range(0, L, BLOCK_L):  # softmax statistics per head, online over token chunks
        logits = _head_logits(y, folded, l0 + tl.arange(0, BLOCK_L), H, L, D, stride_yl, BLOCK_H, BLOCK_D)
        new_max = tl.maximum(head_max, tl.max(logits, axis=1))
        head_sum = head_sum * tl.exp(head_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        head_max = new_max
    head_valid = tl.arange(0, BLOCK_H) < H
    for l0 in range(0, L, BLOCK_L):  # the logits again, normalised and averaged over the heads
        l = l0 + tl.arange(0, BLOCK_L)
        logits = _head_logits(y, folded, l, H, L, D, stride_yl, BLOCK_H, BLOCK_D)
        attn = tl.exp(logits - head_max[:, None]) / head_sum[:, None]
        tl.store(out + n * L + l, tl.sum(tl.where(head_valid[:, None], attn, 0.0), axis=0) / H, mask=l < L)


def cls_attention(block: nn.Module, y: Tensor) -> Tensor:
    """The kernel: same result as adaptclip.compression.tokens.cls_attention, [N, L] float32.

    block: the ResidualAttentionBlock whose attention is scored (its in_proj q and k rows);
    y: ln_1(x) of its input, [N, L, D] batch first, any float dtype. Not differentiable.
    """
    attn = block.attn
    d, heads = attn.in_proj_weight.shape[1], attn.num_heads
    if y.ndim != 3 or y.shape[-1] != d or y.shape[1] < 1:
        raise ValueError(f"y must be [N, L, {d}] with L >= 1, got {tuple(y.shape)}")
    n, tokens, _ = y.shape
    check_device("y", y, _cls_scores_kernel)
    head_dim = d // heads
    with torch.no_grad():  # the reference's fold: q_h . (W_k,h y_j + b) = (W_k,h^T q_h) . y_j + const
        weight = attn.in_proj_weight[:2 * d].float()
        q = y[:, 0].float() @ weight[:d].T
        if attn.in_proj_bias is not None:
            q = q + attn.in_proj_bias[:d].float()
        q = q.view(-1, heads, head_dim) * head_dim ** -0.5
        folded = torch.einsum("nhe,hed->nhd", q, weight[d:2 * d].view(heads, head_dim, d)).contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    out = torch.empty(n, tokens, device=y.device, dtype=torch.float32)
    launch(_cls_scores_kernel, (n,))(y, folded, out, heads, tokens, d, y.stride(0), y.stride(1),
                             BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_L=64, BLOCK_D=32, num_warps=4)
    return out
