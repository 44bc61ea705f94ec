"""adapt/draws.py: the views' random draws, shared by the torch renderer and the edge's numpy/Pillow one."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from adaptclip.adapt.draws import MAX_VIEW_SIDE, crop_boxes, draw_views, shrink_for_views
from adaptclip.adapt.views import ViewGenerator
from adaptclip.compression.edge_views import ViewRenderer

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.stack([np.sin(7 * xx + c) * 90 + 128 + 50 * np.cos(5 * yy * (c + 1)) for c in range(3)], -1)
    return Image.fromarray(np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("height,width,scale", [(90, 120, (0.08, 1.0)), (33, 200, (0.5, 1.0)), (64, 64, (0.8, 1.0)),
                                                (120, 160, (0.3, 0.5))])
def test_crop_boxes_follow_torchvision(height: int, width: int, scale: tuple[float, float]) -> None:
    boxes = crop_boxes(np.random.default_rng(0), 3000, height, width, scale)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    centre = (h * w == height * width) | ((top == (height - h) // 2) & (left == (width - w) // 2))
    area = h[~centre] * w[~centre] / (height * width)  # boxes from a try that fitted: within the bounds
    slack = 2.0 / min(height, width)
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    aspect = w[~centre] / h[~centre]
    assert (aspect > 3 / 4 * (1 - 2 * slack)).all() and (aspect < 4 / 3 * (1 + 2 * slack)).all()
    # torchvision's own get_params over as many draws: the same distribution of areas and positions.
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
                    for _ in range(3000)])
    for got, want in ((h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)),
                      (top / height, ref[:, 0] / height), (left / width, ref[:, 1] / width)):
        assert abs(got.mean() - want.mean()) < 0.02 and abs(got.std() - want.std()) < 0.02


@pytest.mark.parametrize("height,width", [(10, 100), (100, 10), (50, 50)])
def test_crop_boxes_fall_back_to_torchvisions_centre_crop(height: int, width: int) -> None:
    """Full-area crops of an elongated image never fit: the centre crop, its ratio clamped to [3/4, 4/3]."""
    boxes = crop_boxes(np.random.default_rng(1), 20, height, width, (1.0, 1.0))
    want = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [1.0, 1.0], [3 / 4, 4 / 3])
    assert [tuple(b) for b in boxes.tolist()] == [tuple(want)] * 20


def test_draws_are_reproducible_per_seed_and_any_int64_seed_works() -> None:
    kw = dict(crop_scale=(0.08, 1.0))
    a, b = draw_views(5, 12, 80, 60, **kw), draw_views(5, 12, 80, 60, **kw)
    for f in dataclasses.fields(a):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))
    assert not np.array_equal(a.boxes, draw_views(6, 12, 80, 60, **kw).boxes)
    low, high = draw_views(-(2**63), 4, 80, 60, **kw), draw_views(2**63 - 1, 4, 80, 60, **kw)  # proto int64 range
    assert not np.array_equal(low.boxes, high.boxes)
    np.testing.assert_array_equal(draw_views(-1, 4, 80, 60, **kw).boxes, draw_views(2**64 - 1, 4, 80, 60, **kw).boxes)
    np.testing.assert_array_equal(a.select(3, 7).ops, a.ops[3:7])
    assert len(a.select(3, 7)) == 4
    np.testing.assert_allclose(a.mix_weights.sum(1), 1.0)
    assert set(np.unique(a.depth)) <= {1, 2, 3} and set(np.unique(a.signs)) <= {-1.0, 1.0}
    fixed = draw_views(5, 12, 80, 60, crop_scale=(0.08, 1.0), chains=2, depth=2, severity=3.0)
    assert fixed.ops.shape == (12, 2, 2) and (fixed.depth == 2).all() and fixed.levels.max() <= 3.0


def test_the_torch_and_edge_renderers_draw_the_same_views_of_a_seed() -> None:
    """One seed, one set of views: the server's ViewGenerator and the edge's ViewRenderer take the same draws
    (AugMix's chains too), and crops-only views come out equal up to float32 rounding."""
    image = photo(77, 52, 3)
    for augmix in (False, True):
        gen = ViewGenerator(32, MEAN, STD, crop_scale=(0.3, 1.0), augmix=augmix)
        edge = ViewRenderer(32, MEAN, STD, crop_scale=(0.3, 1.0), augmix=augmix)
        drawn, edge_drawn = gen._sample(11, 15, 52, 77), edge.sample(11, 15, 52, 77)
        assert drawn.boxes == [tuple(b) for b in edge_drawn.boxes.tolist()]
        np.testing.assert_array_equal(drawn.flip.numpy(), edge_drawn.flip)
        np.testing.assert_array_equal(drawn.ops.numpy(), edge_drawn.ops)
        np.testing.assert_allclose(drawn.levels.numpy(), edge_drawn.levels, rtol=1e-6)
    views = edge(image, 16, seed=11)
    torch_views = gen.plan(TF.to_tensor(image), torch.from_numpy(views[0]), 16, 11).render(0, 16)
    assert np.abs(torch_views.numpy() - views).mean() < 0.05  # AugMix: float kornia ops vs official 8-bit PIL
    gen = ViewGenerator(32, MEAN, STD, crop_scale=(0.3, 1.0), augmix=False)
    views = ViewRenderer(32, MEAN, STD, crop_scale=(0.3, 1.0), augmix=False)(image, 16, seed=11)
    torch_views = gen.plan(TF.to_tensor(image), torch.from_numpy(views[0]), 16, 11).render(0, 16)
    np.testing.assert_allclose(torch_views.numpy(), views, rtol=0, atol=1e-4)


def test_huge_photos_are_shrunk_to_the_same_pixels_everywhere() -> None:
    big = photo(1000, 400, 7)
    shrunk = shrink_for_views(big, 32)
    assert min(shrunk.size) == MAX_VIEW_SIDE * 32 and shrunk.size == (320, 128)
    assert shrink_for_views(photo(100, 60, 7), 32).size == (100, 60)
    assert shrink_for_views(big.convert("L"), 32).mode == "RGB"
    np.testing.assert_array_equal(ViewRenderer(32, MEAN, STD).prepare(big), np.asarray(shrunk, np.float32) / 255.0)
