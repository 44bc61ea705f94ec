"""Augmented views for test-time adaptation, on the images' device, seedable per image.

Mirrors the structure of the official TPT / GS-Bias `AugMixAugmenter` (hzhxmu/GS-Bias
datasets/utils.py, azshue/TPT data/datautils.py, ops from data/augmix_ops.py): view 0 is the
model's plain preprocessing; every other view is a RandomResizedCrop of the *original* image
(not of the resized one) to S x S, a horizontal flip with p = 0.5, then optionally AugMix:
`width` chains of 1..3 random ops from [autocontrast, equalize, posterize, rotate, solarize,
shear_x, shear_y, translate_x, translate_y], mixed with Dirichlet(1, ..., 1) weights, and that
mix Beta(1, 1)-blended with the crop.

AugMix views on the CPU are the official PIL rendering on 8-bit crops (adapt/pil_augmix.py, the edge
renderer's own code: a seed gives the same AugMix views on a CPU server and on the edge), 1.6x
cheaper there than Kornia's float ops (31 views at 224 px, one thread: BENCHMARKS.md, issue 17).
Crops without AugMix, and AugMix on other devices (a GPU), are torch's, with these differences from
the PIL original, all deliberate:

- Everything is float in [0, 1] on the device: no 8-bit rounding between ops (posterize and
  equalize still quantise to 256 levels, as kornia implements them).
- The crop is resized with torch's antialiased interpolation (PIL-like) with `interpolation`
  (default bicubic; torchvision's RandomResizedCrop, used by the official code, defaults to
  bilinear) and clamped to [0, 1] since bicubic overshoots. Up to BATCHED_MAX_SIDE all crops of an
  image are resized together: the filter's weights as banded matrices (adapt/resample.py, shared
  with the edge renderer) applied by two batched matmuls, equal to one `F.interpolate(antialias=True)`
  per view (used above that size, where it is faster) to ~1e-5 (float32 summation order).
- Mixing happens before normalisation (affine, weights summing to 1: the same result).
- translate_x/y scale with S / 3 (the official code hard-codes 224) and are slice copies.
- Random numbers are `adapt.draws.draw_views`, one numpy Generator per image seed (see
  `ViewGenerator.__call__`), not a global RNG, so the same seed gives the same draws (boxes, flips,
  chains) on any device, in any batch, and on the edge runner (compression/edge_views.py renders them).

`backend="triton"` (or "auto" on CUDA) renders with adaptclip.kernels.views from the same draws: without
AugMix all of a batch (crop, flip, normalise, cast) in one launch, with it the crops; within 1e-3 of torch.

`ViewPlan` draws an image's views up front and renders any range on demand, so the server renders
chunk k + 1 while chunk k is encoded (server/pipeline.py); any split gives the same views.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import kornia.enhance as KE
import kornia.geometry.transform as KT
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from adaptclip.adapt.draws import OP_NAMES, ViewParams, draw_views, shrink_for_views
from adaptclip.adapt.pil_augmix import augmix_views
from adaptclip.adapt.resample import GATHER_BUDGET, banded_weights
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.kernels.backend import check_backend, resolve

if TYPE_CHECKING:
    from adaptclip.adapt.encoder import EncoderModel

_INTERPOLATIONS = ("bilinear", "bicubic")
# Up to this output side all crops are resized in batched matmuls (2x faster at 32 px, 1.2-2x to 128 px,
# one CPU thread); beyond, torch's per-view aa kernel wins (0.7-1x at 224 px): BENCHMARKS.md, issue 17.
BATCHED_MAX_SIDE = 128


@dataclass(frozen=True)
class _Params:
    """The shared draws (`adapt.draws.ViewParams`) of one image's augmented views as CPU tensors."""

    boxes: list[tuple[int, int, int, int]]  # (top, left, height, width) per view
    flip: Tensor  # [n] bool
    mix_weights: Tensor  # [n, width] Dirichlet(1)
    blend: Tensor  # [n] Beta(1, 1): weight of the plain crop
    depth: Tensor  # [n, width] ops per chain
    ops: Tensor  # [n, width, max_depth] index into OP_NAMES
    levels: Tensor  # [n, width, max_depth] AugMix sample_level(severity)
    signs: Tensor  # [n, width, max_depth] +-1 for the signed ops
    draws: ViewParams  # the numpy draws themselves, as the PIL renderer takes them

    @classmethod
    def of(cls, d: ViewParams) -> _Params:
        """The tensors of numpy draws (float32, as the ops compute)."""
        def as_float(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.asarray(a, np.float32))

        return cls([tuple(b) for b in d.boxes.tolist()], torch.from_numpy(d.flip), as_float(d.mix_weights),
                   as_float(d.blend), torch.from_numpy(d.depth), torch.from_numpy(d.ops), as_float(d.levels),
                   as_float(d.signs), d)

    def select(self, lo: int, hi: int) -> _Params:
        """The draws of views lo..hi-1 only."""
        return _Params.of(self.draws.select(lo, hi))


class ViewGenerator:
    """Builds [B, n_views, 3, S, S] normalised views: view 0 given, the rest crops + AugMix."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 crop_scale: tuple[float, float] = (0.08, 1.0), augmix: bool = True,
                 augmix_severity: float = 1.0, augmix_width: int = 3, augmix_depth: int = -1,
                 interpolation: str = "bicubic", backend: str = "torch") -> None:
        """augmix_depth = -1 draws 1..3 ops per chain (the official choice), else a fixed count.
        backend: "torch", "triton" or "auto" (see adaptclip.kernels.backend), decided per call on the
        views' device."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 values, got {len(mean)} and {len(std)}")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"std must be finite and > 0, got {tuple(std)}")
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {crop_scale!r}")
        if not 0.1 <= augmix_severity <= 10.0:
            raise ValueError(f"augmix_severity must be in [0.1, 10], got {augmix_severity!r}")
        if isinstance(augmix_width, bool) or not isinstance(augmix_width, int) or augmix_width < 1:
            raise ValueError(f"augmix_width must be an int >= 1, got {augmix_width!r}")
        if isinstance(augmix_depth, bool) or not isinstance(augmix_depth, int) or not (
                augmix_depth == -1 or augmix_depth >= 1):
            raise ValueError(f"augmix_depth must be -1 (random 1..3) or an int >= 1, got {augmix_depth!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        self.image_size = image_size
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.augmix = augmix
        self.severity = float(augmix_severity)
        self.width = augmix_width
        self.depth = augmix_depth
        self.interpolation = interpolation
        self.backend = check_backend(backend)

    def __call__(self, images: Sequence[Tensor], base_views: Tensor, n_views: int,
                 seed: int | Sequence[int] | None = None) -> Tensor:
        """Views of each image: [B, n_views, 3, S, S] on base_views' device and dtype.

        images: B tensors [3, H, W], float in [0, 1], any sizes (moved to base_views' device).
        base_views: [B, 3, S, S] view 0, already normalised by the model's own transform.
        seed: image i's views are drawn with seed `seed + i` (an int), `seed[i]`
            (a sequence of B ints), or a seed taken from torch's global RNG (None). So a batch
            gives exactly the views its images get one at a time with their own seeds.
        """
        seeds = self._validate_call(images, base_views, n_views, seed)
        if n_views == 1:
            return base_views.unsqueeze(1)
        device = base_views.device
        params = [self._sample(image_seed, n_views - 1, *image.shape[-2:]) for image, image_seed in zip(images, seeds)]
        if not self.augmix and resolve(self.backend, device) == "triton":
            return torch.cat([base_views.unsqueeze(1), self._kernel_views(images, params, base_views)], dim=1)
        augmented = torch.stack([self._normalized(image.to(device=device, dtype=torch.float32), p, base_views.dtype)
                                 for image, p in zip(images, params)])
        return torch.cat([base_views.unsqueeze(1), augmented], dim=1)

    def plan(self, image: Tensor, base_view: Tensor, n_views: int, seed: int) -> ViewPlan:
        """One image's n_views views (view 0 = base_view [3, S, S]), drawn now and rendered by range:
        `plan.render(0, n_views)` equals `self([image], base_view[None], n_views, seed)[0]`."""
        self._validate_call([image], base_view.unsqueeze(0), n_views, seed)
        params = self._sample(seed, n_views - 1, *image.shape[-2:])
        return ViewPlan(self, image.to(device=base_view.device, dtype=torch.float32), base_view, params)

    def _normalized(self, image: Tensor, params: _Params, dtype: torch.dtype,
                    source: Image.Image | None = None) -> Tensor:
        """The augmented views of `params`, normalised and cast: [n, 3, S, S] (`source`: the image's
        8-bit copy for AugMix on the CPU, when the caller keeps one)."""
        mean, std = self.mean.to(image.device), self.std.to(image.device)
        return ((self._augment(image, params, source) - mean) / std).to(dtype)

    def _validate_call(self, images: Sequence[Tensor], base_views: Tensor, n_views: int,
                       seed: int | Sequence[int] | None) -> list[int]:
        """Check shapes; return one seed per image."""
        size = self.image_size
        if base_views.ndim != 4 or tuple(base_views.shape[1:]) != (3, size, size):
            raise ValueError(f"base_views must be [B, 3, {size}, {size}], got {tuple(base_views.shape)}")
        if len(images) != base_views.shape[0]:
            raise ValueError(f"images has {len(images)} images but base_views has {base_views.shape[0]}")
        for image in images:
            if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1 \
                    or not image.is_floating_point():
                raise ValueError(f"images must be float [3, H, W] tensors, got {image.dtype} "
                                 f"{tuple(image.shape)}")
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
        if seed is None:
            return [int(s) for s in torch.randint(0, 2**62, (len(images),))]
        if isinstance(seed, int) and not isinstance(seed, bool):
            return [seed + i for i in range(len(images))]
        seeds = list(seed)
        if len(seeds) != len(images) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                 for s in seeds):
            raise ValueError(f"seed must be an int, None, or {len(images)} ints, got {seed!r}")
        return seeds

    def _sample(self, seed: int, n: int, height: int, width: int) -> _Params:
        """All random draws for n views of one image: `adapt.draws.draw_views`, the edge renderer's too."""
        return _Params.of(draw_views(seed, n, height, width, crop_scale=self.crop_scale, chains=self.width,
                                     depth=self.depth, severity=self.severity))

    def _kernel_views(self, images: Sequence[Tensor], params: Sequence[_Params], base_views: Tensor) -> Tensor:
        """The augmented views [B, n, 3, S, S] of `params` without AugMix, cropped, flipped, normalised
        and cast to base_views' dtype by one kernel launch for the batch."""
        from adaptclip.kernels.views import render_batch

        device = base_views.device
        sources = [image.to(device=device, dtype=torch.float32) for image in images]
        return render_batch(sources, [p.boxes for p in params], torch.stack([p.flip for p in params]), self.image_size,
                            self.mean.flatten().tolist(), self.std.flatten().tolist(), self.interpolation,
                            base_views.dtype)

    def _crops(self, image: Tensor, boxes: list[tuple[int, int, int, int]]) -> Tensor:
        """Every box of `image` [3, H, W] resized to S x S, antialiased: [n, 3, S, S] in [0, 1]."""
        size = self.image_size
        if resolve(self.backend, image.device) == "triton":  # one launch, no flip, no normalisation
            from adaptclip.kernels.views import render_batch

            return render_batch([image], [boxes], [[False] * len(boxes)], size, (0.0,) * 3, (1.0,) * 3,
                                self.interpolation)[0]
        if size <= BATCHED_MAX_SIDE:
            return resized_crops(image, boxes, size, self.interpolation)
        return torch.cat([
            F.interpolate(image[None, :, top:top + h, left:left + w], size=(size, size),
                          mode=self.interpolation, align_corners=False, antialias=True)
            for top, left, h, w in boxes]).clamp_(0.0, 1.0)

    def _augment(self, image: Tensor, p: _Params, source: Image.Image | None = None) -> Tensor:
        """Crop + flip (+ AugMix) every view of one image: [n, 3, S, S] in [0, 1]. AugMix on the CPU
        is the official PIL rendering on 8-bit crops (adapt/pil_augmix.py, as the edge renders it)."""
        if self.augmix and augmix_renderer(image.device) == "pil1":
            source = eight_bit(image) if source is None else source
            return torch.from_numpy(augmix_views(source, p.draws, self.image_size, self.interpolation))
        crops = self._crops(image, p.boxes)
        flip = p.flip.to(image.device).view(-1, 1, 1, 1)
        crops = torch.where(flip, KT.hflip(crops), crops)
        return self._kornia_augmix(crops, p) if self.augmix else crops

    def _kornia_augmix(self, crops: Tensor, p: _Params) -> Tensor:
        """AugMix of flipped crops [n, 3, S, S] in float on their device (Kornia's ops, all views of an op together)."""
        device = crops.device
        mix = torch.zeros_like(crops)
        for chain in range(self.width):
            x = crops.clone()
            for step in range(p.ops.shape[-1]):
                for op_index, op in enumerate(OP_NAMES):
                    chosen = (p.depth[:, chain] > step) & (p.ops[:, chain, step] == op_index)
                    if chosen.any():
                        rows = chosen.nonzero().squeeze(1)
                        level = p.levels[rows, chain, step].to(device)
                        sign = p.signs[rows, chain, step].to(device)
                        at = rows.to(device)  # index_select / index_copy_: fancy indexing is ~5x slower on the CPU
                        x.index_copy_(0, at, _OPS[op](x.index_select(0, at), level, sign))
            mix += p.mix_weights[:, chain].to(device).view(-1, 1, 1, 1) * x
        blend = p.blend.to(device).view(-1, 1, 1, 1)
        return blend * crops + (1 - blend) * mix


class ViewPlan:
    """One image's views drawn up front (`ViewGenerator.plan`): any range renders alone, equal to the
    same views rendered all at once, so rendering can be cut into chunks that overlap encoding."""

    def __init__(self, gen: ViewGenerator, image: Tensor, base_view: Tensor, params: _Params) -> None:
        self.gen, self.image, self.base_view, self.params = gen, image, base_view, params
        pil = gen.augmix and augmix_renderer(image.device) == "pil1"
        self.source = eight_bit(image) if pil else None  # the 8-bit copy PIL crops from: once, not per piece

    def __len__(self) -> int:
        return len(self.params.flip) + 1

    def render(self, lo: int, hi: int) -> Tensor:
        """Views lo..hi-1 [hi - lo, 3, S, S] (view 0 the base view) on the base view's device and dtype."""
        if not 0 <= lo <= hi <= len(self):
            raise ValueError(f"view range [{lo}, {hi}) outside 0..{len(self)}")
        head = [self.base_view.unsqueeze(0)] if lo == 0 else []
        if hi <= max(lo, 1):
            return torch.cat(head) if head else self.base_view.new_empty((0, *self.base_view.shape))
        part = self.params.select(max(lo, 1) - 1, hi - 1)
        gen, dtype = self.gen, self.base_view.dtype
        if not gen.augmix and resolve(gen.backend, self.image.device) == "triton":
            views = gen._kernel_views([self.image], [part], self.base_view.unsqueeze(0))[0]
        else:
            views = gen._normalized(self.image, part, dtype, self.source)
        return torch.cat([*head, views])


def augmix_renderer(device: torch.device) -> str:
    """Which code renders AugMix views on `device`: PIL's 8-bit ops on the CPU, Kornia's float ones
    elsewhere. Their views differ by rounding, so feature cache keys carry it."""
    return "pil1" if device.type == "cpu" else "kornia1"


def eight_bit(image: Tensor) -> Image.Image:
    """The 8-bit RGB PIL image of a [3, H, W] float image in [0, 1] (exact for one `to_tensor` read)."""
    return Image.fromarray(image.detach().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def resized_crops(image: Tensor, boxes: Sequence[tuple[int, int, int, int]], size: int,
                  interpolation: str = "bicubic") -> Tensor:
    """Every box (top, left, h, w) of `image` [3, H, W] (float in [0, 1]) resized to size x size with
    antialiasing, clamped to [0, 1]: [n, 3, S, S], equal to `F.interpolate(crop, antialias=True)` per
    view. The banded weights of adapt/resample.py applied with two batched matmuls per cache-sized
    chunk of views, on the image's device (the same arithmetic as compression.edge_views.resized_crops)."""
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    device, (height, width) = image.device, image.shape[-2:]
    out = torch.empty((len(b), 3, size, size), device=device)
    if len(b) == 0:
        return out
    rows, wy = banded_weights(b[:, 0], b[:, 2], size, height, interpolation)
    cols, wx = banded_weights(b[:, 1], b[:, 3], size, width, interpolation)
    pixels = image.to(torch.float32).permute(1, 2, 0).contiguous()  # [H, W, 3]
    step = max(1, GATHER_BUDGET // (rows.shape[1] * rows.shape[2] * width * 3))
    for start in range(0, len(b), step):  # index_select + bmm: torch's fancy indexing and 4-D matmul are ~50x slower
        part = slice(start, start + step)
        n, c0, c1 = len(b[part]), int(b[part, 1].min()), int((b[part, 1] + b[part, 3]).max())
        w = c1 - c0
        index = torch.from_numpy(rows[part]).to(device)  # [n, G, span]
        gathered = pixels[:, c0:c1].reshape(height, w * 3).index_select(0, index.flatten())
        weights = torch.from_numpy(wy[part]).to(device)
        tall = torch.bmm(weights.flatten(0, 1), gathered.view(-1, index.shape[-1], w * 3))  # [n*G, B, w*3]
        tall = tall.view(n, -1, w, 3)[:, :size].transpose(1, 2).reshape(n * w, size * 3)  # [n*w, S rows * 3]
        local = torch.from_numpy(np.clip(cols[part] - c0, 0, w - 1) + w * np.arange(n)[:, None, None]).to(device)
        weights = torch.from_numpy(wx[part]).to(device)
        wide = torch.bmm(weights.flatten(0, 1), tall.index_select(0, local.flatten()).view(-1, local.shape[-1], size * 3))
        out[part] = wide.view(n, -1, size, 3)[:, :size].permute(0, 3, 2, 1)
    return out.clamp_(0.0, 1.0)


@lru_cache(maxsize=64)
def _generator(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_scale: tuple[float, float],
               augmix: bool, backend: str = "torch") -> ViewGenerator:
    return ViewGenerator(image_size, mean, std, crop_scale=crop_scale, augmix=augmix, backend=backend)


def view_plan(model: EncoderModel, img: Image.Image, view0: Tensor, s: AdaptSettings) -> ViewPlan:
    """The s.views views of a decoded image for `model`, drawn now (seeded by `s.seed`), rendered by
    range: view 0 its own preprocessing (given), the rest augmented with the settings' crops and AugMix,
    on the model's device with its view backend (`model.kernels.views`)."""
    size = model.image_size
    img = shrink_for_views(img, size)
    gen = _generator(size, model.mean, model.std, s.crop_scale, s.use_augmix, model.kernels.views)
    return gen.plan(TF.to_tensor(img), view0.to(model.device), s.views, s.seed)


def render_views(model: EncoderModel, img: Image.Image, view0: Tensor, s: AdaptSettings) -> Tensor:
    """[V, 3, S, S] views of `view_plan`, all at once, on the CPU (encoder batches are assembled there)."""
    return view_plan(model, img, view0, s).render(0, s.views).cpu()


def _autocontrast(x: Tensor) -> Tensor:
    """PIL ImageOps.autocontrast: stretch each channel to [0, 1]; constant channels unchanged."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)


def _shear(x: Tensor, amount: Tensor, axis: int) -> Tensor:
    pair = torch.zeros(len(amount), 2, dtype=amount.dtype, device=amount.device)
    pair[:, axis] = amount
    return KT.shear(x, pair, mode="bilinear")


def _translate(x: Tensor, amount: Tensor, axis: int) -> Tensor:
    """Kornia's bilinear translate at whole pixels (|amount| <= S / 3) as slice copies, ~20x cheaper."""
    out = torch.zeros_like(x)
    dim, size = (-1, -2)[axis], x.shape[(-1, -2)[axis]]
    for i, a in enumerate(amount.long().tolist()):  # output(p) = input(p - a) along the axis, 0 outside
        out[i].narrow(dim, max(a, 0), size - abs(a)).copy_(x[i].narrow(dim, max(-a, 0), size - abs(a)))
    return out


# One AugMix op on a batch [m, 3, S, S] with per-image level / sign [m], as in augmix_ops.py:
# int_parameter(level, max) = int(level * max / 10), float_parameter likewise without the int.
# The affine ops use PIL's output->input convention (output(x, y) = input(x + a*y, y) for shear_x),
# i.e. kornia's forward matrix with the opposite sign; the sign is random anyway.
_OPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "autocontrast": lambda x, level, sign: _autocontrast(x),
    "equalize": lambda x, level, sign: KE.equalize(x),
    "posterize": lambda x, level, sign: KE.posterize(x, (4 - (level * 4 / 10).floor()).long()),
    "rotate": lambda x, level, sign: KT.rotate(x, (level * 30 / 10).floor() * sign, mode="bilinear"),
    "solarize": lambda x, level, sign: KE.solarize(x, (256 - (level * 256 / 10).floor()) / 255),
    "shear_x": lambda x, level, sign: _shear(x, -(level * 0.3 / 10) * sign, 0),
    "shear_y": lambda x, level, sign: _shear(x, -(level * 0.3 / 10) * sign, 1),
    "translate_x": lambda x, level, sign: _translate(x, -(level * x.shape[-1] / 3 / 10).floor() * sign, 0),
    "translate_y": lambda x, level, sign: _translate(x, -(level * x.shape[-1] / 3 / 10).floor() * sign, 1),
}
