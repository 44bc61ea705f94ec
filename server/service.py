"""The adaptclip.v1.Classifier servicer: request -> decode -> views -> encoder batch -> adaptation -> response."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator

import grpc
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

import adaptclip
from adaptclip.server.cache import Cache
from adaptclip.server.config import ServerConfig
from adaptclip.server.convert import fill_top, report_to_proto, settings_from_request, settings_to_proto
from adaptclip.server.decode import check_image_bytes, decode_image
from adaptclip.server.errors import RequestError, failed_precondition, invalid, not_found, parsed, rpc, status_for
from adaptclip.server.hosting import Hosted
from adaptclip.server.limits import ViewBudget, check_limits, check_settings, views_needed
from adaptclip.server.metrics import Metrics
from adaptclip.server.keys import feature_key, image_digest, result_key, token_tag
from adaptclip.server.labels import LabelSetDef, LabelSetStore, fixed_sets_hint, label_set_id, validate_label_set
from adaptclip.server.labelstore import open_store
from adaptclip.server.pipeline import ImageViews, classify_image
from adaptclip.server.results import entry_from_outcome, outcome_from_entry
from adaptclip.v1 import classifier_pb2 as pb
from adaptclip.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_TOP_K = 5
STREAM_WINDOW = 64  # requests of one stream in flight at once


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, cfg: ServerConfig, metrics: Metrics | None = None) -> None:
        cfg.check()
        check_limits(cfg.limits)
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.budget = ViewBudget(cfg.limits.max_views_in_flight)
        self.metrics.views_in_flight.set_function(lambda: self.budget.in_flight)
        self.models: dict[str, Hosted] = {}
        self.default_model = ""
        self.labels = LabelSetStore(cfg.label_set_cache_size, open_store(cfg))
        self.cache: Cache | None = None
        self._pre_pool = concurrent.futures.ThreadPoolExecutor(cfg.preprocess_workers, thread_name_prefix="decode")
        self.ready = asyncio.Event()

    def set_models(self, models: list[Hosted]) -> None:
        for h in models:  # a default no request could use is a config error, found at start
            try:
                check_settings(h.model.adapt_defaults, self.cfg.limits)
            except RequestError as exc:
                raise ValueError(f"model {h.name}: its adaptation defaults break the server's limits: {exc}") from None
        self.models = {h.name: h for h in models}
        self.metrics.models_loaded.set(len(models))
        self.default_model = models[0].name
        for h in models:
            for f in h.model.fixed_label_sets:
                self.labels.pin(LabelSetDef(label_set_id(f.labels, f.templates), f.labels, f.templates))
        self.ready.set()

    async def close(self) -> None:
        for h in self.models.values():
            await h.close()
        if self.cache is not None:
            await self.cache.close()
        await self.labels.close()
        self._pre_pool.shutdown(wait=False, cancel_futures=True)

    # -- lookups ----------------------------------------------------------------------------
    @property
    def _shared_cache(self) -> Cache | None:
        """The cache when other replicas see it: classifiers built here are worth storing there."""
        return self.cache if self.cache is not None and self.cache.shared else None

    def _hosted(self, name: str) -> Hosted:
        if not self.ready.is_set():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "model", "models are still loading; retry shortly")
        hosted = self.models.get(name or self.default_model)
        if hosted is None:
            raise not_found("model", f"unknown model '{name}'; loaded: {', '.join(self.models)}")
        return hosted

    async def _label_set(self, req: pb.ClassifyRequest, hosted: Hosted) -> LabelSetDef:
        """The request's label set, checked against what `hosted` can classify before it is stored."""
        which = req.WhichOneof("labels")
        if which == "label_set_id":
            ls = await self.labels.get(req.label_set_id)
        elif which == "label_set":
            ls = validate_label_set(list(req.label_set.labels), list(req.label_set.templates), self.cfg.limits,
                                    "label_set")
        else:
            raise invalid("label_set", "no labels given: set label_set (inline labels) or label_set_id")
        if not hosted.model.can_classify(ls.labels, ls.templates):
            raise failed_precondition(which, fixed_sets_hint(hosted))
        return await self.labels.add(ls)

    def _preprocess(self, hosted: Hosted, data: bytes, field: str) -> tuple[Image.Image, torch.Tensor]:
        img = decode_image(data, max_bytes=self.cfg.limits.max_image_bytes,
                           max_pixels=self.cfg.limits.max_image_pixels, field=field)
        return img, hosted.model.preprocess(img)

    async def _decode(self, hosted: Hosted, data: bytes, field: str = "image") -> tuple[Image.Image, torch.Tensor]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pre_pool, self._preprocess, hosted, data, field)

    # -- classify ---------------------------------------------------------------------------
    async def classify(self, req: pb.ClassifyRequest, timeout_s: float | None = None) -> pb.ClassifyResponse:
        """The whole pipeline for one request (gRPC or in-process callers); raises RequestError/FieldError."""
        start = time.perf_counter()
        hosted = self._hosted(req.model)
        model = hosted.model
        if req.top_k < 0:
            raise invalid("top_k", f"must be >= 0, got {req.top_k}")
        settings = settings_from_request(req.adaptation, model.adapt_defaults)
        check_settings(settings, self.cfg.limits)
        if settings.method == "tpt" and model.text is None:
            raise failed_precondition("adaptation.method", f"TPT tunes prompts through a text tower, and model "
                                      f"'{model.name}' has none; use gs_bias or zero")
        keep_rate = model.check_keep_rate(
            req.token_keep_rate if req.HasField("token_keep_rate") else model.keep_rate, "token_keep_rate")
        ls = await self._label_set(req, hosted)
        check_image_bytes(req.image, self.cfg.limits.max_image_bytes)
        fkey = feature_key(model.fingerprint, image_digest(req.image), settings, token_tag(model, keep_rate), model.device)
        rkey = result_key(fkey, ls.id, settings)
        k = min(req.top_k or DEFAULT_TOP_K, len(ls.labels))
        resp = pb.ClassifyResponse(model=model.name, label_set_id=ls.id, request_id=req.request_id,
                                   token_keep_rate=keep_rate)
        cached = await self.cache.get("result", rkey) if self.cache else None
        if cached is not None and (out := outcome_from_entry(cached, len(ls.labels))) is not None:
            resp.cache_hit, resp.cache_level = True, pb.CACHE_RESULT
        else:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            with self.budget.hold(views_needed(settings)), hosted.request():
                classifier_task = asyncio.ensure_future(self.labels.classifier(hosted, ls, self._shared_cache))
                entry = await self.cache.get("features", fkey) if self.cache else None
                views = ImageViews(hosted, settings, lambda: self._decode(hosted, req.image), timeout_s,
                                   self._pre_pool, entry, keep_rate)
                try:
                    classifier = await classifier_task
                    out = await classify_image(hosted, views, classifier, ls.labels, settings, self._pre_pool,
                                               deadline)
                finally:
                    classifier_task.cancel()
            if self.cache:
                if views.dirty:
                    await self.cache.put("features", fkey, views.entry(), {"views": settings.views})
                await self.cache.put("result", rkey, *entry_from_outcome(out))
            if views.from_cache:
                resp.cache_hit, resp.cache_level = True, pb.CACHE_FEATURES
            t = resp.timings
            t.decode_us, t.queue_us, t.encode_us, t.adapt_us = views.decode_us, views.queue_us, views.encode_us, out.adapt_us
        resp.adaptation.CopyFrom(report_to_proto(out.report))
        if out.result is None:
            fill_top(resp.top, ls.labels, out.zero_shot, out.zero_shot.softmax(-1), k)
        else:
            fill_top(resp.top, ls.labels, out.result.logits, out.result.probs, k)
        if settings.method != "none":
            fill_top(resp.zero_shot_top, ls.labels, out.zero_shot, out.zero_shot.softmax(-1), k)
        t = resp.timings
        t.total_us = int((time.perf_counter() - start) * 1e6)
        self.metrics.stages(t.decode_us, t.queue_us, t.encode_us, t.adapt_us, t.total_us,
                            computed=resp.cache_level != pb.CACHE_RESULT)
        if out.report.skipped:
            self.metrics.adaptation_skipped.labels(settings.method).inc()
        if out.report.fell_back:
            self.metrics.adaptation_fell_back.labels(settings.method).inc()
        return resp

    @rpc
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self.classify(request, context.time_remaining())

    async def classify_or_error(self, req: pb.ClassifyRequest, timeout_s: float | None = None) -> pb.ClassifyResponse:
        """classify(), with a failure as the response's `error` (streams and batch jobs go on)."""
        try:
            return await self.classify(parsed(req), timeout_s)
        except Exception as exc:  # noqa: BLE001 - one item's failure must not end the stream
            request_id = getattr(req, "request_id", "")
            code, message = status_for(exc, f"stream item {request_id!r}")
            return pb.ClassifyResponse(request_id=request_id, error=pb.Error(code=code.value[0], message=message))

    @rpc
    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyResponse]:
        """Reads ahead up to STREAM_WINDOW requests so they share encoder batches; answers in order."""
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await pending.put(asyncio.ensure_future(self.classify_or_error(req, context.time_remaining())))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # surfaces a read error
        finally:
            reader.cancel()
            while not pending.empty():
                if (task := pending.get_nowait()) is not None:
                    task.cancel()

    # -- label sets, embeddings, info ------------------------------------------------------
    async def register_label_set(self, request: pb.LabelSet) -> pb.LabelSetRef:
        """Validate, store, and build the classifier for every loaded model that can use it."""
        ls = validate_label_set(list(request.labels), list(request.templates), self.cfg.limits, "label_set")
        able = [h for h in list(self.models.values()) if h.model.can_classify(ls.labels, ls.templates)]
        if not able:
            raise failed_precondition("label_set", " / ".join(fixed_sets_hint(h) for h in self.models.values()))
        await self.labels.add(ls)
        for hosted in able:
            await self.labels.classifier(hosted, ls, self._shared_cache)
        return pb.LabelSetRef(label_set_id=ls.id, num_labels=len(ls.labels), num_templates=len(ls.templates))

    @rpc
    async def RegisterLabelSet(self, request: pb.LabelSet, context: grpc.aio.ServicerContext) -> pb.LabelSetRef:
        return await self.register_label_set(request)

    @rpc
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        hosted = self._hosted(request.model)
        model = hosted.model
        limit = self.cfg.limits.max_embed_items
        if not request.images and not request.texts:
            raise invalid("images", "nothing to embed: give images and/or texts")
        if len(request.images) > limit:
            raise invalid("images", f"{len(request.images)} images is over the limit of {limit}")
        if len(request.texts) > limit:
            raise invalid("texts", f"{len(request.texts)} texts is over the limit of {limit}")
        if request.texts and model.text is None:
            raise failed_precondition("texts", f"model '{model.name}' has no text tower: it embeds images only")
        resp = pb.EmbedResponse(model=model.name, dim=model.embed_dim)
        if request.images:
            with self.budget.hold(len(request.images), "images"), hosted.request():
                decoded = await asyncio.gather(*(self._decode(hosted, d, f"images[{i}]")
                                                 for i, d in enumerate(request.images)))
                result = await hosted.batcher.submit(torch.stack([p for _, p in decoded]),
                                                     timeout_s=context.time_remaining(), keep_rate=model.keep_rate)
            feats = F.normalize(result.features, dim=-1) if request.normalize else result.features
            for row in feats.tolist():
                resp.image_embeddings.add(values=row)
        if request.texts:
            feats = await hosted.run_text(model.text.encode, list(request.texts), request.normalize)
            for row in feats.tolist():
                resp.text_embeddings.add(values=row)
        return resp

    @rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        lim, bat = self.cfg.limits, self.cfg.batching
        info = pb.ModelInfo(default_model=self.default_model, limits=pb.Limits(
            max_image_bytes=lim.max_image_bytes, max_image_pixels=lim.max_image_pixels, max_labels=lim.max_labels,
            max_templates=lim.max_templates, max_batch_size=bat.max_batch_size,
            max_queue_delay_us=int(bat.max_queue_delay_ms * 1000), max_queue_size=bat.max_queue_size,
            max_embed_items=lim.max_embed_items, max_views=lim.max_views, max_steps=lim.max_steps,
            max_views_in_flight=lim.max_views_in_flight),
            versions=pb.Versions(adaptclip=adaptclip.__version__, open_clip=open_clip.__version__,
                                 torch=torch.__version__, grpc=grpc.__version__))
        for h in self.models.values():
            m = h.model
            info.models.add(name=m.name, is_default=m.name == self.default_model, embed_dim=m.embed_dim,
                            image_size=m.image_size, pretrained=m.source, fingerprint=m.fingerprint,
                            device=str(m.device), precision=m.precision, logit_scale=m.logit_scale,
                            random_init=m.random_init, adaptation=settings_to_proto(m.adapt_defaults),
                            token_compression=_token_compression(m.compressor, m.keep_rate), runtime=m.runtime,
                            patch_tokens=m.has_patches,
                            kernels=pb.KernelBackends(requested=m.kernels.requested, views=m.kernels.views,
                                                      gs_bias=m.kernels.gs_bias, tokens=m.kernels.tokens,
                                                      notes=list(m.kernels.notes)),
                            bundled_label_sets=[pb.BundledLabelSet(name=f.name, label_set_id=label_set_id(f.labels, f.templates),
                                                                   num_labels=len(f.labels))
                                                for f in m.fixed_label_sets])
        return info


def _token_compression(c, keep_rate: float) -> pb.TokenCompression:
    if c is None:
        return pb.TokenCompression(available=False, keep_rate=1.0)
    return pb.TokenCompression(available=True, keep_rate=keep_rate, reduce_at=list(c.reduce_at), fuse=c.fuse,
                               score_layers=c.score_layers)
