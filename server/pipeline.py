"""One image's way through the service: features from the cache or the encoder batcher, then the adaptive loop.

`ImageViews` is the server's view source for `adapt.loop.adapt_image`: it decodes and renders only when
something is missing, renders the views a piece at a time on the worker pool (piece k + 1 while piece
k waits for the shared encoder batcher; pieces as adapt/pieces.py cuts them, small first where AugMix
renders on the CPU; the draws are made up front, `adapt.views.view_plan`, so any split gives the same
views; the plan, and the first piece when no confidence gate can skip the views, are drawn while view
0 is encoded), and hands the cache what it computed. The loop itself (gate, chunks, early stop, method) is the one
the accuracy harness runs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from adaptclip.adapt.loop import Outcome, adapt_image
from adaptclip.adapt.methods import MethodResult, adapt_views
from adaptclip.adapt.pieces import RENDER_CHUNK, first_piece, render_pieces, view_chunks
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.views import ViewPlan, view_plan
from adaptclip.server.hosting import Hosted

Decode = Callable[[], Awaitable[tuple[Image.Image, Tensor]]]


class ImageViews:
    """One image's view features: from the cache when there, decoding and encoding only what is missing."""

    def __init__(self, hosted: Hosted, s: AdaptSettings, decode: Decode, timeout_s: float | None,
                 pool: concurrent.futures.Executor, cached: tuple[dict[str, np.ndarray], dict] | None = None,
                 keep_rate: float = 1.0) -> None:
        self.hosted, self.s, self._decode, self.timeout_s, self.pool = hosted, s, decode, timeout_s, pool
        self.keep_rate = keep_rate
        self.feats: Tensor | None = None  # [n, D], view 0 first
        self.patches: Tensor | None = None  # [P, D] of view 0
        self.from_cache = cached is not None
        if cached is not None:
            arrays, _ = cached
            self.feats = torch.cat([torch.from_numpy(arrays["view0"].copy()),
                                    torch.from_numpy(arrays["views"].astype(np.float32))])
            if "patches" in arrays:
                self.patches = torch.from_numpy(arrays["patches"].astype(np.float32))
        self._img: Image.Image | None = None
        self._view0: Tensor | None = None
        self._plan: ViewPlan | None = None
        self._ahead: asyncio.Future | None = None  # the view plan (and first piece) prepared during view 0's encode
        self.dirty = False
        self.decode_us = self.queue_us = self.encode_us = self.render_us = 0

    async def _decoded(self) -> tuple[Image.Image, Tensor]:
        if self._img is None:
            start = time.perf_counter()
            self._img, self._view0 = await self._decode()
            self.decode_us = int((time.perf_counter() - start) * 1e6)
        return self._img, self._view0

    async def original(self, with_patches: bool) -> tuple[Tensor, Tensor | None]:
        """View 0's features [D] (and patches when asked and available), encoding it if needed."""
        want = with_patches and self.hosted.model.has_patches
        if self.feats is None or (want and self.patches is None):
            img, view0 = await self._decoded()
            if self.feats is None and self.s.method != "none" and self.s.views > 1:
                self._ahead = asyncio.get_running_loop().run_in_executor(self.pool, self._prepare, img, view0)
                # an image the gate skips never reads it: its failure, if any, is not an unretrieved error
                self._ahead.add_done_callback(lambda f: f.cancelled() or f.exception())
            r = await self.hosted.batcher.submit(view0.unsqueeze(0), self.timeout_s, with_patches=want,
                                                 keep_rate=self.keep_rate)
            self.queue_us += r.queue_us
            self.encode_us += r.encode_us
            if self.feats is None:
                self.feats = r.features
            if r.patches is not None:
                self.patches = r.patches[0]
            self.dirty = True
        return self.feats[0], self.patches if want else None

    async def first(self, n: int) -> Tensor:
        """Features [n, D] of views 0..n-1, rendering the views and encoding the missing ones."""
        have = self.feats.shape[0]
        if have < n:
            loop = asyncio.get_running_loop()
            prefetched = None
            if self._ahead is not None:
                prefetched, self._ahead = await self._ahead, None
            if self._plan is None:
                img, view0 = await self._decoded()
                self._plan = await loop.run_in_executor(self.pool, view_plan, self.hosted.model, img, view0, self.s)
            pieces = render_pieces(have, n, *self._cut())
            submitted: list[asyncio.Future] = []
            try:
                if prefetched is not None and have == 1 and prefetched.shape[0] == pieces[0][1] - 1:
                    rendering = loop.create_future()
                    rendering.set_result(prefetched)
                else:
                    rendering = loop.run_in_executor(self.pool, self._render, *pieces[0])
                for i in range(len(pieces)):
                    part = await rendering
                    if i + 1 < len(pieces):
                        rendering = loop.run_in_executor(self.pool, self._render, *pieces[i + 1])
                    submitted.append(asyncio.ensure_future(self.hosted.batcher.submit(part, self.timeout_s,
                                                                                      keep_rate=self.keep_rate)))
                results = await asyncio.gather(*submitted)
            finally:
                for task in submitted:
                    task.cancel()  # a failed piece: nobody waits for the others
            self.queue_us += max(r.queue_us for r in results)
            self.encode_us += sum({r.batch: r.encode_us for r in results}.values())  # each batch once
            self.feats = torch.cat([self.feats, *(r.features for r in results)])
            self.dirty = True
        return self.feats[:n]

    def _cut(self) -> tuple[int, int | None]:
        """(cap, first) of adapt.pieces.render_pieces: pieces of at most a batch, ramping up where
        rendering is dear (AugMix on the CPU; on a GPU views render fast)."""
        return (min(RENDER_CHUNK, self.hosted.batcher.max_batch),
                first_piece(self.s, self.hosted.model.device.type == "cpu"))

    def _prepare(self, img: Image.Image, view0: Tensor) -> Tensor | None:
        """Drawn while view 0 is encoded (the wait the loop's first decision costs): the view plan, and
        the first piece of views when no confidence gate can skip them (otherwise only the plan, so a
        skipped image costs no rendering)."""
        self._plan = view_plan(self.hosted.model, img, view0, self.s)
        if self.s.skip_entropy > 0.0:
            return None
        return self._render(*render_pieces(*view_chunks(self.s)[0], *self._cut())[0])

    def _render(self, lo: int, hi: int) -> Tensor:
        """Views lo..hi-1 on the CPU (a worker thread), timed."""
        start = time.perf_counter()
        views = self._plan.render(lo, hi).cpu()
        self.render_us += int((time.perf_counter() - start) * 1e6)
        return views

    def entry(self) -> dict[str, np.ndarray]:
        """The cache entry: view 0 in fp32, the augmented views and the patches in fp16."""
        arrays = {"view0": self.feats[:1].numpy(), "views": self.feats[1:].half().numpy()}
        if self.patches is not None:
            arrays["patches"] = self.patches.half().numpy()
        return arrays


async def classify_image(hosted: Hosted, views: ImageViews, classifier: Tensor, labels: tuple[str, ...],
                         s: AdaptSettings, pool: concurrent.futures.Executor, deadline: float | None = None) -> Outcome:
    """The adaptive loop on one image; GS-Bias and ZERO on the worker pool, TPT on the model's text thread.
    `deadline` (a time.monotonic() instant) stops it between chunks and TPT steps with TimeoutError."""
    model = hosted.model

    async def run_method(settings: AdaptSettings, feats: Tensor, patches: Tensor | None) -> MethodResult:
        if settings.method == "tpt":
            text = model.text.prompt_side(labels)
            return await hosted.run_text(functools.partial(adapt_views, deadline=deadline), settings, feats, None,
                                         classifier, model.logit_scale, text)
        return await asyncio.get_running_loop().run_in_executor(
            pool, adapt_views, settings, feats, patches, classifier, model.logit_scale, None, model.kernels.gs_bias,
            model.device)

    return await adapt_image(views, s, classifier, model.logit_scale, model.logit_bias, run_method, deadline)
