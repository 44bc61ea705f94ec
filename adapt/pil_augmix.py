"""AugMix views as the official code renders them, in Pillow on 8-bit crops: one torch-free implementation.

azshue/TPT data/augmix_ops.py and AugMixAugmenter (as hzhxmu/GS-Bias uses them): each view a
RandomResizedCrop of the 8-bit image, resized and flipped in PIL, `width` chains of 1..3 official
ops on it, and the Beta/Dirichlet blend of the crop with its chains. The random draws are
`adapt.draws.ViewParams`, so the edge renderer (compression/edge_views.py) and the torch views on
the CPU (adapt/views.py) render the same AugMix views of a seed from this one code. On the CPU it is
also the cheapest way found: per-image PIL beat batched numpy for every op (numpy's 8-bit gathers and
the copies in and out of a batch cost more than PIL's C loops) and Kornia's float ops on the CPU
(BENCHMARKS.md, issue 17). translate_x/y scale with S / 3 (the official code hard-codes 224).
No torch here.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from adaptclip.adapt.draws import OP_NAMES, ViewParams

PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def augmix_op(image: Image.Image, op: str, level: float, sign: float) -> Image.Image:
    """One official AugMix op (augmix_ops.py) on an 8-bit square image, with its drawn level and sign,
    equal to the official PIL call bit for bit (tests/test_edge_views.py). The integer translations
    are a crop pasted onto black: PIL's bilinear affine at an integer offset samples pixel centres
    exactly, and the copy is ~40x cheaper than its per-pixel transform."""
    size = image.size[0]
    bilinear = Image.Resampling.BILINEAR
    if op == "autocontrast":
        return ImageOps.autocontrast(image)
    if op == "equalize":
        return ImageOps.equalize(image)
    if op == "posterize":
        return ImageOps.posterize(image, 4 - int(level * 4 / 10))
    if op == "rotate":
        return image.rotate(int(level * 30 / 10) * sign, resample=bilinear)
    if op == "solarize":
        return ImageOps.solarize(image, 256 - int(level * 256 / 10))
    if op in ("translate_x", "translate_y"):  # output(x) = input(x + t), black outside
        t = int(int(level * (size / 3) / 10) * sign)
        shifted = Image.new(image.mode, image.size)
        lo, hi = max(t, 0), size + min(t, 0)
        box, at = ((lo, 0, hi, size), (max(-t, 0), 0)) if op == "translate_x" else ((0, lo, size, hi), (0, max(-t, 0)))
        shifted.paste(image.crop(box), at)
        return shifted
    shear = level * 0.3 / 10 * sign
    matrix = (1, shear, 0, 0, 1, 0) if op == "shear_x" else (1, 0, 0, shear, 1, 0)
    return image.transform((size, size), Image.Transform.AFFINE, matrix, resample=bilinear)


def augmix_views(source: Image.Image, params: ViewParams, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """The AugMix views of `params` cut from the 8-bit RGB `source`: [n, 3, size, size] float32 in
    [0, 1], before normalisation. Each chain keeps one PIL image through its ops (the official calls,
    bit for bit), and a view's crop and chains are blended as they are made, each 8-bit image times
    its weight added into one reused float buffer. No BLAS: numpy's OpenBLAS wakes a thread per core
    for a matrix product and they spin after it, on the cores the encoder and any other render
    thread need (a stacked-pixels product per view made two render threads slower than one, and
    cost an edge ViT-B-32 image a tenth of its encoder time beside it; BENCHMARKS.md, issue 17)."""
    resample = PIL_FILTERS[interpolation]
    # blend * crop + (1 - blend) * sum_c w_c * chain_c, in [0, 1]: one weight per view and image
    coef = (np.concatenate([params.blend[None], (1 - params.blend) * params.mix_weights.T]) / 255.0).astype(np.float32)
    mixed = np.empty((len(params), 3, size, size), np.float32)
    acc, term = np.empty((size, size, 3), np.float32), np.empty((size, size, 3), np.float32)
    for view, (top, left, height, crop_width) in enumerate(params.boxes.tolist()):
        crop = source.crop((left, top, left + crop_width, top + height)).resize((size, size), resample)
        if params.flip[view]:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        np.multiply(np.asarray(crop), coef[0, view], out=acc)
        for chain in range(params.mix_weights.shape[1]):
            image = crop
            for step in range(params.depth[view, chain]):
                image = augmix_op(image, OP_NAMES[params.ops[view, chain, step]],
                                  float(params.levels[view, chain, step]), float(params.signs[view, chain, step]))
            acc += np.multiply(np.asarray(image), coef[chain + 1, view], out=term)
        mixed[view] = acc.transpose(2, 0, 1)
    return mixed
