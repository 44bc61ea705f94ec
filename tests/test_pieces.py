"""How views are cut into loop chunks and render pieces (adapt/pieces.py), on the server and on the edge."""
from __future__ import annotations

import pytest

from adaptclip.adapt.pieces import FIRST_PIECE, RENDER_CHUNK, first_piece, render_pieces, view_chunks
from adaptclip.adapt.settings import AdaptSettings


def _tiles(pieces: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return pieces[0][0] == lo and pieces[-1][1] == hi and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


@pytest.mark.parametrize("hi", [2, 3, 9, 32, 64, 100])
@pytest.mark.parametrize("cap", [1, 4, 16])
def test_the_ramp_doubles_from_one_view_up_to_the_cap_and_tiles_the_range(hi: int, cap: int) -> None:
    pieces = render_pieces(1, hi, cap, FIRST_PIECE)
    sizes = [b - a for a, b in pieces]
    assert _tiles(pieces, 1, hi) and max(sizes) <= cap
    assert sizes[0] == min(FIRST_PIECE, hi - 1)
    for before, after in zip(sizes, sizes[1:-1]):  # all but the last, which takes what is left
        assert after == min(2 * before, cap)


def test_even_pieces_without_a_first_piece() -> None:
    assert render_pieces(1, 64) == [(1, 17), (17, 33), (33, 49), (49, 64)]
    assert render_pieces(1, 64, 16, 1) == [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 48), (48, 64)]
    assert render_pieces(1, 32, 16, 1)[-1] == (16, 32)  # V = 2^k: no one-view stub at the end


@pytest.mark.parametrize("chunk", [0, 3, 8, 16])
def test_the_cut_is_by_view_index_whatever_the_loop_chunks(chunk: int) -> None:
    s = AdaptSettings(views=40, view_chunk=chunk)
    whole = render_pieces(1, 40, RENDER_CHUNK, FIRST_PIECE)
    chunked = [p for lo, hi in view_chunks(s) for p in render_pieces(lo, hi, RENDER_CHUNK, FIRST_PIECE)]
    bounds = {b for lo, hi in view_chunks(s) for b in (lo, hi)}
    assert _tiles(chunked, 1, 40)
    # the chunked cut is the whole range's cut, cut again at the chunk boundaries
    assert {b for p in chunked for b in p} == {b for p in whole for b in p} | bounds


def test_the_ramp_is_for_augmix_on_the_cpu() -> None:
    assert first_piece(AdaptSettings(method="gs_bias")) == FIRST_PIECE  # GS-Bias draws AugMix by default
    assert first_piece(AdaptSettings(method="gs_bias"), on_cpu=False) is None
    assert first_piece(AdaptSettings(method="gs_bias", augmix=False)) is None
    assert first_piece(AdaptSettings(method="zero")) is None


@pytest.mark.parametrize("args", [(0, 4), (5, 4), (1, 4, 0), (1, 4, 4, 0)])
def test_bad_ranges_are_refused(args: tuple) -> None:
    with pytest.raises(ValueError, match="render_pieces"):
        render_pieces(*args)
