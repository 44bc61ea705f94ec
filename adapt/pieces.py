"""How an image's augmented views are cut up: the loop's chunks and the pieces rendered while others encode.

Shared by the server (server/pipeline.py) and the torch-free edge runner (compression/edge_tta.py),
so both cut the same way; no torch here. Views 1..V-1 are drawn up front, so any cut gives the same
views: the cut only decides what overlaps what.

- Chunks (`view_chunks`): the adaptive loop encodes the views a chunk at a time and may stop early
  when the selected views agree (`AdaptSettings.view_chunk`).
- Pieces (`render_pieces`): within a chunk, piece k + 1 is rendered on a worker while piece k is
  encoded. Piece 1 can only hide behind view 0's encode, one view's worth of encoder time. Where
  rendering is dear (AugMix on the CPU: a view costs a quarter to a half of what encoding it does,
  BENCHMARKS.md, issue 17) a first piece of RENDER_CHUNK views left most of its rendering in the
  wall time, so there the pieces start at FIRST_PIECE view and double up to the cap (1, 2, 4, 8, 16,
  16, ...: V - 1 = 2^k - 1 views cut with no stub); each doubled piece renders within its
  predecessor's encode. Cheap crops keep even pieces (fewer, larger batches). The cut is by
  absolute view index, whatever the chunks.
"""
from __future__ import annotations

from adaptclip.adapt.settings import AdaptSettings

RENDER_CHUNK = 16  # views rendered (and encoded) per piece at most: small enough to overlap encoding
FIRST_PIECE = 1  # the first piece where rendering is dear: what renders behind one view's encode


def view_chunks(settings: AdaptSettings) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the augmented views (1..V-1) encoded in turn; one range unless view_chunk."""
    chunk = settings.view_chunk or max(1, settings.views - 1)
    return [(lo, min(lo + chunk, settings.views)) for lo in range(1, settings.views, chunk)]


def _bounds(hi: int, cap: int, first: int) -> list[int]:
    """Piece boundaries from view 1: 1, 1 + first, 1 + first + 2 first, ... with sizes doubling up to
    `cap`, then `cap` apart; the last boundary at or past `hi`."""
    bounds, size = [1], min(first, cap)
    while bounds[-1] < hi:
        bounds.append(bounds[-1] + size)
        size = min(2 * size, cap)
    return bounds


def render_pieces(lo: int, hi: int, cap: int = RENDER_CHUNK, first: int | None = None) -> list[tuple[int, int]]:
    """The views [lo, hi) (lo >= 1) cut into [start, stop) pieces at the ramp's boundaries (`_bounds`),
    each at most `cap` views; `first` the first piece's size (None: cap, even pieces)."""
    first = cap if first is None else first
    if lo < 1 or hi < lo or cap < 1 or first < 1:
        raise ValueError(f"render_pieces needs 1 <= lo <= hi, cap >= 1 and first >= 1, got {lo}, {hi}, {cap}, {first}")
    cuts = [b for b in _bounds(hi, cap, first) if lo < b < hi]
    edges = [lo, *cuts, hi]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def first_piece(settings: AdaptSettings, on_cpu: bool = True) -> int | None:
    """`render_pieces`'s first piece for these settings: the ramp where rendering is dear (AugMix on
    the CPU), else None (even pieces)."""
    return FIRST_PIECE if on_cpu and settings.use_augmix else None
