"""ViewGenerator: shapes, view 0, seeding, value ranges, crop scale."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptclip.adapt import ViewGenerator
from adaptclip.adapt.views import _OPS, _translate

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


def test_every_augmix_op_keeps_shape_and_range():
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    level, sign = torch.tensor([0.1, 0.5, 1.0, 0.7]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    for name, op in _OPS.items():
        out = op(x, level, sign)
        assert out.shape == x.shape, name
        assert out.min() >= 0 and out.max() <= 1 + 1e-6, name


@pytest.mark.parametrize("axis", [0, 1])
def test_translate_equals_kornias_bilinear_translate_at_whole_pixels(axis):
    import kornia.geometry.transform as KT

    x = torch.rand(6, 3, 40, 37, generator=torch.Generator().manual_seed(3))
    amount = torch.tensor([-5.0, 0.0, 3.0, 12.0, -12.0, 1.0])
    pair = [torch.zeros_like(amount), torch.zeros_like(amount)]
    pair[axis] = amount
    want = KT.translate(x, torch.stack(pair, dim=-1), mode="bilinear")
    torch.testing.assert_close(_translate(x, amount, axis), want, rtol=0, atol=1e-5)


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


def _params(n: int, *, flip: bool = False, op: str = "solarize", blend: float = 0.0,
            weights: tuple[float, float, float] = (1.0, 0.0, 0.0)):
    """Hand-made draws: whole-image boxes, one op per chain at full severity."""
    import numpy as np

    from adaptclip.adapt.draws import OP_NAMES, ViewParams
    from adaptclip.adapt.views import _Params

    return _Params.of(ViewParams(
        boxes=np.array([(0, 0, SIZE, SIZE)] * n), flip=np.full(n, flip), mix_weights=np.array([weights] * n),
        blend=np.full(n, blend), depth=np.ones((n, 3), np.int64), ops=np.full((n, 3, 3), OP_NAMES.index(op)),
        levels=np.full((n, 3, 3), 10.0), signs=np.ones((n, 3, 3))))


@pytest.mark.parametrize("device_is_cpu", [True, False])
def test_augmix_applies_its_ops_and_mixes_them_with_the_crop(device_is_cpu):
    """Solarize at full severity (threshold 0) inverts every pixel: a chain of it, weighted 1 and blended 0,
    gives 1 - crop; blend 1 gives the crop; blend 0.25 the affine mix. Without AugMix none of this happens.
    On the CPU the PIL rendering (8-bit crops), elsewhere Kornia's float ops (run here on CPU tensors)."""
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    gen = ViewGenerator(SIZE, MEAN, STD, augmix=True)
    crops = ViewGenerator(SIZE, MEAN, STD, augmix=False)._augment
    if device_is_cpu:  # whole-image boxes at the image's own size: PIL's crop is the 8-bit image itself
        image = torch.round(image * 255) / 255  # an 8-bit image, as to_tensor reads one
        augment, tol, plain = gen._augment, {"rtol": 0, "atol": 1e-6}, image[None].expand(2, -1, -1, -1)
    else:
        augment, tol, plain = (lambda im, p: gen._kornia_augmix(crops(im, p), p)), {}, crops(image, _params(2))
    torch.testing.assert_close(augment(image, _params(2)), 1.0 - plain, **tol)
    torch.testing.assert_close(augment(image, _params(2, blend=1.0)), plain, **tol)
    torch.testing.assert_close(augment(image, _params(2, blend=0.25)), 0.25 * plain + 0.75 * (1.0 - plain), **tol)
    # Seeded AugMix views differ from the same seed's plain crops (same boxes and flips: drawn first).
    aug = gen(_images(), _base(3), 9, seed=4)
    plain_views = ViewGenerator(SIZE, MEAN, STD, augmix=False)(_images(), _base(3), 9, seed=4)
    assert ((aug[:, 1:] - plain_views[:, 1:]).abs().flatten(2).mean(-1) > 1e-3).float().mean() > 0.9


def test_cpu_augmix_views_are_the_edge_renderers():
    """On the CPU both paths render a seed's AugMix views with the same PIL code from the same draws."""
    import numpy as np
    from PIL import Image

    from adaptclip.adapt.views import view_plan
    from adaptclip.compression.edge_views import ViewRenderer

    rng = np.random.default_rng(8)
    img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).resize((120, 93))
    renderer = ViewRenderer(SIZE, MEAN, STD, crop_scale=(0.3, 1.0))
    edge = renderer(img, 12, seed=21)

    class Model:  # what view_plan reads of a model
        image_size, mean, std, device = SIZE, MEAN, STD, torch.device("cpu")
        kernels = type("K", (), {"views": "torch"})()

    from adaptclip.adapt.settings import AdaptSettings

    s = AdaptSettings(method="gs_bias", views=12, seed=21, crop_scale=(0.3, 1.0), augmix=True)
    got = view_plan(Model(), img, torch.from_numpy(edge[0]), s).render(0, 12)
    np.testing.assert_allclose(got.numpy(), edge, rtol=0, atol=1e-6)


def test_flipped_views_are_mirror_images_of_their_crops():
    """Each view is its drawn box resized, mirrored exactly when its flip draw says so."""
    gen = ViewGenerator(SIZE, MEAN, STD, augmix=False)
    image = _images()[0]
    params = gen._sample(11, 16, image.shape[-2], image.shape[-1])
    assert params.flip.any() and not params.flip.all()
    views = gen._augment(image, params)
    for v, (top, left, h, w) in enumerate(params.boxes):
        crop = F.interpolate(image[None, :, top:top + h, left:left + w], size=(SIZE, SIZE), mode="bicubic",
                             align_corners=False, antialias=True).clamp(0, 1)[0]
        want = crop.flip(-1) if params.flip[v] else crop
        torch.testing.assert_close(views[v], want)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_batched_crops_equal_one_interpolate_per_view(mode):
    """All crops of an image in two batched matmuls = F.interpolate(antialias=True) per view, for down-
    and upscaled crops, thin ones, the whole image and a single pixel."""
    from adaptclip.adapt.views import resized_crops

    image = torch.rand(3, 70, 53, generator=torch.Generator().manual_seed(3))
    boxes = [(0, 0, 70, 53), (5, 9, 40, 30), (60, 40, 10, 13), (0, 50, 70, 3), (33, 21, 1, 1), (2, 2, 20, 51)]
    for size in (8, 32, 47):
        want = torch.cat([F.interpolate(image[None, :, t:t + h, l:l + w], size=(size, size), mode=mode,
                                        align_corners=False, antialias=True) for t, l, h, w in boxes]).clamp(0, 1)
        torch.testing.assert_close(resized_crops(image, boxes, size, mode), want, rtol=0, atol=5e-6)
    assert resized_crops(image, [], 8).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("augmix", [False, True])
def test_a_plan_renders_any_split_of_the_views_as_one_call(augmix):
    """Draws made apart from the transform: views rendered chunk by chunk (as the server overlaps them
    with encoding) equal the same seed's views rendered at once."""
    gen = ViewGenerator(SIZE, MEAN, STD, augmix=augmix)
    image, base = _images()[0], _base(1)
    whole = gen([image], base, n_views=11, seed=5)[0]
    plan = gen.plan(image, base[0], 11, seed=5)
    assert len(plan) == 11
    pieces = torch.cat([plan.render(0, 1), plan.render(1, 4), plan.render(4, 4), plan.render(4, 11)])
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-6)
    assert torch.equal(plan.render(0, 1)[0], base[0])
    with pytest.raises(ValueError, match="outside"):
        plan.render(3, 12)
