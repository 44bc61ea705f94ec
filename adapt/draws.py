"""The random draws of an image's augmented views: one torch-free implementation for every renderer.

Kornia's split: every random number of the views (crop boxes, flips, AugMix's chains, weights and
levels) is drawn here, apart from the transform, from `np.random.default_rng(seed)` in a fixed order.
The torch renderer (adapt/views.py, server and jobs) and the numpy/Pillow one (compression/edge_views.py,
the edge runner) both render these draws, so one seed gives the same views of an image on the server
and on an edge device: their answers differ only by the renderers' arithmetic and the model (fp32
against a bundle's INT8), never by view luck. No torch here.

- Crops: torchvision's RandomResizedCrop.get_params, vectorised (10 tries of area U(lo, hi) x aspect
  log-U(3/4, 4/3); the first that fits wins, else a centre crop with the ratio clamped).
- AugMix (azshue/TPT data/augmix_ops.py, as hzhxmu/GS-Bias uses it): `chains` chains of 1..3 ops
  (or a fixed depth), Dirichlet(1) mix weights, a Beta(1, 1) blend with the plain crop, levels
  U(0.1, severity), a +-1 sign per op. Drawn whether AugMix is on or not, so switching it keeps the crops.
- Huge photos are shrunk first (`shrink_for_views`), so the boxes are drawn on the same pixels everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from adaptclip.adapt.images import to_rgb

DRAWS = "np1"  # the draw algorithm's version: cache keys carry it, so views of other draws never answer
MAX_VIEW_SIDE = 4  # huge photos are shrunk to 4x the input size (short side) before cropping views
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default
CROP_ATTEMPTS = 10  # torchvision tries 10 random boxes before its centre-crop fallback
OP_NAMES = ("autocontrast", "equalize", "posterize", "rotate", "solarize",
            "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass(frozen=True)
class ViewParams:
    """Every random draw for the n augmented views of one image (n = n_views - 1)."""

    boxes: np.ndarray  # [n, 4] int64 (top, left, height, width) in the (shrunk) image
    flip: np.ndarray  # [n] bool
    mix_weights: np.ndarray  # [n, chains] Dirichlet(1)
    blend: np.ndarray  # [n] Beta(1, 1): weight of the plain crop
    depth: np.ndarray  # [n, chains] ops per chain
    ops: np.ndarray  # [n, chains, max_depth] index into OP_NAMES
    levels: np.ndarray  # [n, chains, max_depth] AugMix sample_level: U(0.1, severity)
    signs: np.ndarray  # [n, chains, max_depth] +-1 for the signed ops

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, lo: int, hi: int) -> ViewParams:
        """Views lo..hi-1 only: render a piece while the previous one is being encoded."""
        return ViewParams(*(getattr(self, f.name)[lo:hi] for f in fields(self)))


def view_rng(seed: int) -> np.random.Generator:
    """The generator an image's views are drawn from: any int64 seed (negative ones wrap to uint64)."""
    return np.random.default_rng(seed % 2**64)


def draw_views(seed: int, n: int, height: int, width: int, *, crop_scale: tuple[float, float],
               chains: int = 3, depth: int = -1, severity: float = 1.0) -> ViewParams:
    """All random draws for n views of a height x width image, in a fixed order from `view_rng(seed)`.
    depth = -1 draws 1..3 ops per chain (the official choice), else that many."""
    rng = view_rng(seed)
    boxes = crop_boxes(rng, n, height, width, crop_scale)
    flip = rng.uniform(size=n) < 0.5
    max_depth = 3 if depth == -1 else depth
    mix_weights = rng.dirichlet(np.ones(chains), size=n)
    blend = rng.beta(1.0, 1.0, size=n)
    depths = rng.integers(1, 4, (n, chains)) if depth == -1 else np.full((n, chains), depth)
    ops = rng.integers(0, len(OP_NAMES), (n, chains, max_depth))
    levels = rng.uniform(0.1, severity, (n, chains, max_depth))
    signs = np.where(rng.uniform(size=(n, chains, max_depth)) > 0.5, -1.0, 1.0)
    return ViewParams(boxes, flip, mix_weights, blend, depths, ops, levels, signs)


def crop_boxes(rng: np.random.Generator, n: int, height: int, width: int,
               scale: tuple[float, float]) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params for n views: [n, 4] int64 (top, left, h, w)."""
    target = height * width * rng.uniform(scale[0], scale[1], (n, CROP_ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), (n, CROP_ATTEMPTS)))
    ws = np.round(np.sqrt(target * aspect)).astype(np.int64)
    hs = np.round(np.sqrt(target / aspect)).astype(np.int64)
    offsets = rng.uniform(size=(n, 2))
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = fits.argmax(axis=1)
    h, w = hs[np.arange(n), first], ws[np.arange(n), first]
    boxes = np.stack([(offsets[:, 0] * (height - h + 1)).astype(np.int64),
                      (offsets[:, 1] * (width - w + 1)).astype(np.int64), h, w], axis=1)
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        fh, fw = int(round(width / CROP_RATIO[0])), width
    elif ratio > CROP_RATIO[1]:
        fh, fw = height, int(round(height * CROP_RATIO[1]))
    else:
        fh, fw = height, width
    boxes[~fits.any(axis=1)] = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return boxes


def shrink_for_views(image: Image.Image, size: int) -> Image.Image:
    """RGB, short side at most MAX_VIEW_SIDE * size (PIL bicubic): the pixels views are cropped from."""
    image = to_rgb(image)
    short = min(image.size)
    if short > MAX_VIEW_SIDE * size:
        factor = MAX_VIEW_SIDE * size / short
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)
    return image
