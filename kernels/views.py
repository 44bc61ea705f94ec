"""Crop + resize + flip + normalise every augmented view of a batch of images in one launch.

Why: `ViewGenerator` (adaptclip.adapt.views) renders its crops with one antialiased
`F.interpolate` launch per view, then concatenates, clamps, flips, normalises and casts them,
each a pass over every view. This kernel reads each source pixel tap straight from the original
image (uint8 or float, CHW or HWC) and writes each output pixel once, for all views of all
images of a batch in one launch.

Reference (the kernel must equal it): `render_batch_torch` below, which is exactly the crop stage
of `ViewGenerator._augment` (augmix=False) plus the normalisation of `ViewGenerator.__call__`:
`F.interpolate(img[None, :, t:t+h, l:l+w], (S, S), mode, align_corners=False, antialias=True)`
clamped to [0, 1], flipped where asked, then `(x - mean) / std`, cast to the output dtype.

Resampling is torch's antialiased separable filter (`_upsample_{bilinear,bicubic}2d_aa`), for
downscaling and upscaling alike: for output pixel i along an axis with scale = in / S,
center = scale * (i + 0.5), support = (1 for bilinear, 2 for bicubic) * max(scale, 1), taps j in
[max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in)) with weight
filter((j - center + 0.5) / max(scale, 1)), normalised to sum to 1 (left as is when the sum is
0); bicubic is Keys' cubic with a = -0.5, bilinear the triangle. The 2-D sum is computed
directly in fp32: per vertical tap a [BLOCK_Y, BLOCK_X, TAPS_X] gather of source pixels.

Limits: boxes must lie inside their image (ValueError otherwise); every image of a call has the
same dtype, device and number of views; the random draws (boxes, flips) come from the caller
(ViewGenerator's seeded sampler), the kernel draws nothing; no AugMix. CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (see adaptclip.kernels._common).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from adaptclip.kernels._common import FLOAT_DTYPES, check_device, launch

MODES = ("bilinear", "bicubic")
_META = 9  # per view: offset, stride_c, stride_y, stride_x, top, left, height, width, flip


@triton.jit
def _filter(x, BICUBIC: tl.constexpr):
    """torch's aa filter at distance x: Keys cubic (a = -0.5) or the triangle."""
    x = tl.abs(x)
    if BICUBIC:
        near = (1.5 * x - 2.5) * x * x + 1.0
        far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
        w = tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))
    else:
        w = tl.maximum(1.0 - x, 0.0)
    return w


@triton.jit
def _axis(n_in, S, HALF_TAPS: tl.constexpr):
    """Scale, filter support and inverse filter stretch along one axis (torch's aa conventions)."""
    scale = n_in.to(tl.float32) / S
    support = tl.where(scale >= 1.0, HALF_TAPS * scale, HALF_TAPS)
    inv = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
    return scale, support, inv


@triton.jit
def _normalised(acc, src_scale, mean, std):
    """Taps summed, scaled to [0, 1], clamped (bicubic overshoots), then (x - mean) / std."""
    return (tl.clamp(tl.sum(acc, axis=2) * src_scale, 0.0, 1.0) - mean) / std


@triton.jit
def _views_kernel(src, meta, out, S, n_yblocks, n_xblocks, mean0, mean1, mean2, std0, std1, std2,
                  src_scale, BICUBIC: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
                  TAPS_X: tl.constexpr, TAPS_Y: tl.constexpr):
    """One program: a [BLOCK_Y, BLOCK_X] tile of output pixels of one view, all 3 channels."""
    pid = tl.program_id(0)
    xblock = pid % n_xblocks
    yblock = (pid // n_xblocks) % n_yblocks
    view = (pid // n_xblocks) // n_yblocks
    m = meta + view.to(tl.int64) * 9
    image = src + tl.load(m)  # offsets inside one image fit in int32
    stride_c = tl.load(m + 1).to(tl.int32)
    stride_y = tl.load(m + 2).to(tl.int32)
    stride_x = tl.load(m + 3).to(tl.int32)
    top = tl.load(m + 4).to(tl.int32)
    left = tl.load(m + 5).to(tl.int32)
    height = tl.load(m + 6).to(tl.int32)
    width = tl.load(m + 7).to(tl.int32)
    flip = tl.load(m + 8)
    half_taps: tl.constexpr = 2.0 if BICUBIC else 1.0

    # Horizontal weights of the tile's columns: [BLOCK_X, TAPS_X], normalised per column.
    scale_x, support_x, inv_x = _axis(width, S, half_taps)
    ox = xblock * BLOCK_X + tl.arange(0, BLOCK_X)
    cx = scale_x * (ox.to(tl.float32) + 0.5)
    xmin = tl.maximum((cx - support_x + 0.5).to(tl.int32), 0)
    xsize = tl.minimum((cx + support_x + 0.5).to(tl.int32), width) - xmin
    j = tl.arange(0, TAPS_X)
    tap = xmin[:, None] + j[None, :]
    valid_x = (j[None, :] < xsize[:, None]) & (ox[:, None] < S)
    wx = tl.where(valid_x, _filter((tap.to(tl.float32) - cx[:, None] + 0.5) * inv_x, BICUBIC), 0.0)
    total_x = tl.sum(wx, axis=1)
    wx = wx / tl.where(total_x != 0.0, total_x, 1.0)[:, None]
    col_offsets = (left + tap) * stride_x

    # Vertical weights of the tile's rows: [BLOCK_Y, TAPS_Y], normalised per row.
    scale_y, support_y, inv_y = _axis(height, S, half_taps)
    oy = yblock * BLOCK_Y + tl.arange(0, BLOCK_Y)
    cy = scale_y * (oy.to(tl.float32) + 0.5)
    ymin = tl.maximum((cy - support_y + 0.5).to(tl.int32), 0)
    ysize = tl.where(oy < S, tl.minimum((cy + support_y + 0.5).to(tl.int32), height) - ymin, 0)
    jy = tl.arange(0, TAPS_Y)
    wy_all = _filter(((ymin[:, None] + jy[None, :]).to(tl.float32) - cy[:, None] + 0.5) * inv_y, BICUBIC)
    wy_all = tl.where(jy[None, :] < ysize[:, None], wy_all, 0.0)
    total_y = tl.sum(wy_all, axis=1)
    wy_all = wy_all / tl.where(total_y != 0.0, total_y, 1.0)[:, None]

    # The i-th vertical tap of every output row of the tile at once: a [BLOCK_Y, BLOCK_X, TAPS_X]
    # gather per channel, summed over the taps after the loop.
    acc0 = tl.zeros((BLOCK_Y, BLOCK_X, TAPS_X), tl.float32)
    acc1 = tl.zeros((BLOCK_Y, BLOCK_X, TAPS_X), tl.float32)
    acc2 = tl.zeros((BLOCK_Y, BLOCK_X, TAPS_X), tl.float32)
    for i in range(0, tl.max(ysize, axis=0)):
        wy = tl.gather(wy_all, tl.full((BLOCK_Y, 1), i, tl.int32), axis=1)
        ptr = image + ((top + ymin + i) * stride_y)[:, None, None] + col_offsets[None, :, :]
        mask = (i < ysize)[:, None, None] & valid_x[None, :, :]
        w2 = wy[:, :, None] * wx[None, :, :]
        acc0 += w2 * tl.load(ptr, mask=mask, other=0).to(tl.float32)
        acc1 += w2 * tl.load(ptr + stride_c, mask=mask, other=0).to(tl.float32)
        acc2 += w2 * tl.load(ptr + 2 * stride_c, mask=mask, other=0).to(tl.float32)
    col = tl.where(flip != 0, S - 1 - ox, ox)
    dst = out + view.to(tl.int64) * 3 * S * S + oy[:, None] * S + col[None, :]
    keep = (oy[:, None] < S) & (ox[None, :] < S)
    ty = out.dtype.element_ty
    tl.store(dst, _normalised(acc0, src_scale, mean0, std0).to(ty), mask=keep)
    tl.store(dst + S * S, _normalised(acc1, src_scale, mean1, std1).to(ty), mask=keep)
    tl.store(dst + 2 * S * S, _normalised(acc2, src_scale, mean2, std2).to(ty), mask=keep)


def _max_taps(n_in: int, size: int, half: int) -> int:
    """Power-of-2 bound on the taps per output pixel along an axis of n_in source pixels."""
    return triton.next_power_of_2(min(n_in, 2 * math.ceil(half * max(n_in / size, 1.0)) + 1))


def _chw_shape(image: Tensor) -> tuple[int, int, bool]:
    """(H, W, channels_last) of a float [3, H, W] or uint8 [3, H, W] / [H, W, 3] image.

    A uint8 tensor with 3 leading entries is read as [3, H, W]: pass an HWC image 3 rows high
    ([3, W, 3]) permuted to [3, 3, W].
    """
    if image.ndim == 3 and image.shape[0] == 3 and (image.is_floating_point() or image.dtype == torch.uint8):
        return image.shape[1], image.shape[2], False
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == torch.uint8:
        return image.shape[0], image.shape[1], True
    raise ValueError(f"images must be float [3, H, W] or uint8 [3, H, W] / [H, W, 3] tensors, "
                     f"got {image.dtype} {tuple(image.shape)}")


def _checked(images: Sequence[Tensor], boxes: Tensor | Sequence, flips: Tensor | Sequence, size: int,
             mean: Sequence[float], std: Sequence[float], mode: str,
             dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Validate the arguments both paths share; return boxes [B, n, 4] and flips [B, n] on the CPU."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"mean and std must be 3 values each, std finite and > 0, got {mean!r}, {std!r}")
    boxes = torch.as_tensor(boxes, dtype=torch.int64, device="cpu")
    flips = torch.as_tensor(flips, dtype=torch.bool, device="cpu")
    if len(images) < 1 or boxes.shape[:1] != (len(images),) or boxes.ndim != 3 or boxes.shape[2] != 4 \
            or tuple(flips.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"boxes must be [B, n, 4] and flips [B, n] for B = {len(images)} images, got "
                         f"{tuple(boxes.shape)} and {tuple(flips.shape)}")
    for i, image in enumerate(images):
        height, width, _ = _chw_shape(image)
        top, left, h, w = boxes[i].unbind(-1)
        if not bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)
                     & (top + h <= height) & (left + w <= width)).all()):
            raise ValueError(f"boxes[{i}] must be (top, left, height, width) inside the {height}x{width} image")
    return boxes, flips


def render_batch_torch(images: Sequence[Tensor], boxes: Tensor | Sequence, flips: Tensor | Sequence,
                       size: int, mean: Sequence[float], std: Sequence[float], mode: str = "bicubic",
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """The reference: views [B, n, 3, S, S] exactly as ViewGenerator renders them (augmix=False).

    images: B tensors on one device, float [3, H, W] in [0, 1] or uint8 [3, H, W] / [H, W, 3]
    (divided by 255). boxes: [B, n, 4] (top, left, height, width) in source pixels. flips: [B, n].
    """
    boxes, flips = _checked(images, boxes, flips, size, mean, std, mode, dtype)
    device = images[0].device
    mean_t = torch.tensor([float(m) for m in mean], device=device).view(3, 1, 1)
    std_t = torch.tensor([float(s) for s in std], device=device).view(3, 1, 1)
    views = []
    for image, image_boxes, image_flips in zip(images, boxes.tolist(), flips):
        x = image.permute(2, 0, 1) if _chw_shape(image)[2] else image
        x = x.float() / 255 if x.dtype == torch.uint8 else x.to(torch.float32)
        crops = torch.cat([
            F.interpolate(x[None, :, top:top + h, left:left + w], size=(size, size), mode=mode,
                          align_corners=False, antialias=True)
            for top, left, h, w in image_boxes]).clamp_(0.0, 1.0)
        crops = torch.where(image_flips.to(device).view(-1, 1, 1, 1), crops.flip(-1), crops)
        views.append((crops - mean_t) / std_t)
    return torch.stack(views).to(dtype)


def render_batch(images: Sequence[Tensor], boxes: Tensor | Sequence, flips: Tensor | Sequence, size: int,
                 mean: Sequence[float], std: Sequence[float], mode: str = "bicubic",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """The kernel: same arguments and result as `render_batch_torch`, in one launch for the batch.

    The images (all of one dtype) are packed into one flat buffer; each view carries its image's
    offset and strides, so CHW and HWC sources mix freely.
    """
    boxes, flips = _checked(images, boxes, flips, size, mean, std, mode, dtype)
    if len({image.dtype for image in images}) != 1 or len({image.device for image in images}) != 1:
        raise ValueError("images must share one dtype and one device")
    device = images[0].device
    check_device("images", images[0], _views_kernel)
    n_images, n_views = boxes.shape[:2]
    rows, offset = [], 0
    for image in images:
        height, width, channels_last = _chw_shape(image)
        strides = (1, 3 * width, 3) if channels_last else (height * width, width, 1)
        rows.append((offset, *strides))
        offset += image.numel()
    layout = torch.tensor(rows, dtype=torch.int64).unsqueeze(1).expand(-1, n_views, -1)
    meta = torch.cat([layout, boxes, flips.long().unsqueeze(-1)], dim=-1).reshape(-1, _META).to(device)
    flat = [image.contiguous().reshape(-1) for image in images]
    src = flat[0] if len(flat) == 1 else torch.cat(flat)  # one image: no copy
    out = torch.empty(n_images, n_views, 3, size, size, device=device, dtype=dtype)

    half = 2 if mode == "bicubic" else 1
    taps_x, taps_y = (_max_taps(int(boxes[..., axis].max()), size, half) for axis in (3, 2))
    block_y, block_x = min(triton.next_power_of_2(size), 8), min(triton.next_power_of_2(size), 32)
    n_yblocks, n_xblocks = triton.cdiv(size, block_y), triton.cdiv(size, block_x)
    grid = (n_images * n_views * n_yblocks * n_xblocks,)
    launch(_views_kernel, grid)(src, meta, out, size, n_yblocks, n_xblocks, *map(float, mean), *map(float, std),
                        1.0 / 255 if src.dtype == torch.uint8 else 1.0, BICUBIC=mode == "bicubic",
                        BLOCK_Y=block_y, BLOCK_X=block_x, TAPS_X=taps_x, TAPS_Y=taps_y, num_warps=8)
    return out
