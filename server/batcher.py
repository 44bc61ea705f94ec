"""Dynamic batching: images of concurrent requests go through the encoder together."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from adaptclip.server.errors import RequestError

# (images [N, 3, H, W], with_patches) -> (global features [N, D], patch features [N, P, D] or None)
EncodeFn = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class _Item:
    images: torch.Tensor  # [n, 3, H, W]
    future: asyncio.Future
    with_patches: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time after which nobody waits for it


@dataclass
class BatchResult:
    features: torch.Tensor  # [n, D] for this item's images
    patches: torch.Tensor | None  # [n, P, D] when the item asked for them
    queue_us: int
    encode_us: int
    batch_size: int


class Batcher:
    """Collects items for up to `max_delay_s` or `max_batch` images, encodes them in one call.

    The encoder runs on one dedicated thread so the event loop stays free. Items whose caller
    went away (cancelled, deadline passed) are dropped before they reach the encoder.
    """

    def __init__(self, encode: EncodeFn, *, max_batch: int, max_delay_s: float, max_queue: int,
                 name: str = "model") -> None:
        self._encode = encode
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._pending: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._queued_images = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"encode-{name}")
        self._task: asyncio.Task | None = None
        self.dropped = 0  # items dropped because their caller left
        self.batches = 0

    @property
    def max_batch(self) -> int:
        return self._max_batch

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
                     with_patches: bool = False) -> BatchResult:
        """Queue `images` and wait for their features; RESOURCE_EXHAUSTED when the queue is full.

        Items that want patch features (GS-Bias) share batches with those that do not; the batch
        then computes them for every row and hands each item what it asked for.
        """
        n = images.shape[0]
        if self._queued_images + n > self._max_queue:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "image",
                               f"encoder queue full ({self._queued_images} images waiting, limit {self._max_queue}); retry later")
        item = _Item(images, asyncio.get_running_loop().create_future(), with_patches)
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

    async def _wait(self, timeout_s: float | None) -> bool:
        """Wait until something is pending; False when `timeout_s` passed first."""
        if self._pending:
            return True
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _next_batch(self) -> list[_Item]:
        """First live item, then whatever else arrives within the delay, up to max_batch images."""
        loop = asyncio.get_running_loop()
        batch: list[_Item] = []
        size = 0
        close_at: float | None = None
        while size < self._max_batch:
            timeout = None if close_at is None else close_at - loop.time()
            if timeout is not None and (timeout <= 0 or not await self._wait(timeout)):
                break
            if timeout is None:
                await self._wait(None)
            item = self._pending[0]
            if not self._alive(item, time.perf_counter()):
                self._pending.popleft()
                continue
            n = item.images.shape[0]
            if batch and size + n > self._max_batch:
                break  # it leads the next batch
            self._pending.popleft()
            batch.append(item)
            size += n
            if close_at is None:
                close_at = loop.time() + self._max_delay
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            now = time.perf_counter()
            batch = [it for it in batch if self._alive(it, now)]
            if not batch:
                continue
            images = torch.cat([it.images for it in batch]) if len(batch) > 1 else batch[0].images
            start = time.perf_counter()
            try:
                want = any(it.with_patches for it in batch)
                feats, patches = await loop.run_in_executor(self._executor, self._encode, images, want)
            except Exception as exc:  # noqa: BLE001 - the encoder's failure goes to every caller
                for it in batch:
                    self._queued_images -= it.images.shape[0]
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            encode_us = int((time.perf_counter() - start) * 1e6)
            self.batches += 1
            offset = 0
            for it in batch:
                n = it.images.shape[0]
                self._queued_images -= n
                if not it.future.done():
                    mine = patches[offset:offset + n] if it.with_patches else None
                    it.future.set_result(BatchResult(feats[offset:offset + n], mine, int((start - it.enqueued) * 1e6),
                                                     encode_us, images.shape[0]))
                offset += n
