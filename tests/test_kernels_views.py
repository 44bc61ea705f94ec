"""The views kernel (adaptclip.kernels.views.render_batch) against its torch reference.

Without CUDA the kernels run in Triton's CPU interpreter, which `@triton.jit` picks at decoration
time, for triton.language's own functions too: TRITON_INTERPRET=1 must be set before the first
`import triton` in the process. This module sets it (without CUDA) for runs where it is the
first; the suite's conftest imports open_clip and kornia, hence torch._dynamo, hence triton, so
it must set it itself, at its top (else the CPU variants fail, saying so). The CUDA variants run
where the kernels were compiled (CUDA present, TRITON_INTERPRET unset).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from adaptclip.kernels._common import is_interpreted  # noqa: E402
from adaptclip.kernels.views import _views_kernel, render_batch, render_batch_torch  # noqa: E402

DEVICES = [
    # Without CUDA, kernels compiled for it (TRITON_INTERPRET set too late) fail here, loudly.
    pytest.param("cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available() and not is_interpreted(_views_kernel), reason="kernels compiled for CUDA here")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available() or is_interpreted(_views_kernel),
        reason="needs CUDA and compiled kernels (TRITON_INTERPRET unset)")]),
]
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
# Two non-square sources; per image: the whole image (downscale for S < side), a small box
# (upscale), one touching the bottom-right border, one 1 pixel wide, one 1 x 1, one tall.
SHAPES = ((37, 50), (20, 13))
BOXES = [[(0, 0, 37, 50), (5, 7, 3, 4), (30, 40, 7, 10), (2, 49, 30, 1), (36, 0, 1, 1), (0, 20, 37, 9)],
         [(0, 0, 20, 13), (19, 12, 1, 1), (4, 0, 16, 1), (1, 2, 5, 11), (0, 3, 20, 10), (10, 6, 10, 7)]]
FLIPS = [[False, True, True, False, True, False], [True, False, True, True, False, False]]


def _images(device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g).to(device) for h, w in SHAPES]


def _max_pixel_error(views: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference in [0, 1] pixel units (normalised values times std)."""
    std = torch.tensor(STD, device=views.device).view(3, 1, 1)
    return float(((views.float() - ref.float()).abs() * std).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [8, 17, 32])
def test_matches_reference_fp32(device: str, mode: str, size: int) -> None:
    images = _images(device)
    views = render_batch(images, BOXES, FLIPS, size, MEAN, STD, mode)
    ref = render_batch_torch(images, BOXES, FLIPS, size, MEAN, STD, mode)
    assert views.shape == ref.shape == (2, 6, 3, size, size) and views.dtype == torch.float32
    assert _max_pixel_error(views, ref) <= 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_and_uint8_sources(device: str, dtype: torch.dtype) -> None:
    """uint8 sources, one HWC and one CHW in the same launch, and a float16 source, written in half."""
    g = torch.Generator().manual_seed(1)
    hwc = torch.randint(0, 256, (37, 50, 3), generator=g, dtype=torch.uint8)
    chw = torch.randint(0, 256, (3, 20, 13), generator=g, dtype=torch.uint8)
    for images in ([hwc.to(device), chw.to(device)], [im.half() for im in _images(device, 2)]):
        views = render_batch(images, BOXES, FLIPS, 12, MEAN, STD, "bicubic", dtype)
        ref = render_batch_torch(images, BOXES, FLIPS, 12, MEAN, STD, "bicubic", dtype)
        assert views.dtype == ref.dtype == dtype
        # Within one rounding step of the output dtype on top of the fp32 tolerance.
        step = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1.0)
        assert ((views.float() - ref.float()).abs() <= step + 1e-3 / min(STD)).all()


def test_rejects_boxes_outside_the_image() -> None:
    images = _images("cpu")
    bad = [BOXES[0][:1], [(0, 0, 21, 13)]]  # 21 rows in a 20-row image
    for render in (render_batch, render_batch_torch):
        with pytest.raises(ValueError, match=r"boxes\[1\]"):
            render(images, bad, [[False], [False]], 8, MEAN, STD)


# Pins the reference to today's ViewGenerator. It uses the private `_sample` (the shared draws of
# adapt/draws.py as tensors): rename here if the refactor renames it.
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_reference_equals_view_generator(mode: str) -> None:
    from adaptclip.adapt.views import ViewGenerator

    size, n_views, seed = 16, 5, 3
    images = _images("cpu", 4)
    generator = ViewGenerator(size, MEAN, STD, augmix=False, interpolation=mode)
    views = generator(images, torch.zeros(len(images), 3, size, size), n_views, seed=seed)
    params = [generator._sample(seed + i, n_views - 1, *image.shape[1:])
              for i, image in enumerate(images)]
    ref = render_batch_torch(images, [p.boxes for p in params], torch.stack([p.flip for p in params]),
                             size, MEAN, STD, mode)
    # ViewGenerator resizes all crops in batched banded matmuls (adapt/resample.py), the reference per
    # view with F.interpolate: the same filter, summed in another order (float32 rounding, normalised units).
    torch.testing.assert_close(views[:, 1:], ref, rtol=0, atol=2e-5)
