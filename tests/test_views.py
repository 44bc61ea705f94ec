"""ViewGenerator: shapes, view 0, seeding, value ranges, crop scale."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptclip.adapt import ViewGenerator
from adaptclip.adapt.views import _OPS, _crop_boxes

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 32


def _images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 48, 64, generator=g), torch.rand(3, 40, 40, generator=g),
            torch.rand(3, 90, 30, generator=g)]


def _base(n: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(99))


def _denormalise(views: torch.Tensor) -> torch.Tensor:
    return views * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def test_shape_view0_and_range():
    gen = ViewGenerator(SIZE, MEAN, STD)
    images, base = _images(), _base(3)
    views = gen(images, base, n_views=6, seed=0)
    assert views.shape == (3, 6, 3, SIZE, SIZE) and views.dtype == base.dtype
    assert torch.equal(views[:, 0], base)
    assert torch.isfinite(views).all()
    pixels = _denormalise(views[:, 1:])
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # convex mixes of [0, 1] images


def test_same_seed_same_views_different_seed_different_views():
    gen = ViewGenerator(SIZE, MEAN, STD)
    images, base = _images(), _base(3)
    a = gen(images, base, n_views=5, seed=7)
    assert torch.equal(a, gen(images, base, n_views=5, seed=7))
    assert not torch.allclose(a[:, 1:], gen(images, base, n_views=5, seed=8)[:, 1:])


def test_batch_equals_per_image_with_matching_seeds():
    gen = ViewGenerator(SIZE, MEAN, STD)
    images, base = _images(), _base(3)
    batched = gen(images, base, n_views=4, seed=11)  # image i uses seed 11 + i
    listed = gen(images, base, n_views=4, seed=[11, 12, 13])
    assert torch.equal(batched, listed)
    for i, image in enumerate(images):
        single = gen([image], base[i:i + 1], n_views=4, seed=11 + i)
        torch.testing.assert_close(single[0], batched[i], atol=1e-6, rtol=0)


def test_unseeded_calls_follow_global_rng():
    gen = ViewGenerator(SIZE, MEAN, STD)
    images, base = _images(), _base(3)
    torch.manual_seed(3)
    a = gen(images, base, n_views=3)
    torch.manual_seed(3)
    assert torch.equal(a, gen(images, base, n_views=3))
    assert not torch.allclose(a[:, 1:], gen(images, base, n_views=3)[:, 1:])


def test_single_view_returns_base():
    gen = ViewGenerator(SIZE, MEAN, STD)
    base = _base(3)
    assert torch.equal(gen(_images(), base, n_views=1, seed=0)[:, 0], base)


def test_full_scale_crop_without_augmix_is_the_resized_image():
    # crop_scale (1, 1) on a square image can only pick the whole image; flips are random.
    gen = ViewGenerator(SIZE, MEAN, STD, crop_scale=(1.0, 1.0), augmix=False)
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(5))
    views = _denormalise(gen([image], _base(1), n_views=8, seed=0)[0, 1:])
    resized = F.interpolate(image[None], size=(SIZE, SIZE), mode="bicubic", align_corners=False,
                            antialias=True).clamp(0, 1)[0]
    for view in views:
        assert min((view - resized).abs().max(), (view - resized.flip(-1)).abs().max()) < 1e-5


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.3, 0.5), (0.9, 1.0)])
def test_crop_boxes_respect_scale(scale):
    g = torch.Generator().manual_seed(0)
    height, width = 120, 160
    for top, left, h, w in _crop_boxes(g, 200, height, width, scale):
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert scale[0] * 0.9 <= h * w / (height * width) <= scale[1] * 1.1


def test_every_augmix_op_keeps_shape_and_range():
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    level, sign = torch.tensor([0.1, 0.5, 1.0, 0.7]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    for name, op in _OPS.items():
        out = op(x, level, sign)
        assert out.shape == x.shape, name
        assert out.min() >= 0 and out.max() <= 1 + 1e-6, name


def test_runs_without_augmix_and_on_other_dtypes():
    gen = ViewGenerator(SIZE, MEAN, STD, augmix=False, interpolation="bilinear")
    views = gen(_images(), _base(3).double(), n_views=3, seed=1)
    assert views.dtype == torch.float64 and torch.isfinite(views).all()


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=0), "image_size"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
    (dict(augmix_severity=11), "augmix_severity"),
    (dict(augmix_width=0), "augmix_width"),
    (dict(augmix_depth=0), "augmix_depth"),
    (dict(interpolation="lanczos"), "interpolation"),
    (dict(std=(0.2, 0.0, 0.2)), "std"),
])
def test_invalid_constructor_arguments(kwargs, name):
    args = dict(image_size=SIZE, mean=MEAN, std=STD)
    args.update(kwargs)
    size, mean, std = args.pop("image_size"), args.pop("mean"), args.pop("std")
    with pytest.raises(ValueError, match=name):
        ViewGenerator(size, mean, std, **args)


@pytest.mark.parametrize("call, name", [
    (lambda g, im, b: g(im, b[:2], 3, 0), "images"),
    (lambda g, im, b: g(im, b[..., :-1], 3, 0), "base_views"),
    (lambda g, im, b: g(im, b, 0, 0), "n_views"),
    (lambda g, im, b: g(im, b, 3, [1, 2]), "seed"),
    (lambda g, im, b: g([im[0][:1]] + im[1:], b, 3, 0), "images"),
])
def test_invalid_call_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call(ViewGenerator(SIZE, MEAN, STD), _images(), _base(3))
