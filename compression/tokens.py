"""CLS-guided token compression inside an open_clip ViT image tower (EViT; VTC-CLS scoring).

At each reduction block b (default: the blocks at 1/4, 1/2 and 3/4 of the depth, 0-based
`int(L * f)`, so 3, 6, 9 of 12 as in EViT) the block runs in two halves, as EViT does inside
its block:

1. attention half on all current tokens: `x = x + ls_1(attention(ln_1(x)))` with the block's
   own modules. Block b's own CLS attention row is computed explicitly from the same ln_1(x)
   (open_clip's fused attention does not return weights): softmax over keys of q_cls . k_j /
   sqrt(d_head), per head, then averaged over heads.
2. the top `ceil(keep_rate * P)` patch tokens by that score are kept in their original order;
   with `fuse=True` the dropped ones (and the fused token of an earlier stage) are merged into
   one token, their attention-weighted average (EViT's paper; its code uses the unnormalised
   sum, which a model not trained with it would see as an out-of-scale token). The fused token
   sits last, never counts as a patch, and is not returned as a spatial feature.
3. MLP half on the kept tokens; every other block is called unchanged (`block(x)`).

`score_layers > 1` scores by the sum of the head-averaged CLS attention over that many blocks
ending at b (VTC-CLS), not reaching back past the previous reduction.

keep_rate is per stage (EViT's definition): 196 patches at 0.5 -> 98 -> 49 -> 25. keep_rate = 1
runs open_clip's own forward unchanged.

`backend="triton"` (or "auto" on a CUDA tower) scores and reduces with adaptclip.kernels.token_select
(`cls_attention` and `reduce_tokens` below are their references): same outputs and indices, ties at
the k-th score kept by position where torch.topk leaves them unspecified.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from open_clip.transformer import (Attention, CustomResidualAttentionBlock, ResidualAttentionBlock,
                                   VisionTransformer)
from torch import Tensor, nn

from adaptclip.adapt.settings import validate_keep_rate
from adaptclip.kernels.backend import resolve, unavailable

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
Block = ResidualAttentionBlock | CustomResidualAttentionBlock


class UnsupportedTower(ValueError):
    """The tower cannot drop tokens. `vit`: it is an open_clip CLS-token ViT whose blocks this compressor
    does not know (a newer open_clip, an attention variant), which a caller should report loudly rather
    than serve without compression by surprise."""

    def __init__(self, message: str, vit: bool) -> None:
        super().__init__(message)
        self.vit = vit


def kept_count(n_patches: int, keep_rate: float) -> int:
    """Patches kept out of n at one stage: ceil(keep_rate * n), at least 1 (rounded first so 0.7 * 100 is 70)."""
    return max(1, math.ceil(round(keep_rate * n_patches, 6)))


def cls_attention_heads(block: Block, y: Tensor) -> Tensor:
    """Per-head attention of the CLS token (position 0) on every token: [N, H, L] float32, rows sum to 1.

    y is ln_1(x) of the block's input, [N, L, D] (batch first). Written as q_cls against all k,
    folded: q_h . (W_k,h y_j + b_k,h) = (W_k,h^T q_h) . y_j + const_h, and the constant cancels in
    the softmax over j, so no [N, L, D] key tensor is built (cost L*D*H per image, not L*D*D).
    Differentiable in y (SPDFQ's attention prior optimises images through it).
    """
    attn = block.attn
    d, heads = attn.in_proj_weight.shape[1], attn.num_heads
    head_dim = d // heads
    weight = attn.in_proj_weight[:2 * d].float()  # q and k rows only: no copy of the v part
    q = y[:, 0].float() @ weight[:d].T
    if attn.in_proj_bias is not None:
        q = q + attn.in_proj_bias[:d].float()
    q = q.view(-1, heads, head_dim) * head_dim ** -0.5
    folded = torch.einsum("nhe,hed->nhd", q, weight[d:2 * d].view(heads, head_dim, d))
    return torch.einsum("nld,nhd->nhl", y.float(), folded).softmax(-1)


def cls_attention(block: Block, y: Tensor) -> Tensor:
    """Head-averaged CLS attention on every token, [N, L] float32 (see cls_attention_heads)."""
    return cls_attention_heads(block, y).mean(1)


@dataclass(frozen=True)
class TokenOutput:
    pooled: Tensor  # [N, D] after ln_post and proj (CLS pooling), as encode_image
    patches: Tensor | None  # [N, K, D] kept patch tokens through ln_post and proj (no fused token)
    patch_index: Tensor  # [N, K] their indices in the original row-major patch grid, ascending
    kept: tuple[int, ...]  # patch tokens after each reduction stage


class TokenCompressor:
    """Encodes images through an open_clip ViT with EViT token reduction at a chosen keep rate.

    Holds no per-call state, so one instance serves every keep rate; batch one keep rate (or
    any rates with the same `schedule`) per call.
    """

    def __init__(self, model: nn.Module, reduce_at: Sequence[int] | None = None, fuse: bool = True,
                 score_layers: int = 1, backend: str = "torch") -> None:
        """model: an open_clip CLIP (its .visual is used) or a VisionTransformer.

        reduce_at: 0-based block indices where tokens are reduced (inside the block, after its
        attention); None = int(L * f) for f in 1/4, 1/2, 3/4.
        fuse: merge the dropped tokens into one (on by default: on the CIFAR model's train subset it
        kept 0.5 to 1.6 points more zero-shot accuracy at keep 0.7, 0.5 and 0.3; see
        bench/results/tokens-calibration.md).
        score_layers: CLS attention of this many blocks summed per score (1 = EViT).
        backend: "torch", "triton" or "auto" for scoring and reduction (see adaptclip.kernels.backend),
        decided here for the tower's device; `self.backend` says which runs.
        """
        visual = getattr(model, "visual", model)
        self.visual = visual
        self.blocks = _check_tower(visual)
        depth = len(self.blocks)
        stages = sorted({int(depth * f) for f in DEFAULT_FRACTIONS} if reduce_at is None else set(reduce_at))
        if not stages or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < depth for b in stages):
            raise ValueError(f"reduce_at: must be block indices in 0..{depth - 1}, got {reduce_at!r}")
        if isinstance(score_layers, bool) or not isinstance(score_layers, int) or score_layers < 1:
            raise ValueError(f"score_layers: must be an int >= 1, got {score_layers!r}")
        self.reduce_at = tuple(stages)
        self.fuse = bool(fuse)
        self.score_layers = score_layers
        device = next(visual.parameters()).device
        self.backend = resolve(backend, device)
        if self.backend == "triton" and (why := unavailable(device)):
            raise ValueError(f"backend: {why}")
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        grid = visual.grid_size
        self.n_patches = int(grid[0] * grid[1])
        starts = (-1,) + self.reduce_at[:-1]
        # blocks whose CLS attention is scored: score_layers up to each reduction, after the previous one
        self._scored = frozenset(i for prev, b in zip(starts, self.reduce_at)
                                 for i in range(max(prev + 1, b - score_layers + 1), b + 1))
        self._check_split()

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the tower takes images in: its patch embedding's. open_clip's fp16/bf16 keep the class
        and positional embeddings and the LayerNorms in fp32, so the first parameter does not say it."""
        return self.visual.conv1.weight.dtype

    @torch.inference_mode()
    def _check_split(self) -> None:
        """Probe once that this open_clip's embedding, blocks and pooling are the steps the compressor runs
        piecewise, so a changed open_clip fails here, loudly, instead of answering wrong."""
        v = self.visual
        param = v.conv1.weight
        probe = torch.randn(1, 3, *v.image_size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(param.device, param.dtype)
        x = v._embeds(probe)
        block = self.blocks[0]
        y = block.ln_1(x)
        split = x + block.ls_1(self._attend(block, y))
        split = split + block.ls_2(block.mlp(block.ln_2(split)))
        whole = self._run_blocks(x, [block])
        pooled = self._project(v._pool(self._run_blocks(x, self.blocks))[0])
        plain = v(probe)
        plain = plain[0] if isinstance(plain, tuple) else plain
        for what, got, want in (("block 0 split into attention and MLP halves", split, whole),
                                ("embeddings -> blocks -> pooling", pooled, plain)):
            tol = 1e-4 if param.dtype == torch.float32 else 2e-2
            if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max())):
                raise UnsupportedTower(f"{what} does not reproduce this open_clip's forward; token compression "
                                       f"does not know this open_clip version", vit=True)

    def schedule(self, keep_rate: float) -> tuple[int, ...]:
        """Patch tokens after each stage; two keep rates with equal schedules give identical outputs."""
        keep_rate = validate_keep_rate(keep_rate)
        counts, n = [], self.n_patches
        for _ in self.reduce_at:
            n = n if keep_rate == 1.0 else kept_count(n, keep_rate)
            counts.append(n)
        return tuple(counts)

    def encode(self, images: Tensor, keep_rate: float, with_patches: bool = False) -> TokenOutput:
        """[N, 3, S, S] preprocessed -> pooled features and (optionally) kept patch features."""
        keep_rate = validate_keep_rate(keep_rate)
        if keep_rate == 1.0:
            return self._plain(images, with_patches)
        return self._compressed(images, keep_rate, with_patches)

    def features(self, images: Tensor, with_patches: bool, keep_rate: float) -> tuple[Tensor, Tensor | None]:
        """Same contract as adaptclip.adapt.features.image_features, at `keep_rate`."""
        out = self.encode(images, keep_rate, with_patches)
        return out.pooled, out.patches

    @torch.inference_mode()
    def _plain(self, images: Tensor, with_patches: bool) -> TokenOutput:
        """The body of open_clip's VisionTransformer.forward, so the tokens come out without toggling
        `output_tokens` (whose value then cannot change what is returned)."""
        v = self.visual
        index = torch.arange(self.n_patches, device=images.device).expand(images.shape[0], -1)
        pooled, tokens = v._pool(v.transformer(v._embeds(images)))
        patches = self._project(tokens) if with_patches else None
        return TokenOutput(self._project(pooled), patches, index, self.schedule(1.0))

    @torch.inference_mode()
    def _compressed(self, images: Tensor, keep_rate: float, with_patches: bool) -> TokenOutput:
        v = self.visual
        if v.training and not isinstance(v.patch_dropout, nn.Identity):
            raise ValueError("token compression needs the model in eval mode (patch dropout is active)")
        x = v._embeds(images)  # [N, 1 + P, D] batch first throughout
        index = torch.arange(self.n_patches, device=x.device).expand(x.shape[0], -1)
        fused = False
        scores: Tensor | None = None
        kept: list[int] = []
        score, reduce = _stage_ops(self.backend)
        i = 0
        while i < len(self.blocks):
            if i not in self._scored:  # a run of plain blocks, called as open_clip calls them
                end = next((j for j in range(i, len(self.blocks)) if j in self._scored), len(self.blocks))
                x = self._run_blocks(x, self.blocks[i:end])
                i = end
                continue
            block = self.blocks[i]
            y = block.ln_1(x)
            attn = score(block, y)[:, 1:]
            scores = attn if scores is None else scores + attn
            if i in self.reduce_at:
                x = x + block.ls_1(self._attend(block, y))
                x, index, fused = reduce(x, index, scores, kept_count(index.shape[1], keep_rate), self.fuse, fused)
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
                kept.append(index.shape[1])
                scores = None
            else:
                x = self._run_blocks(x, [block])
            i += 1
        pooled, tokens = v._pool(x)
        patches = self._project(tokens[:, :index.shape[1]]) if with_patches else None
        return TokenOutput(self._project(pooled), patches, index, tuple(kept))

    def _run_blocks(self, x: Tensor, blocks: Sequence[nn.Module]) -> Tensor:
        """Unmodified blocks in the transformer's own layout (open_clip's ViT passes attn_mask=None)."""
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=None)
        return x if self.batch_first else x.transpose(0, 1)

    def _attend(self, block: Block, y: Tensor) -> Tensor:
        """The block's own attention (need_weights=False, fused kernel) on batch-first y, before its residual."""
        if isinstance(block, CustomResidualAttentionBlock):
            return block.ln_attn(block.attn(y))
        if self.batch_first:
            return block.attention(q_x=y)
        return block.attention(q_x=y.transpose(0, 1)).transpose(0, 1)

    def _project(self, x: Tensor) -> Tensor:
        return x if self.visual.proj is None else x @ self.visual.proj


def reduce_tokens(x: Tensor, index: Tensor, scores: Tensor, k: int, fuse: bool,
                  fused: bool) -> tuple[Tensor, Tensor, bool]:
    """Keep the k best-scored patch tokens in their order; fuse the dropped ones if asked.

    x: [N, 1 + K (+ 1 fused), D], CLS first and a fused token last when `fused`; index: [N, K]
    original patch indices; scores: [N, K (+ 1)] over the patch tokens (and the fused token).
    The new fused token is the score-weighted average of the dropped patches and the old fused
    token. Returns (x, index, fused) after the reduction.
    """
    n_patch = index.shape[1]
    patch_scores = scores[:, :n_patch]
    pos = patch_scores.topk(k, dim=1).indices.sort(dim=1).values  # [N, k], original order
    patches = x[:, 1:1 + n_patch]
    parts = [x[:, :1], patches.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))]
    fuse = fuse and (k < n_patch or fused)
    if fuse:
        weights = patch_scores.scatter(1, pos, 0.0)  # dropped patches only
        total = torch.einsum("nk,nkd->nd", weights, patches.float())
        mass = weights.sum(1, keepdim=True)
        if fused:
            w_old = scores[:, n_patch:n_patch + 1]
            total = total + w_old * x[:, -1].float()
            mass = mass + w_old
        parts.append((total / mass.clamp_min(torch.finfo(torch.float32).tiny)).to(x.dtype).unsqueeze(1))
    return torch.cat(parts, dim=1), index.gather(1, pos), fuse


def _stage_ops(backend: str) -> tuple[
        Callable[[Block, Tensor], Tensor], Callable[..., tuple[Tensor, Tensor, bool]]]:
    """(cls_attention, reduce_tokens) of `backend`: the functions above, or their Triton kernels."""
    if backend == "triton":
        from adaptclip.kernels import token_select

        return token_select.cls_attention, token_select.reduce_tokens
    return cls_attention, reduce_tokens


def _known_block(block: nn.Module) -> str | None:
    """Why the compressor cannot split `block` into its attention and MLP halves, or None when it can."""
    if type(block) is ResidualAttentionBlock:
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or hasattr(block, "ln_1_kv"):
            return f"ResidualAttentionBlock with {type(attn).__name__} cross/odd-shaped attention"
        return None
    if type(block) is CustomResidualAttentionBlock:
        attn = block.attn
        if type(attn) is not Attention:
            return f"CustomResidualAttentionBlock with {type(attn).__name__}"
        if attn.scaled_cosine or not isinstance(attn.ln_q, nn.Identity):
            return "Attention with scaled-cosine or QK-normalised logits (the CLS row is not q . k)"
        return None
    return f"{type(block).__name__} blocks"


def _check_tower(visual: nn.Module) -> nn.ModuleList:
    """The tower's resblocks; UnsupportedTower naming what it cannot run (the reduction needs a CLS-token ViT)."""
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedTower(f"token compression needs an open_clip VisionTransformer image tower, got "
                               f"{type(visual).__name__} (ResNet and timm towers have no CLS token attention)", vit=False)
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise UnsupportedTower("token compression needs CLS-token pooling (pool_type 'tok', no attentional pooler)",
                               vit=False)
    if not (callable(getattr(visual, "_embeds", None)) and callable(getattr(visual, "_pool", None))):
        raise UnsupportedTower("this open_clip VisionTransformer has no _embeds/_pool steps to run the blocks "
                               "between; token compression does not know this open_clip version", vit=True)
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks):
        why = _known_block(block)
        if why is not None:
            raise UnsupportedTower(f"block {i}: token compression does not know {why}", vit=True)
    return blocks
