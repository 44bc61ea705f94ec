"""Process wiring: gRPC server (TLS, auth), health, reflection, metrics, model loading, graceful shutdown."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adaptclip.adapt.encoder import EncoderModel
from adaptclip.server.auth import AuthInterceptor, TokenStore, server_credentials
from adaptclip.server.cache import Cache, CacheStats, MemoryBackend, RedisBackend
from adaptclip.server.config import CacheConfig, ServerConfig
from adaptclip.server.hosting import Hosted, load_models
from adaptclip.server.metrics import Metrics
from adaptclip.server.service import ClassifierService
from adaptclip.server.wire import add_classifier
from adaptclip.v1 import classifier_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name


def make_cache(cfg: CacheConfig, stats: CacheStats | None = None) -> Cache | None:
    """Redis when a URL is configured, else the in-process LRU; None when caching is off."""
    if not cfg.enabled:
        return None
    timeout = cfg.timeout_ms / 1000
    backend = RedisBackend(cfg.redis_url, cfg.ttl_s, timeout) if cfg.redis_url else MemoryBackend(cfg.max_bytes)
    return Cache(backend, timeout_s=timeout, retry_after_s=cfg.retry_after_s, stats=stats)


async def activate(service: ClassifierService, models: list[EncoderModel] | None = None) -> list[Hosted]:
    """Load the configured models (off the loop) unless given, start their batchers, hand them to `service`."""
    if models is None:
        models = await asyncio.get_running_loop().run_in_executor(None, load_models, service.cfg)
    hosted = [Hosted(m) for m in models]
    for h in hosted:
        h.start(service.cfg.batching, service.metrics)
    service.set_models(hosted)
    return hosted


class InProcess:
    """The service's pipeline without gRPC (batch jobs' --local mode, Ray workers): same code, same answers.

        async with InProcess(cfg) as svc:
            resp = await svc.classify_or_error(request)
    """

    def __init__(self, cfg: ServerConfig, models: list[EncoderModel] | None = None) -> None:
        self.service = ClassifierService(cfg)
        self._models = models

    async def __aenter__(self) -> ClassifierService:
        self.service.cache = make_cache(self.service.cfg.cache)
        try:
            await activate(self.service, self._models)
        except BaseException:
            await self.service.close()  # the cache, pools and batchers already started
            raise
        return self.service

    async def __aexit__(self, *exc: object) -> None:
        await self.service.close()


class App:
    """A running server. `start()` binds the port at once (health NOT_SERVING); models load after."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics(process=True)
        self.service = ClassifierService(cfg, self.metrics)
        self.health = health.aio.HealthServicer()
        sec = cfg.security
        self.tokens = TokenStore(sec.auth_token_file, self.metrics) if sec.auth_token_file else None
        self.credentials = server_credentials(sec)  # reads the TLS files now: a bad one fails before the port opens
        max_msg = cfg.limits.max_image_bytes + 8 * 1024 * 1024
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", max_msg), ("grpc.max_send_message_length", max_msg)],
            interceptors=[AuthInterceptor(self.tokens, SERVICE_NAME, self.metrics)] if self.tokens else None)
        add_classifier(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if sec.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server)
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_httpd = None

    async def start(self) -> int:
        address = f"{self.cfg.host}:{self.cfg.port}"
        if self.credentials is not None:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {self.cfg.host}:{self.cfg.port}")
        if self.tokens is not None and self.credentials is None:
            log.warning("bearer tokens without TLS travel in plaintext: add --tls-cert/--tls-key unless a proxy "
                        "terminates TLS in front of this port")
        if self.cfg.metrics_port is not None:
            self._metrics_httpd = self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
            self.metrics_port = self._metrics_httpd.server_port
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics_host, self.metrics_port)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.cache = make_cache(self.cfg.cache, self.metrics.cache)
        await self.server.start()
        mode = "plaintext" if self.credentials is None else "mutual TLS" if self.cfg.security.tls_client_ca else "TLS"
        log.info("listening on %s:%d (%s%s; NOT_SERVING until models are loaded)", self.cfg.host, self.port, mode,
                 ", bearer tokens" if self.tokens else "")
        return self.port

    async def load(self, models: list[EncoderModel] | None = None) -> None:
        """Load (or adopt already loaded) models, start their batchers, then report SERVING."""
        hosted = await activate(self.service, models)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", ", ".join(h.name for h in hosted))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking new calls, let in-flight ones finish (up to the grace period), then free models."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.cfg.grace_period_s if grace_s is None else grace_s)
        await self.service.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()

    def reload(self) -> None:
        """SIGHUP: re-read the token file (certificates are read at start only)."""
        if self.tokens is not None:
            self.tokens.reload()
        else:
            log.info("SIGHUP: no token file configured, nothing to reload")


async def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; exit code 2 when a model cannot be served."""
    app = App(cfg)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    loader = asyncio.ensure_future(app.load())
    await asyncio.wait([loader, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        log.error("%s", loader.exception())
        await app.stop(0)
        return 2
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (grace %.0fs)", cfg.grace_period_s)
    loader.cancel()
    await app.stop()
    return 0
