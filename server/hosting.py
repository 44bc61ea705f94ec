"""A served model: an `EncoderModel` plus what serving adds to it — its encoder batcher and a text thread."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from adaptclip.adapt.encoder import EncoderModel
from adaptclip.compression.bundled import load_bundle
from adaptclip.compression.models import load_model
from adaptclip.server.batcher import Batcher
from adaptclip.server.config import BatchingConfig, ServerConfig
from adaptclip.server.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class Hosted:
    """One model as the service runs it: image batches through the batcher's encoder thread, text-tower work
    (classifiers, text embeddings, TPT) one at a time on a thread of its own."""

    def __init__(self, model: EncoderModel) -> None:
        self.model = model
        self.batcher: Batcher | None = None
        self._text = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"text-{model.name}")
        self._requests = 0  # requests now computing with this model (the batcher waits only for them)

    @property
    def name(self) -> str:
        return self.model.name

    def start(self, cfg: BatchingConfig, metrics: Metrics | None = None) -> None:
        """Start the encoder batcher (on the running event loop), its batches and queue in `metrics`."""
        self.batcher = Batcher(self.model.encode_images, max_batch=cfg.max_batch_size,
                               max_delay_s=cfg.max_queue_delay_ms / 1000.0, max_queue=cfg.max_queue_size,
                               name=self.model.name, on_batch=metrics.batch_observer(self.name) if metrics else None,
                               callers=lambda: self._requests)
        if metrics is not None:
            batcher = self.batcher
            metrics.watch_queue(self.name, lambda: batcher.queued)
        self.batcher.start()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around a request's work with this model: while it lasts, the batcher may wait for its items."""
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1

    async def run_text(self, fn: Callable[..., T], *args: Any) -> T:
        """Text-tower work off the event loop, one call at a time."""
        return await asyncio.wrap_future(self._text.submit(fn, *args))

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self._text.shutdown(wait=False, cancel_futures=True)
        self.model.close()


def warm_up(model: EncoderModel) -> None:
    """One image and one text forward so the first request does not pay for lazy init."""
    size = model.image_size
    model.encode_images(torch.zeros(1, 3, size, size))
    if model.keep_rate < 1.0:
        model.encode_images(torch.zeros(1, 3, size, size), True, model.keep_rate)
    if model.text is not None:
        model.text.encode(["a photo"])


def load_models(cfg: ServerConfig) -> list[EncoderModel]:
    """Load, check and warm every configured model (blocking; run it off the event loop)."""
    models: list[EncoderModel] = []
    for spec in cfg.models:
        if spec.bundle:
            log.info("loading bundle %s (onnxruntime, device=%s)", spec.bundle, spec.device)
            m: EncoderModel = load_bundle(spec)
        else:
            log.info("loading model %s (pretrained=%s, device=%s, precision=%s)", spec.model,
                     "RANDOM INIT" if spec.random_init else spec.pretrained, spec.device, spec.precision)
            m = load_model(spec)
        if any(h.name == m.name for h in models):
            raise ValueError(f"two models are named '{m.name}'; set `name` per model")
        warm_up(m)
        log.info("model %s ready (%s): embed_dim=%d image_size=%d logit_scale=%.3f fingerprint=%s",
                 m.name, m.runtime, m.embed_dim, m.image_size, m.logit_scale, m.fingerprint)
        models.append(m)
    return models
