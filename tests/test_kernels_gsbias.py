"""The fused GS-Bias kernels (adaptclip.kernels.gsbias.gs_bias) against adaptclip.adapt.gsbias.gs_bias.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below and by the suite's
conftest before the first `import triton`; tests/test_kernels_views.py says why it must be that early).
"""
from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adaptclip.adapt.gsbias import GSBiasResult  # noqa: E402
from adaptclip.adapt.gsbias import gs_bias as gs_bias_torch  # noqa: E402
from adaptclip.kernels._common import is_interpreted  # noqa: E402
from adaptclip.kernels.gsbias import GSBiasOutput, _adapt_kernel, gs_bias  # noqa: E402

DEVICES = [
    # Without CUDA, kernels compiled for it (TRITON_INTERPRET set too late) fail here, loudly.
    pytest.param("cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available() and not is_interpreted(_adapt_kernel), reason="kernels compiled for CUDA here")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available() or is_interpreted(_adapt_kernel),
        reason="needs CUDA and compiled kernels (TRITON_INTERPRET unset)")]),
]


def _inputs(batch: int, views: int, patches: int, classes: int, dim: int, seed: int = 0,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised view features [B, V, D], patch features [B, P, D] and a classifier [C, D]."""
    g = torch.Generator().manual_seed(seed)
    feats, patch_feats, weights = (F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)
                                   for shape in ((batch, views, dim), (batch, patches, dim), (classes, dim)))
    return feats, patch_feats, weights


def _assert_same(got: GSBiasOutput, want: GSBiasResult, tol: float = 1e-4) -> None:
    assert GSBiasOutput._fields == tuple(f.name for f in dataclasses.fields(GSBiasResult))
    for name in ("logits", "global_bias", "spatial_bias"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a, b.to(a.device), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got.steps_run.cpu(), want.steps_run.cpu())


# (batch, views, patches, classes, dim), keyword arguments. Class tiles are 128 wide (saliency: 64).
CASES = {
    "defaults-3-class-tiles": ((2, 16, 20, 300, 32), {}),
    "3-steps-kept-30%-K5": ((2, 16, 20, 130, 32), dict(steps=3, selection_ratio=0.3, alpha=20.0, top_k_patches=5)),
    "V=1": ((2, 1, 7, 37, 16), dict(steps=2)),
    "ratio-keeps-0-views": ((2, 4, 7, 37, 16), dict(selection_ratio=0.1, steps=2)),  # int(0.4) -> 1 view
    "K>P": ((2, 8, 5, 37, 16), dict(top_k_patches=16, beta=5.0)),
    "steps=0": ((2, 8, 7, 37, 16), dict(steps=0)),
    "C=1": ((2, 8, 7, 1, 16), dict(steps=2)),
    "soft-logits-all-views": ((1, 8, 7, 65, 16), dict(logit_scale=10.0, selection_ratio=1.0, steps=2, alpha=2.0)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(device: str, case: str) -> None:
    shape, kwargs = CASES[case]
    feats, patch_feats, weights = _inputs(*shape, device=device)
    _assert_same(gs_bias(feats, patch_feats, weights, **kwargs),
                 gs_bias_torch(feats.cpu(), patch_feats.cpu(), weights.cpu(), **kwargs))


@pytest.mark.parametrize("device", DEVICES)
def test_global_only_and_unbatched(device: str) -> None:
    feats, patch_feats, weights = _inputs(2, 8, 7, 37, 16, seed=1, device=device)
    kwargs = dict(steps=2, selection_ratio=0.25)
    got = gs_bias(feats, None, weights, **kwargs)
    _assert_same(got, gs_bias_torch(feats.cpu(), None, weights.cpu(), **kwargs))
    assert not got.spatial_bias.any()
    one = gs_bias(feats[1], patch_feats[1], weights, **kwargs)  # [V, D] / [P, D] -> [C] results
    assert one.logits.shape == (37,) and one.steps_run.shape == ()
    _assert_same(one, gs_bias_torch(feats[1].cpu(), patch_feats[1].cpu(), weights.cpu(), **kwargs))


@pytest.mark.parametrize("device", DEVICES)
def test_early_stop_fires_per_image(device: str) -> None:
    """Soft logits and a large step: the 25 % early stop fires after 1, 2 or 3 updates or never."""
    feats, patch_feats, weights = _inputs(6, 8, 10, 50, 16, device=device)
    kwargs = dict(steps=4, logit_scale=10.0, alpha=5.0, selection_ratio=0.5, top_k_patches=4)
    want = gs_bias_torch(feats.cpu(), patch_feats.cpu(), weights.cpu(), **kwargs)
    assert want.steps_run.tolist() == [4, 3, 3, 2, 2, 2]
    # Not a threshold case decided by rounding: the reference in float64 stops at the same steps.
    wide = gs_bias_torch(feats.cpu().double(), patch_feats.cpu().double(), weights.cpu().double(), **kwargs)
    assert torch.equal(wide.steps_run, want.steps_run)
    _assert_same(gs_bias(feats, patch_feats, weights, **kwargs), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(device: str, dtype: torch.dtype) -> None:
    """Half inputs against the reference on the same half inputs (it upcasts to fp32, as the kernels do)."""
    feats, patch_feats, weights = (t.to(dtype) for t in _inputs(2, 16, 20, 130, 32, seed=2, device=device))
    kwargs = dict(steps=2, selection_ratio=0.25, top_k_patches=5)
    _assert_same(gs_bias(feats, patch_feats, weights, **kwargs),
                 gs_bias_torch(feats.cpu(), patch_feats.cpu(), weights.cpu(), **kwargs))
    # Mixed dtypes (half features, fp32 classifier) take the fp32 GEMM.
    _assert_same(gs_bias(feats, patch_feats, weights.float(), **kwargs),
                 gs_bias_torch(feats.cpu(), patch_feats.cpu(), weights.cpu().float(), **kwargs))


def test_rejects_what_the_kernels_cannot_run() -> None:
    feats, patch_feats, weights = _inputs(1, 4, 7, 5, 8)
    with pytest.raises(ValueError, match="V <= 256"):
        gs_bias(torch.zeros(1, 257, 8), None, weights)
    with pytest.raises(ValueError, match="selection_ratio"):
        gs_bias(feats, patch_feats, weights, selection_ratio=0.0)
    with pytest.raises(ValueError, match="top_k_patches"):
        gs_bias(feats, patch_feats, weights, top_k_patches=0)
