"""CLS-guided token compression (compression/tokens.py) against open_clip's own computations."""
from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch

from adaptclip.compression.models import image_features
from adaptclip.compression.tokens import TokenCompressor, UnsupportedTower, cls_attention, kept_count, reduce_tokens

# 32 px, patch 4 -> 64 patches, 4 blocks of 4 heads: default reductions inside blocks 1, 2, 3.
CFG = {"embed_dim": 32,
       "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 4},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(**CFG).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _hidden_states(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block in the plain model (batch first)."""
    visual = model.visual
    x = visual._embeds(images)
    states = []
    for block in visual.transformer.resblocks:
        states.append(x)
        x = block(x)
    return states


def _reference_cls_attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Row 0 of nn.MultiheadAttention's own head-averaged weights on ln_1(x): [N, L]."""
    y = block.ln_1(x)
    _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
    return weights[:, 0]


@torch.no_grad()
def test_keep_one_is_the_plain_model(model, images):
    """keep 1.0 is open_clip's encode_image, and its patches are tokens @ proj of output_tokens=True."""
    out = TokenCompressor(model).encode(images, 1.0, with_patches=True)
    assert torch.equal(out.pooled, model.encode_image(images))
    _, ref_patches = image_features(model, images, with_patches=True)
    assert torch.equal(out.patches, ref_patches)
    assert out.patch_index.tolist() == [list(range(64))] * 4
    assert out.kept == (64, 64, 64)


@torch.no_grad()
@pytest.mark.parametrize("fuse", [False, True])
def test_split_blocks_at_keep_one_match_the_plain_model(model, images, fuse):
    """The reduction path itself (blocks split around the token selection) changes nothing when all are kept."""
    out = TokenCompressor(model, fuse=fuse)._compressed(images, 1.0, with_patches=True)
    torch.testing.assert_close(out.pooled, model.encode_image(images), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.patches, image_features(model, images, True)[1], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_explicit_cls_attention_matches_multihead_attention_weights(model, images):
    blocks = model.visual.transformer.resblocks
    for block, x in zip(blocks, _hidden_states(model, images)):
        ours = cls_attention(block, block.ln_1(x))
        torch.testing.assert_close(ours, _reference_cls_attention(block, x), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.sum(-1), torch.ones(len(images)))


@torch.no_grad()
@pytest.mark.parametrize("keep_rate", [0.7, 0.5, 0.3])
def test_kept_counts_per_stage_and_later_blocks_see_fewer_tokens(model, images, keep_rate):
    expected, n = [], 64
    for _ in range(3):
        n = max(1, math.ceil(round(keep_rate * n, 6)))
        expected.append(n)
    compressor = TokenCompressor(model, fuse=False)
    seen: list[int] = []
    hooks = [b.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
             for b in model.visual.transformer.resblocks]
    try:
        out = compressor.encode(images, keep_rate, with_patches=True)
    finally:
        for h in hooks:
            h.remove()
    assert out.kept == compressor.schedule(keep_rate) == tuple(expected)
    assert out.patches.shape == (4, expected[-1], 32) and out.patch_index.shape == (4, expected[-1])
    # every block's MLP runs on CLS + kept patches (block 0 before any reduction)
    assert seen == [65] + [1 + k for k in expected]
    assert kept_count(100, 0.7) == 70 and kept_count(3, 0.01) == 1


@torch.no_grad()
def test_kept_tokens_are_the_top_cls_attention_in_original_order(model, images):
    """One stage inside block 2: the kept patches are the top-k of block 2's own CLS attention, sorted."""
    out = TokenCompressor(model, reduce_at=[2], fuse=False).encode(images, 0.5, with_patches=True)
    ref = _reference_cls_attention(model.visual.transformer.resblocks[2], _hidden_states(model, images)[2])[:, 1:]
    top = ref.topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(out.patch_index, top)
    assert (out.patch_index.diff(dim=1) > 0).all()


@torch.no_grad()
def test_vtc_cls_sums_attention_over_layers(model, images):
    """score_layers=3 at block 2 scores by the summed CLS attention of blocks 0, 1 and 2."""
    states = _hidden_states(model, images)
    blocks = model.visual.transformer.resblocks
    summed = sum(_reference_cls_attention(blocks[i], states[i])[:, 1:] for i in range(3))
    out = TokenCompressor(model, reduce_at=[2], score_layers=3).encode(images, 0.3, with_patches=True)
    assert torch.equal(out.patch_index, summed.topk(20, dim=1).indices.sort(dim=1).values)
    only_last = TokenCompressor(model, reduce_at=[2]).encode(images, 0.3).patch_index
    assert not torch.equal(out.patch_index, only_last)


def test_fused_token_is_the_attention_weighted_average_of_dropped_tokens():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 4.0]]])  # CLS + 4 patches
    index = torch.tensor([[0, 1, 2, 3]])
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    x1, index1, fused = reduce_tokens(x, index, scores, 2, fuse=True, fused=False)
    assert fused and index1.tolist() == [[1, 3]]
    dropped = (0.1 * x[0, 1] + 0.2 * x[0, 3]) / 0.3
    torch.testing.assert_close(x1[0], torch.stack([x[0, 0], x[0, 2], x[0, 4], dropped]))
    # next stage: the old fused token (score 0.3) is merged with the newly dropped patch (0.2)
    x2, index2, _ = reduce_tokens(x1, index1, torch.tensor([[0.5, 0.2, 0.3]]), 1, fuse=True, fused=True)
    assert index2.tolist() == [[1]]
    torch.testing.assert_close(x2[0], torch.stack([x[0, 0], x[0, 2], (0.2 * x[0, 4] + 0.3 * dropped) / 0.5]))
    x3, _, fused3 = reduce_tokens(x, index, scores, 2, fuse=False, fused=False)
    assert not fused3 and torch.equal(x3[0], x[0, [0, 2, 4]])


@torch.no_grad()
def test_fused_token_is_not_a_patch_feature(model, images):
    plain = TokenCompressor(model, reduce_at=[2], fuse=False).encode(images, 0.5, with_patches=True)
    fused = TokenCompressor(model, reduce_at=[2]).encode(images, 0.5, with_patches=True)
    assert fused.patches.shape == plain.patches.shape == (4, 32, 32)
    assert torch.equal(fused.patch_index, plain.patch_index)
    assert not torch.allclose(fused.pooled, plain.pooled)  # block 3 attends to the fused token


@torch.no_grad()
@pytest.mark.parametrize("fuse", [False, True])
def test_batched_equals_one_at_a_time(model, images, fuse):
    compressor = TokenCompressor(model, fuse=fuse, score_layers=2)
    batch = compressor.encode(images, 0.5, with_patches=True)
    for i in range(len(images)):
        one = compressor.encode(images[i:i + 1], 0.5, with_patches=True)
        assert torch.equal(one.patch_index[0], batch.patch_index[i])
        torch.testing.assert_close(one.pooled[0], batch.pooled[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one.patches[0], batch.patches[i], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sequence_first_transformer_gives_the_same_result(model, images):
    """Towers whose transformer runs LND (batch_first=False) are handled in their own layout."""
    seq_first = copy.deepcopy(model)
    seq_first.visual.transformer.batch_first = False
    for block in seq_first.visual.transformer.resblocks:
        block.attn.batch_first = False
    torch.testing.assert_close(seq_first.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-6)
    ours = TokenCompressor(seq_first, fuse=True).encode(images, 0.5, with_patches=True)
    ref = TokenCompressor(model, fuse=True).encode(images, 0.5, with_patches=True)
    assert torch.equal(ours.patch_index, ref.patch_index)
    torch.testing.assert_close(ours.pooled, ref.pooled, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_features_serve_one_keep_rate_group(model, images):
    """`features` is what TorchModel.encode_images calls for a batch of one keep rate."""
    compressor = TokenCompressor(model)
    pooled, patches = compressor.features(images, True, 0.5)
    out = compressor.encode(images, 0.5, with_patches=True)
    assert torch.equal(pooled, out.pooled) and torch.equal(patches, out.patches)
    assert compressor.features(images, False, 0.5)[1] is None
    assert compressor.schedule(0.5) == compressor.schedule(0.49)  # same counts, so one batch group


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_invalid_keep_rate_raises_naming_it(model, images, bad):
    compressor = TokenCompressor(model)
    with pytest.raises(ValueError, match="keep_rate"):
        compressor.encode(images, bad)
    with pytest.raises(ValueError, match="keep_rate"):
        compressor.features(images, False, bad)


def test_invalid_configuration_and_towers_are_refused(model):
    with pytest.raises(ValueError, match="reduce_at"):
        TokenCompressor(model, reduce_at=[4])
    with pytest.raises(ValueError, match="score_layers"):
        TokenCompressor(model, score_layers=0)
    resnet_cfg = dict(CFG, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8})
    with pytest.raises(ValueError, match="VisionTransformer"):
        TokenCompressor(open_clip.CLIP(**resnet_cfg))
    custom_cfg = dict(CFG, vision_cfg=dict(CFG["vision_cfg"], qk_norm=True))
    with pytest.raises(UnsupportedTower, match="QK-normalised") as err:
        TokenCompressor(open_clip.CLIP(**custom_cfg))
    assert err.value.vit  # a ViT it cannot run: callers must say so, not serve without compression


@torch.no_grad()
def test_open_clip_attention_blocks_are_supported(images):
    """ViTs built from open_clip's own Attention class (block_type CustomResidualAttentionBlock) compress too:
    keep 1 is the plain model, and the explicit CLS row matches softmax(q k^T / sqrt(d)) of that class."""
    torch.manual_seed(0)
    custom = open_clip.CLIP(**dict(CFG, vision_cfg=dict(CFG["vision_cfg"], block_type="CustomResidualAttentionBlock")))
    custom.eval()
    comp = TokenCompressor(custom)
    assert torch.allclose(comp.encode(images, 1.0).pooled, custom.encode_image(images), atol=1e-5)
    x = custom.visual._embeds(images)
    block = custom.visual.transformer.resblocks[0]
    y = block.ln_1(x)
    q, k, _ = torch.nn.functional.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    heads = block.attn.num_heads
    q = q.view(4, -1, heads, 16).transpose(1, 2)
    k = k.view(4, -1, heads, 16).transpose(1, 2)
    ref = (q[:, :, :1] @ k.transpose(-1, -2) / 4.0).softmax(-1)[:, :, 0].mean(1)
    torch.testing.assert_close(cls_attention(block, y), ref, rtol=1e-5, atol=1e-6)
    out = comp.encode(images, 0.5, with_patches=True)
    assert out.kept == (32, 16, 8) and out.patches.shape == (4, 8, 32)


def test_a_changed_block_fails_loudly_at_construction(model):
    """A block whose forward is not ln_1 -> attention -> ls_1, ln_2 -> mlp -> ls_2 (here: an extra scale on its
    output, as a changed open_clip could add) is caught by the construction probe."""
    odd = copy.deepcopy(model)
    block = odd.visual.transformer.resblocks[0]
    plain_forward = block.forward
    block.forward = lambda *a, **kw: 2.0 * plain_forward(*a, **kw)
    with pytest.raises(UnsupportedTower, match="does not reproduce") as err:
        TokenCompressor(odd)
    assert err.value.vit
