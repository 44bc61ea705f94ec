"""Augmented views for test-time adaptation on the edge: numpy and Pillow only, seeded per image.

The torch-free counterpart of `adaptclip.adapt.views.ViewGenerator` (and of the shrink step of its
`render_views`): view 0 is the model's plain preprocessing (`compression.edge.preprocess_image`);
every other view is a RandomResizedCrop of the image (torchvision's algorithm), a horizontal flip
with p = 0.5, then optionally AugMix with the official PIL ops (azshue/TPT data/augmix_ops.py, as
hzhxmu/GS-Bias uses them): `width` chains of 1..3 ops, Dirichlet(1) mix weights, Beta(1, 1) blend
with the plain crop. What equals what:

- Without AugMix, `resized_crops` = torch `F.interpolate(crop, (S, S), mode, antialias=True).clamp(0, 1)`
  per view (the torch path), to ~1e-5 in [0, 1] units: all views resampled together with
  block-banded separable weights (PIL's / torch's antialiased filters) and batched matmuls.
- With AugMix, every view is built as the official AugMixAugmenter builds it, by adapt/pil_augmix.py
  (the torch views on the CPU render the same, so a seed's AugMix views are equal on the edge and
  on a CPU server): the crop cut, resized and flipped in PIL on the 8-bit image (the official crops
  are 8-bit PIL images; PIL rounds and clips between its two resampling passes, a few hundredths
  from the float crop), its chains of official PIL ops, and the blend of that 8-bit crop with them.
  The chains need the 8-bit image anyway, and PIL's 8-bit resize is cheaper than the float one plus
  the rounding (155 -> 121 ms for 31 views at 224 px, BENCHMARKS.md).
- Random draws are `adapt.draws.draw_views`, apart from the transform (`sample`): the torch path's
  own draws, so a seed gives the same crops, flips and AugMix chains on the edge and on the server.
Importing this module must never pull torch or grpc.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from adaptclip.adapt.draws import ViewParams, draw_views, shrink_for_views
from adaptclip.adapt.pil_augmix import augmix_views
from adaptclip.adapt.resample import FILTERS, GATHER_BUDGET, banded_weights
from adaptclip.compression.edge_model import preprocess_image

def resized_crops(pixels: np.ndarray, boxes: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Crop every box of `pixels` [H, W, 3] (float in [0, 1]) and resize it to size x size with
    antialiasing: [n, 3, size, size] float32, clamped to [0, 1], equal to the torch path's per-view
    F.interpolate(..., antialias=True). Two batched matmuls per chunk of views, no per-view calls."""
    pixels = np.asarray(pixels, np.float32)
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    height, width = pixels.shape[:2]
    if len(boxes) == 0:
        return np.empty((0, 3, size, size), np.float32)
    rows, wy = banded_weights(boxes[:, 0], boxes[:, 2], size, height, interpolation)
    cols, wx = banded_weights(boxes[:, 1], boxes[:, 3], size, width, interpolation)
    out = np.empty((len(boxes), 3, size, size), np.float32)
    step = max(1, GATHER_BUDGET // (rows.shape[1] * rows.shape[2] * width * 3))
    for start in range(0, len(boxes), step):
        part = slice(start, start + step)
        n = len(boxes[part])
        c0 = int(boxes[part, 1].min())
        c1 = int((boxes[part, 1] + boxes[part, 3]).max())
        gathered = pixels[rows[part], c0:c1].reshape(*rows[part].shape, (c1 - c0) * 3)  # [n, G, span, w*3]
        tall = (wy[part] @ gathered).reshape(n, -1, c1 - c0, 3)[:, :size]  # [n, S rows, w, 3]
        tall = np.ascontiguousarray(tall.transpose(0, 2, 1, 3)).reshape(n, c1 - c0, size * 3)
        local = np.clip(cols[part] - c0, 0, c1 - c0 - 1)
        wide = wx[part] @ tall[np.arange(n)[:, None, None], local]  # [n, G, B, S*3]
        out[part] = wide.reshape(n, -1, size, 3)[:, :size].transpose(0, 3, 2, 1)
    return np.clip(out, 0.0, 1.0, out=out)


class ViewRenderer:
    """Builds [n_views, 3, S, S] normalised float32 views of one PIL image, as the torch ViewGenerator."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 crop_scale: tuple[float, float] = (0.08, 1.0), augmix: bool = True,
                 augmix_severity: float = 1.0, augmix_width: int = 3, augmix_depth: int = -1,
                 interpolation: str = "bicubic", preprocess_interpolation: str = "bicubic",
                 resize_mode: str = "shortest") -> None:
        """augmix_depth = -1 draws 1..3 ops per chain (the official choice), else a fixed count.
        `interpolation` resamples the crops (the torch path's default, bicubic); view 0 uses the
        model's own `preprocess_interpolation` and `resize_mode` (a bundle's `preprocess` entry)."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"mean and std must have 3 values, std finite and > 0, got {mean!r}, {std!r}")
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {crop_scale!r}")
        if not 0.1 <= augmix_severity <= 10.0:
            raise ValueError(f"augmix_severity must be in [0.1, 10], got {augmix_severity!r}")
        if isinstance(augmix_width, bool) or not isinstance(augmix_width, int) or augmix_width < 1:
            raise ValueError(f"augmix_width must be an int >= 1, got {augmix_width!r}")
        if isinstance(augmix_depth, bool) or not isinstance(augmix_depth, int) or not (
                augmix_depth == -1 or augmix_depth >= 1):
            raise ValueError(f"augmix_depth must be -1 (random 1..3) or an int >= 1, got {augmix_depth!r}")
        if interpolation not in FILTERS:
            raise ValueError(f"interpolation must be one of {tuple(FILTERS)}, got {interpolation!r}")
        self.image_size = image_size
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.augmix = augmix
        self.severity = float(augmix_severity)
        self.width = augmix_width
        self.depth = augmix_depth
        self.interpolation = interpolation
        self.preprocess_interpolation = preprocess_interpolation
        self.resize_mode = resize_mode

    @classmethod
    def for_bundle(cls, preprocess: dict, **options: object) -> ViewRenderer:
        """A renderer for a bundle's manifest `preprocess` entry (size, mean, std, interpolation, resize_mode)."""
        return cls(int(preprocess["size"]), preprocess["mean"], preprocess["std"],
                   preprocess_interpolation=preprocess.get("interpolation", "bicubic"),
                   resize_mode=preprocess.get("resize_mode", "shortest"), **options)

    def __call__(self, image: Image.Image, n_views: int, seed: int | None = None,
                 view0: np.ndarray | None = None) -> np.ndarray:
        """All views [n_views, 3, S, S] of `image`: view 0 its plain preprocessing (`view0` when the
        caller has it already), the rest drawn with `seed` (None: fresh entropy)."""
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
        if view0 is None:
            view0 = preprocess_image(image, self.image_size, self.mean.ravel(), self.std.ravel(),
                                     self.preprocess_interpolation, self.resize_mode)
        if n_views == 1:
            return view0[None].astype(np.float32)
        pixels = self.prepare(image)
        seed = int(np.random.SeedSequence().entropy) if seed is None else seed
        params = self.sample(seed, n_views - 1, *pixels.shape[:2])
        return np.concatenate([view0[None].astype(np.float32), self.render(pixels, params)])

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The pixels views are cropped from: [H, W, 3] float32 in [0, 1], huge photos shrunk."""
        return np.asarray(shrink_for_views(image, self.image_size), np.float32) / 255.0

    def sample(self, seed: int, n: int, height: int, width: int) -> ViewParams:
        """All random draws for n views of a height x width image (`adapt.draws.draw_views`, as the torch path)."""
        return draw_views(seed, n, height, width, crop_scale=self.crop_scale, chains=self.width,
                          depth=self.depth, severity=self.severity)

    def render(self, pixels: np.ndarray, params: ViewParams) -> np.ndarray:
        """The augmented views of `params` from `prepare`d pixels, normalised: [n, 3, S, S] float32."""
        views = self.augment(pixels, params)
        views -= self.mean
        views /= self.std
        return views

    def augment(self, pixels: np.ndarray, params: ViewParams) -> np.ndarray:
        """Crop + flip (+ AugMix) every view, before normalisation: [n, 3, S, S] float32 in [0, 1]."""
        if self.augmix and len(params):
            return self._augmix(pixels, params)
        crops = resized_crops(pixels, params.boxes, self.image_size, self.interpolation)
        crops[params.flip] = crops[params.flip, :, :, ::-1]
        return crops

    def _augmix(self, pixels: np.ndarray, params: ViewParams) -> np.ndarray:
        """The official AugMixAugmenter from the drawn parameters, on the 8-bit image prepare() read
        (adapt/pil_augmix.py: the torch views on the CPU render the same)."""
        source = Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8))
        return augmix_views(source, params, self.image_size, self.interpolation)
