"""Dynamic batching: images of concurrent requests go through the encoder together."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from adaptclip.server.errors import RequestError

log = logging.getLogger(__name__)
# (images [N, 3, H, W], with_patches, token keep rate) -> (global [N, D], patches [N, P, D] or None)
EncodeFn = Callable[[torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(eq=False)  # identity: items are removed from the queue by object, never compared by value
class _Item:
    images: torch.Tensor  # [n, 3, H, W]
    future: asyncio.Future
    with_patches: bool = False
    keep_rate: float = 1.0  # token compression: only items of one keep rate share a batch
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time after which nobody waits for it


@dataclass
class BatchResult:
    features: torch.Tensor  # [n, D] for this item's images
    patches: torch.Tensor | None  # [n, P, D] when the item asked for them
    queue_us: int
    encode_us: int  # the whole batch's: pieces of one request that shared it share this time
    batch_size: int
    batch: int  # the batch's number on this batcher (1, 2, ...): tells which results shared one


class Batcher:
    """Encodes what waits, up to `max_batch` images, in one call, whenever the encoder is free.

    A batch takes every waiting item of its keep rate, then waits up to `max_delay_s` for more, but
    only while `callers()` (the requests now using this encoder, when given) exceeds its items: a lone
    request, which sends view 0 and then its pieces of views one after another, never waits for
    company that cannot come, while concurrent requests still meet in one batch. Whatever arrives
    while the encoder works forms the next batch. The encoder runs on one dedicated thread so the
    event loop stays free. Items whose caller went away (cancelled, deadline passed) are dropped
    before they reach the encoder.
    """

    def __init__(self, encode: EncodeFn, *, max_batch: int, max_delay_s: float, max_queue: int,
                 name: str = "model", on_batch: Callable[[int], None] | None = None,
                 callers: Callable[[], int] | None = None) -> None:
        self._encode = encode
        self._callers = callers
        self._on_batch = on_batch  # called with each encoded batch's size (metrics)
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._pending: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._queued_images = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"encode-{name}")
        self._task: asyncio.Task | None = None
        self._name = name
        self.dropped = 0  # items dropped because their caller left
        self.batches = 0

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def queued(self) -> int:
        """Images waiting for the encoder."""
        return self._queued_images

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, images: torch.Tensor, timeout_s: float | None = None,
                     with_patches: bool = False, keep_rate: float = 1.0) -> BatchResult:
        """Queue `images` and wait for their features; RESOURCE_EXHAUSTED when the queue is full.

        Items that want patch features (GS-Bias) share batches with those that do not; the batch
        then computes them for every row and hands each item what it asked for.
        """
        n = images.shape[0]
        if self._queued_images + n > self._max_queue:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "image",
                               f"encoder queue full ({self._queued_images} images waiting, limit {self._max_queue}); retry later")
        item = _Item(images, asyncio.get_running_loop().create_future(), with_patches, keep_rate)
        if timeout_s is not None:
            item.deadline = item.enqueued + timeout_s
        self._queued_images += n
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    def _alive(self, item: _Item, now: float) -> bool:
        if item.future.done() or (item.deadline is not None and now > item.deadline):
            self._queued_images -= item.images.shape[0]
            self.dropped += 1
            if not item.future.done():
                item.future.set_exception(RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "image",
                                                       "deadline passed while waiting for the encoder"))
            return False
        return True

    async def _wait_new(self, timeout_s: float | None) -> bool:
        """Wait for the next submission; False when `timeout_s` passed first."""
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _take(self, keep_rate: float, room: int) -> tuple[_Item | None, bool]:
        """First live pending item of this keep rate; (None, True) when it does not fit in `room`."""
        now = time.perf_counter()
        for item in list(self._pending):
            if not self._alive(item, now):
                self._pending.remove(item)
            elif item.keep_rate == keep_rate:
                if item.images.shape[0] > room:
                    return None, True  # it leads the next batch
                self._pending.remove(item)
                return item, False
        return None, False

    async def _next_batch(self) -> list[_Item]:
        """The oldest live item, then the waiting items of its keep rate and those arriving within the
        delay while more callers are active than the batch holds items, up to max_batch."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait_new(None)
            first = self._pending.popleft()
            if self._alive(first, time.perf_counter()):
                break
        batch, size = [first], first.images.shape[0]
        close_at = loop.time() + self._max_delay
        while size < self._max_batch:
            item, blocked = self._take(first.keep_rate, self._max_batch - size)
            if blocked:
                break
            if item is not None:
                batch.append(item)
                size += item.images.shape[0]
                continue
            if self._callers is not None and len(batch) >= self._callers():
                break  # nobody else is there to wait for
            remaining = close_at - loop.time()
            if remaining <= 0 or not await self._wait_new(remaining):
                break
        return batch

    async def _run(self) -> None:
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must fail requests, not hang every caller
                log.exception("batcher %s: unexpected error", self._name)
                for item in list(self._pending):
                    self._pending.remove(item)
                    self._queued_images -= item.images.shape[0]
                    if not item.future.done():
                        item.future.set_exception(RequestError(grpc.StatusCode.INTERNAL, "image", "encoder batching failed"))

    async def _run_once(self) -> None:
        """One batch: collect, encode on the encoder thread, hand each caller its rows. Whatever fails
        after the batch left the queue fails its callers (none is left waiting)."""
        batch = await self._next_batch()
        now = time.perf_counter()
        batch = [it for it in batch if self._alive(it, now)]  # _alive un-counts the dead ones
        self._queued_images -= sum(it.images.shape[0] for it in batch)  # the rest leave the queue now
        try:
            await self._encode_and_answer(batch)
        except Exception as exc:  # noqa: BLE001 - the encoder's (or hand-out's) failure goes to every caller
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)

    async def _encode_and_answer(self, batch: list[_Item]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        images = torch.cat([it.images for it in batch]) if len(batch) > 1 else batch[0].images
        start = time.perf_counter()
        want = any(it.with_patches for it in batch)
        feats, patches = await loop.run_in_executor(self._executor, self._encode, images, want, batch[0].keep_rate)
        encode_us = int((time.perf_counter() - start) * 1e6)
        self.batches += 1
        if self._on_batch is not None:
            self._on_batch(images.shape[0])
        offset = 0
        for it in batch:
            n = it.images.shape[0]
            if not it.future.done():
                mine = patches[offset:offset + n] if it.with_patches else None
                it.future.set_result(BatchResult(feats[offset:offset + n], mine, int((start - it.enqueued) * 1e6),
                                                 encode_us, images.shape[0], self.batches))
            offset += n
