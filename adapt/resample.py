"""Antialiased crop resampling as banded matrices: every crop of an image resized in batched matmuls.

torch's `F.interpolate(..., antialias=True)` (and PIL's resize) is a separable filter: each output
sample is a normalised weighted sum of a band of input samples. Written as dense blocks of BLOCK
outputs over the band they read, the weights of all the crops of an image stack into one array,
and resizing every crop is two batched matmuls instead of one interpolate call per view. The torch
path (adapt/views.py) and the torch-free edge (compression/edge_views.py) apply the same weights
with torch and numpy respectively. numpy only: importing this module never pulls torch.
"""
from __future__ import annotations

import numpy as np

FILTERS = {"bicubic": 2.0, "bilinear": 1.0}  # filter support at scale 1
BLOCK = 8  # outputs per dense block of the banded resampling matrices
GATHER_BUDGET = 1 << 20  # floats gathered per batched matmul (cache-sized chunks of views are fastest)


def banded_weights(starts: np.ndarray, lengths: np.ndarray, size: int, limit: int,
                    interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased resampling of [start, start + length) to `size` samples for each view, as PIL's
    and torch's (antialias=True) separable filters compute it, in dense blocks of BLOCK outputs.

    Returns (index [n, G, span]: input positions in [0, limit), weights [n, G, BLOCK, span] float32):
    output g * BLOCK + i of view v = sum_t weights[v, g, i, t] * input[index[v, g, t]].
    """
    support0 = FILTERS[interpolation]
    blocks = -(-size // BLOCK)
    length = lengths.astype(np.float64)[:, None, None]
    scale = length / size
    stretch = np.maximum(scale, 1.0)  # the filter widens when downsampling (antialiasing)
    support = support0 * stretch
    # Padding outputs past `size` repeat the last one; callers drop them.
    out = np.minimum(np.arange(blocks * BLOCK), size - 1).reshape(1, blocks, BLOCK)
    center = (out + 0.5) * scale  # [n, G, B]
    lo = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(center + support + 0.5), length).astype(np.int64)
    first = lo[:, :, :1]  # [n, G, 1]: taps start nondecreasing, so a block starts at its first output's
    span = int((hi[:, :, -1:] - first).max())
    taps = first[..., None] + np.arange(span)  # [n, G, 1, span] crop-relative positions
    x = np.abs((taps - center[..., None] + 0.5) / stretch[..., None])
    if interpolation == "bicubic":  # Keys a = -0.5, as PIL and torch's antialiased bicubic
        kernel = np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1.0,
                          np.where(x < 2.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, 0.0))
    else:
        kernel = np.maximum(1.0 - x, 0.0)
    kernel = np.where((taps >= lo[..., None]) & (taps < hi[..., None]), kernel, 0.0)
    kernel /= kernel.sum(axis=-1, keepdims=True)
    index = np.clip(starts[:, None, None] + taps[:, :, 0], 0, limit - 1)  # out-of-crop taps weigh 0
    return index, kernel.astype(np.float32)
