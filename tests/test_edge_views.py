"""The edge runner's numpy/Pillow view renderer: seeding, crops, flips, AugMix, resampling parity, no torch."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from adaptclip.compression import edge_views
from adaptclip.compression.edge_model import preprocess_image
from adaptclip.adapt.draws import OP_NAMES, ViewParams, crop_boxes
from adaptclip.adapt.pil_augmix import augmix_op
from adaptclip.compression.edge_views import ViewRenderer, resized_crops

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BILINEAR = Image.Resampling.BILINEAR


def photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients, a few flat boxes (hard edges: bicubic overshoots) and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.stack([np.sin(6 * xx + c) * 80 + 128 + 60 * np.cos(9 * yy * (c + 1)) for c in range(3)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        arr[y0:y0 + h // 5, x0:x0 + w // 6] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float32) / 255.0


def test_views_are_seeded_shaped_and_start_with_the_plain_preprocessing() -> None:
    image, renderer = photo(61, 47, 0), ViewRenderer(32, MEAN, STD)
    views = renderer(image, 9, seed=3)
    assert views.shape == (9, 3, 32, 32) and views.dtype == np.float32 and np.isfinite(views).all()
    np.testing.assert_array_equal(views[0], preprocess_image(image, 32, MEAN, STD))
    np.testing.assert_array_equal(views, renderer(image, 9, seed=3))
    assert not np.allclose(views[1:], renderer(image, 9, seed=4)[1:])
    pixels = views[1:] * np.reshape(STD, (3, 1, 1)) + np.reshape(MEAN, (3, 1, 1))
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # convex mixes of [0, 1] images
    given = np.zeros((3, 32, 32), np.float32)
    np.testing.assert_array_equal(renderer(image, 9, seed=3, view0=given)[0], given)
    assert renderer(image, 1, seed=3).shape == (1, 3, 32, 32)


def test_any_chunk_of_views_renders_from_its_parameters() -> None:
    """Drawn apart from the transform: views 3..5 alone equal the same views rendered with all the others."""
    image, renderer = photo(40, 52, 1), ViewRenderer(24, MEAN, STD)
    pixels = renderer.prepare(image)
    params = renderer.sample(7, 8, *pixels.shape[:2])
    np.testing.assert_allclose(renderer.render(pixels, params.select(2, 5)),
                               renderer(image, 9, seed=7)[3:6], rtol=0, atol=1e-6)
    assert len(params.select(2, 5)) == 3
    assert renderer.render(pixels, params.select(4, 4)).shape == (0, 3, 24, 24)


def test_switching_augmix_keeps_the_crops_and_changes_the_pixels() -> None:
    image = photo(50, 50, 2)
    plain = ViewRenderer(32, MEAN, STD, augmix=False)(image, 6, seed=0)
    mixed = ViewRenderer(32, MEAN, STD, augmix=True)(image, 6, seed=0)
    params = ViewRenderer(32, MEAN, STD).sample(0, 5, 50, 50)  # the same draws
    crops = resized_crops(_pixels(image), params.boxes, 32)
    crops[params.flip] = crops[params.flip, :, :, ::-1]
    np.testing.assert_allclose(plain[1:], (crops - np.reshape(MEAN, (3, 1, 1))) / np.reshape(STD, (3, 1, 1)),
                               atol=1e-5)
    assert np.abs(mixed[1:] - plain[1:]).max(axis=(1, 2, 3)).min() > 0.05  # every view really changed


def _torch_crop(pixels: np.ndarray, box: tuple[int, int, int, int], size: int, mode: str = "bicubic") -> np.ndarray:
    """The torch path's crop: F.interpolate(antialias=True) of the box, clamped (adapt/views.py)."""
    top, left, h, w = (int(b) for b in box)
    crop = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)[0].clamp(0, 1).numpy()


def test_flip_really_flips() -> None:
    image = photo(45, 38, 3)
    renderer = ViewRenderer(32, MEAN, STD, augmix=False)
    pixels = renderer.prepare(image)
    params = renderer.sample(1, 4, *pixels.shape[:2])
    for flip in (False, True):
        forced = dataclasses.replace(params, flip=np.full(4, flip))
        got = renderer.augment(pixels, forced)
        for v, box in enumerate(params.boxes):
            want = _torch_crop(pixels, box, 32)
            np.testing.assert_allclose(got[v], want[:, :, ::-1] if flip else want, atol=1e-4)


# The official ops of azshue/TPT data/augmix_ops.py, written out, on an 8-bit PIL image at size S.
OFFICIAL = {
    "autocontrast": lambda im, level, sign: ImageOps.autocontrast(im),
    "equalize": lambda im, level, sign: ImageOps.equalize(im),
    "posterize": lambda im, level, sign: ImageOps.posterize(im, 4 - int(level * 4 / 10)),
    "rotate": lambda im, level, sign: im.rotate(int(level * 30 / 10) * sign, resample=BILINEAR),
    "solarize": lambda im, level, sign: ImageOps.solarize(im, 256 - int(level * 256 / 10)),
    "shear_x": lambda im, level, sign: im.transform(im.size, Image.Transform.AFFINE,
                                                    (1, level * 0.3 / 10 * sign, 0, 0, 1, 0), resample=BILINEAR),
    "shear_y": lambda im, level, sign: im.transform(im.size, Image.Transform.AFFINE,
                                                    (1, 0, 0, level * 0.3 / 10 * sign, 1, 0), resample=BILINEAR),
    "translate_x": lambda im, level, sign: im.transform(im.size, Image.Transform.AFFINE,
                                                        (1, 0, int(level * (im.size[0] / 3) / 10) * sign, 0, 1, 0),
                                                        resample=BILINEAR),
    "translate_y": lambda im, level, sign: im.transform(im.size, Image.Transform.AFFINE,
                                                        (1, 0, 0, 0, 1, int(level * (im.size[0] / 3) / 10) * sign),
                                                        resample=BILINEAR),
}


def test_augmix_equals_the_drawn_official_ops_applied_by_hand() -> None:
    size, image = 64, photo(80, 70, 4)
    pixels = _pixels(image)
    names = list(OP_NAMES)
    params = ViewParams(
        boxes=np.array([[0, 0, 70, 80], [5, 9, 40, 50]]), flip=np.array([False, True]),
        mix_weights=np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]), blend=np.array([0.25, 0.7]),
        depth=np.array([[1, 2, 3], [3, 3, 1]]),
        ops=np.array([[[0, 0, 0], [1, 2, 0], [3, 4, 5]], [[6, 7, 8], [8, 3, 5], [2, 0, 0]]]),
        levels=np.array([[[0.5, 0, 0], [0.5, 0.99, 0], [0.9, 0.99, 0.7]], [[0.8, 0.99, 0.99], [0.6, 0.5, 0.3], [0.4, 0, 0]]]),
        signs=np.array([[[1, 1, 1], [1, 1, 1], [-1, 1, -1]], [[1, -1, 1], [-1, 1, 1], [1, 1, 1]]], float))
    assert {names[o] for v in range(2) for c in range(3) for o in params.ops[v, c, :params.depth[v, c]]} == set(names)
    got = ViewRenderer(size, MEAN, STD).augment(pixels, params)
    for v in range(2):  # the official AugMixAugmenter: an 8-bit PIL crop, flipped, its chains, the blend
        top, left, h, w = params.boxes[v]
        x_orig = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
        x_orig = x_orig.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip[v] else x_orig
        crop = np.asarray(x_orig, np.float32).transpose(2, 0, 1) / 255
        mix = np.zeros_like(crop)
        for c in range(3):
            im = x_orig
            for d in range(params.depth[v, c]):
                im = OFFICIAL[names[params.ops[v, c, d]]](im, params.levels[v, c, d], params.signs[v, c, d])
            mix += params.mix_weights[v, c] * np.asarray(im, np.float32).transpose(2, 0, 1) / 255
        want = params.blend[v] * crop + (1 - params.blend[v]) * mix
        np.testing.assert_allclose(got[v], want, rtol=0, atol=1e-5)
        assert np.abs(got[v] - crop).max() > 0.05
        float_crop = resized_crops(pixels, params.boxes[v:v + 1], size)[0]  # the crop without AugMix (= torch's)
        float_crop = float_crop[:, :, ::-1] if params.flip[v] else float_crop
        assert np.abs(crop - float_crop).mean() < 2 / 255  # PIL's 8-bit resize: rounding apart


@pytest.mark.parametrize("size", [32, 57])
def test_augmix_ops_equal_the_official_pil_calls_bit_for_bit(size: int) -> None:
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    images[1] = images[1] // 4 + 60  # low contrast
    images[2, :, :, 0] = 7  # a constant channel (autocontrast / equalize leave it)
    images[3] = np.asarray(photo(size, size, 5))
    for op in OP_NAMES:
        for severity in (1.0, 10.0):
            levels = rng.uniform(0.1, severity, 5)
            signs = np.where(rng.uniform(size=5) > 0.5, -1.0, 1.0)
            got = np.stack([np.asarray(augmix_op(Image.fromarray(im), op, lv, sg))
                            for im, lv, sg in zip(images, levels, signs)])
            want = np.stack([np.asarray(OFFICIAL[op](Image.fromarray(im), lv, sg))
                             for im, lv, sg in zip(images, levels, signs)])
            np.testing.assert_array_equal(got, want, err_msg=op)


@pytest.mark.parametrize("size,interpolation", [(32, "bicubic"), (32, "bilinear"), (96, "bicubic"), (224, "bicubic")])
def test_batched_resize_equals_torch_and_pil(size: int, interpolation: str) -> None:
    image = photo(120, 90, 6)
    pixels = _pixels(image)
    boxes = crop_boxes(np.random.default_rng(size), 6, 90, 120, (0.05, 1.0))  # down- and upsampling
    got = resized_crops(pixels, boxes, size, interpolation)
    assert got.shape == (6, 3, size, size) and got.dtype == np.float32
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
    channels = [Image.fromarray(pixels[..., c]) for c in range(3)]  # PIL float images: no 8-bit rounding
    for v, (top, left, h, w) in enumerate(boxes.tolist()):
        np.testing.assert_allclose(got[v], _torch_crop(pixels, (top, left, h, w), size, interpolation), atol=1e-4)
        pil_float = np.stack([np.asarray(ch.crop((left, top, left + w, top + h)).resize((size, size), resample))
                              for ch in channels]).clip(0, 1)
        np.testing.assert_allclose(got[v], pil_float, atol=1e-5)
        pil_8bit = np.asarray(image.crop((left, top, left + w, top + h)).resize((size, size), resample),
                              np.float32).transpose(2, 0, 1) / 255  # rounds and clips between its passes
        assert np.abs(got[v] - pil_8bit).mean() < 2 / 255 and np.abs(got[v] - pil_8bit).max() < 0.15


def test_huge_photos_are_shrunk_before_cropping() -> None:
    image = photo(1000, 400, 7)
    renderer = ViewRenderer(32, MEAN, STD, augmix=False)
    assert renderer.prepare(image).shape == (128, 320, 3)  # short side 4 x 32
    assert renderer.prepare(photo(100, 60, 7)).shape == (60, 100, 3)
    assert renderer(image, 3, seed=0).shape == (3, 3, 32, 32)


def test_bad_settings_are_refused() -> None:
    for bad in [dict(image_size=0), dict(std=(1.0, 0.0, 1.0)), dict(crop_scale=(0.5, 0.2)),
                dict(augmix_severity=0.0), dict(augmix_width=0), dict(augmix_depth=0), dict(interpolation="lanczos")]:
        with pytest.raises(ValueError):
            ViewRenderer(**{"image_size": 32, "mean": MEAN, "std": STD, **bad})
    with pytest.raises(ValueError):
        ViewRenderer(32, MEAN, STD)(photo(20, 20, 0), 0)


def test_for_bundle_reads_the_manifest_preprocessing() -> None:
    pre = {"size": 32, "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear", "resize_mode": "squash"}
    image = photo(50, 30, 8)
    views = ViewRenderer.for_bundle(pre, augmix=False)(image, 2, seed=0)
    np.testing.assert_array_equal(views[0], preprocess_image(image, 32, MEAN, STD, "bilinear", "squash"))


def test_imports_and_runs_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    """The edge modules must never pull torch or grpc (as tests/test_edge.py checks the runner)."""
    blocked = tmp_path / "blocked"
    for name in ("torch", "grpc", "open_clip"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not available on this device')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    script = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from adaptclip.compression import edge_adapt, edge_views\n"
        "views = edge_views.ViewRenderer(16, (0.5,) * 3, (0.25,) * 3)(Image.new('RGB', (20, 30), 'red'), 4, seed=0)\n"
        "f = np.eye(4, 8)[[0, 1, 2, 1]]\n"
        "res = edge_adapt.gs_bias(f, f[:2], np.eye(3, 8), steps=2)\n"
        "print(views.shape, res.logits.shape, edge_adapt.zero_logits(f @ np.eye(3, 8).T).shape,\n"
        "      sorted(m for m in ('torch', 'grpc', 'open_clip') if m in sys.modules))\n")
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not available on this device" in probe.stderr
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["(4,", "3,", "16,", "16)", "(3,)", "(3,)", "[]"]
