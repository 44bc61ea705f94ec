"""The dynamic batcher on its own: batch sizes, the delay window, keep-rate groups, dropped callers."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from adaptclip.server.batcher import Batcher


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def __call__(self, images: torch.Tensor, with_patches: bool, keep_rate: float):
        self.calls.append((images.shape[0], keep_rate))
        feats = images.flatten(1)[:, :4] * keep_rate
        patches = torch.zeros(images.shape[0], 2, 4) if with_patches else None
        return feats, patches


def _img(value: float, n: int = 1) -> torch.Tensor:
    return torch.full((n, 3, 2, 2), value)


async def _with_batcher(fn, **kw):
    rec = Recorder()
    b = Batcher(rec, max_batch=kw.get("max_batch", 8), max_delay_s=kw.get("delay", 0.05), max_queue=kw.get("queue", 100))
    b.start()
    try:
        return await fn(b), rec
    finally:
        await b.close()


def test_concurrent_items_share_one_batch_and_get_their_rows():
    async def go(b):
        return await asyncio.gather(*(b.submit(_img(i)) for i in range(5)))

    results, rec = asyncio.run(_with_batcher(go))
    assert rec.calls == [(5, 1.0)]
    assert [r.features[0, 0].item() for r in results] == [0, 1, 2, 3, 4]
    assert all(r.batch_size == 5 for r in results)


@pytest.mark.parametrize("callers,sizes,calls", [(1, [1, 3, 3, 3], [1, 3]), (4, [4, 4, 4, 4], [4]),
                                                 (None, [4, 4, 4, 4], [4])])
def test_a_batch_waits_only_for_active_callers(callers, sizes, calls):
    """One active caller: its item does not wait for company that cannot come (the three that arrive
    while it encodes share the next call). Four active callers: the first waits (up to the 1 s delay)
    for the other three. Without a callers count: the plain delay window."""
    started = []

    def slow(images: torch.Tensor, with_patches: bool, keep_rate: float):
        started.append(images.shape[0])
        time.sleep(0.05)
        return images.flatten(1)[:, :4], None

    async def go():
        b = Batcher(slow, max_batch=8, max_delay_s=1.0, max_queue=100,
                    callers=None if callers is None else (lambda: callers))
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(_img(0)))
            await asyncio.sleep(0.01)  # the first is encoding (one caller) or waiting for the others
            rest = await asyncio.gather(*(b.submit(_img(i)) for i in (1, 2, 3)))
            return [(await first).batch_size, *(r.batch_size for r in rest)]
        finally:
            await b.close()

    assert asyncio.run(go()) == sizes and started == calls


def test_max_batch_splits_and_oversized_item_runs_alone():
    async def go(b):
        return await asyncio.gather(*(b.submit(_img(i, 3)) for i in range(4)), b.submit(_img(9, 12)))

    results, rec = asyncio.run(_with_batcher(go, max_batch=8))
    assert [n for n, _ in rec.calls] == [6, 6, 12]
    assert results[-1].features.shape[0] == 12


def test_keep_rates_never_mix_in_a_batch():
    async def go(b):
        return await asyncio.gather(b.submit(_img(1), keep_rate=1.0), b.submit(_img(1), keep_rate=0.5),
                                    b.submit(_img(1), keep_rate=1.0), b.submit(_img(1), keep_rate=0.5))

    results, rec = asyncio.run(_with_batcher(go))
    assert sorted(rec.calls) == [(2, 0.5), (2, 1.0)]
    assert [r.features[0, 0].item() for r in results] == [1.0, 0.5, 1.0, 0.5]


def test_patches_only_for_items_that_ask():
    async def go(b):
        return await asyncio.gather(b.submit(_img(1), with_patches=True), b.submit(_img(2)))

    (a, b_), rec = asyncio.run(_with_batcher(go))
    assert a.patches.shape == (1, 2, 4) and b_.patches is None and rec.calls == [(2, 1.0)]


def test_cancelled_item_is_dropped_before_the_encoder():
    async def go(b):
        first = asyncio.ensure_future(b.submit(_img(1)))
        doomed = asyncio.ensure_future(b.submit(_img(2)))
        await asyncio.sleep(0)
        doomed.cancel()
        await first
        return b.dropped

    dropped, rec = asyncio.run(_with_batcher(go))
    assert dropped == 1 and rec.calls == [(1, 1.0)]


def test_queue_limit():
    from adaptclip.server.errors import RequestError

    async def go(b):
        with pytest.raises(RequestError, match="queue full"):
            await asyncio.gather(b.submit(_img(1, 3)), b.submit(_img(1, 3)))

    asyncio.run(_with_batcher(go, queue=4))


def test_failure_after_encoding_fails_the_callers_and_frees_the_queue():
    """A bad encoder result (no patches though asked) must not leave callers waiting or the queue counted."""
    calls = []

    def no_patches(images: torch.Tensor, with_patches: bool, keep_rate: float):
        calls.append(images.shape[0])
        return images.flatten(1)[:, :4], None

    async def go():
        b = Batcher(no_patches, max_batch=8, max_delay_s=0.02, max_queue=4)
        b.start()
        try:
            for _ in range(3):  # 3 x 4 images: would pass the limit of 4 if failed batches stayed counted
                with pytest.raises(TypeError):
                    await asyncio.wait_for(b.submit(_img(1, 4), with_patches=True), 5)
            feats = (await asyncio.wait_for(b.submit(_img(2, 4)), 5)).features
            assert feats.shape == (4, 4)
        finally:
            await b.close()

    asyncio.run(go())
    assert calls == [4, 4, 4, 4]
