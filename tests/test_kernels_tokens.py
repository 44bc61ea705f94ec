"""The token-selection kernel (adaptclip.kernels.token_select) against compression.tokens.reduce_tokens.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below and by the suite's
conftest before the first `import triton`; tests/test_kernels_views.py says why it must be that early).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from adaptclip.compression.tokens import cls_attention as cls_attention_torch  # noqa: E402
from adaptclip.compression.tokens import reduce_tokens as reduce_tokens_torch  # noqa: E402
from adaptclip.kernels._common import is_interpreted  # noqa: E402
from adaptclip.kernels.token_select import _select_kernel, cls_attention, reduce_tokens  # noqa: E402

DEVICES = [
    # Without CUDA, kernels compiled for it (TRITON_INTERPRET set too late) fail here, loudly.
    pytest.param("cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available() and not is_interpreted(_select_kernel), reason="kernels compiled for CUDA here")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available() or is_interpreted(_select_kernel),
        reason="needs CUDA and compiled kernels (TRITON_INTERPRET unset)")]),
]


def _stage(n: int, n_patch: int, dim: int, fused: bool, dtype: torch.dtype, device: str,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [N, 1 + K (+1), D], indices [N, K] (an expanded row, as the compressor's first stage
    passes them, or per-image subsets) and fp32 softmax-like scores [N, K (+1)] without ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1 + n_patch + int(fused), dim, generator=g).to(device, dtype)
    if seed % 2:
        index = torch.stack([torch.randperm(3 * n_patch, generator=g)[:n_patch].sort().values for _ in range(n)])
    else:
        index = torch.arange(n_patch).expand(n, -1)
    scores = torch.rand(n, n_patch + int(fused), generator=g).softmax(-1)
    return x, index.to(device), scores.to(device)


def _assert_same(got: tuple, want: tuple, dtype: torch.dtype) -> None:
    (x, index, fuse), (x_ref, index_ref, fuse_ref) = got, want
    assert fuse == fuse_ref and x.shape == x_ref.shape and x.dtype == x_ref.dtype
    assert torch.equal(index, index_ref)
    n_kept = 1 + index.shape[1]
    assert torch.equal(x[:, :n_kept], x_ref[:, :n_kept])  # CLS and kept tokens are copies
    if fuse:  # the fused token: fp32 sums in another order, within one rounding of the dtype
        torch.testing.assert_close(x[:, n_kept:].float(), x_ref[:, n_kept:].float(), rtol=2 * torch.finfo(dtype).eps,
                                   atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["first-stage", "fused-token-in"])
def test_matches_reference(device: str, dtype: torch.dtype, fused: bool) -> None:
    """k = 1, a middle k over several 32-patch chunks, and k = K, with and without fusing."""
    x, index, scores = _stage(3, 70, 40, fused, dtype, device, seed=int(fused))
    for k in (1, 49, 70):
        for fuse in (False, True):
            _assert_same(reduce_tokens(x, index, scores, k, fuse, fused),
                         reduce_tokens_torch(x, index, scores, k, fuse, fused), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_vit_b16_first_stage_shape(device: str) -> None:
    """197 tokens (196 patches) at keep 0.7 and D not a multiple of the 128-channel block."""
    x, index, scores = _stage(2, 196, 200, False, torch.float16, device, seed=2)
    _assert_same(reduce_tokens(x, index, scores, 138, True, False),
                 reduce_tokens_torch(x, index, scores, 138, True, False), torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_keep_the_earlier_positions(device: str) -> None:
    """Scores tied at the k-th place: the kernel keeps the earliest tied positions (torch.topk
    may keep any of them), so it is checked against that rule, and against the reference only
    on what the rule does not decide: the kept scores and the tokens they carry."""
    x, index, _ = _stage(1, 8, 16, False, torch.float32, device, seed=3)
    scores = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.05, 0.3, 0.3, 0.0]], device=device)
    out, kept, fuse = reduce_tokens(x, index, scores, 3, True, False)
    assert kept.tolist() == [index[0, [1, 3, 5]].tolist()]  # 4 patches tie at 0.3: positions 1, 3, 5 win
    assert torch.equal(out[:, 1:4], x[:, [2, 4, 6]])
    dropped = torch.tensor([0, 2, 4, 6, 7])
    weights = scores[0, dropped]
    torch.testing.assert_close(out[0, 4], (weights[:, None] * x[0, 1 + dropped]).sum(0) / weights.sum())
    _, kept_ref, _ = reduce_tokens_torch(x, index, scores, 3, True, False)
    position = {int(v): i for i, v in enumerate(index[0])}
    assert torch.equal(scores[0, [position[int(v)] for v in kept_ref[0]]], scores[0, [1, 3, 5]])  # all 0.3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cls_attention_matches_reference(device: str, dtype: torch.dtype) -> None:
    """A real open_clip block (4 heads of 16, with in_proj bias), 70 tokens: two 64-token chunks."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4, batch_first=True).eval().to(device)
    y = block.ln_1(torch.randn(3, 70, 64, device=device)).detach().to(dtype)
    got = cls_attention(block, y)
    want = cls_attention_torch(block, y)
    assert got.shape == (3, 70) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_rejects_bad_shapes() -> None:
    x, index, scores = _stage(2, 10, 8, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="k must be"):
        reduce_tokens(x, index, scores, 11, True, False)
    with pytest.raises(ValueError, match="x must be"):
        reduce_tokens(x, index, scores, 3, True, True)  # says fused but has no fused token
