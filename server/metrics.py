"""Prometheus metrics of a serving process, all in one registry that `--metrics-port` exports.

Each `Metrics` owns its registry (a process serves one App; tests build many side by side). Names follow
Prometheus conventions: counters end in `_total` (prometheus_client adds it), durations are `_seconds`.
The cache's counters (`CacheStats`) and the process collector (resident memory, CPU, open fds) live in
the same registry, so one scrape sees everything.
"""
from __future__ import annotations

from collections.abc import Callable
from http.server import HTTPServer

from prometheus_client import (GC_COLLECTOR, CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, start_http_server)

from adaptclip.server.cache import CacheStats

STAGES = ("decode", "queue", "encode", "adapt", "total")
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every metric the service exports. `process=True` adds the process, platform and GC collectors."""

    def __init__(self, process: bool = False) -> None:
        r = self.registry = CollectorRegistry()
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            if GC_COLLECTOR is not None:
                GCCollector(registry=r)
        self.requests = Counter("adaptclip_requests", "RPCs answered, by method and status code", ["rpc", "code"],
                                registry=r)
        self.request_seconds = Histogram("adaptclip_request_duration_seconds", "RPC wall time, received to answered",
                                         ["rpc"], buckets=SECONDS, registry=r)
        self.stage_seconds = Histogram("adaptclip_stage_seconds", "per classified image: time in each stage "
                                       "(decode, queue, encode, adapt; total = the whole image)", ["stage"],
                                       buckets=SECONDS, registry=r)
        self.batch_size = Histogram("adaptclip_encoder_batch_size", "images (views included) per encoder batch",
                                    ["model"], buckets=BATCH_SIZES, registry=r)
        self.views_encoded = Counter("adaptclip_views_encoded", "images and views through the encoder", ["model"],
                                     registry=r)
        self.queue_depth = Gauge("adaptclip_queue_depth", "images waiting for the encoder", ["model"], registry=r)
        self.views_in_flight = Gauge("adaptclip_views_in_flight", "views reserved by requests being computed",
                                     registry=r)
        self.adaptation_skipped = Counter("adaptclip_adaptation_skipped", "adapting requests the confidence gate "
                                          "answered zero-shot, without views", ["method"], registry=r)
        self.adaptation_fell_back = Counter("adaptclip_adaptation_fell_back", "adapting requests the safety gate "
                                            "answered zero-shot after seeing the views", ["method"], registry=r)
        self.models_loaded = Gauge("adaptclip_models_loaded", "models loaded and serving", registry=r)
        self.auth_tokens = Gauge("adaptclip_auth_tokens", "bearer tokens accepted (0: auth off)", registry=r)
        self.auth_reloads = Counter("adaptclip_auth_reloads", "token file reloads (SIGHUP), by result", ["result"],
                                    registry=r)
        self.cache = CacheStats(r)  # adaptclip_cache_{hits,misses,errors}_total{backend,level[,kind]}

    def request(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.request_seconds.labels(rpc).observe(seconds)

    def stages(self, decode_us: int, queue_us: int, encode_us: int, adapt_us: int, total_us: int,
               computed: bool) -> None:
        """One classified image; a cached answer has only a total."""
        values = zip(STAGES, (decode_us, queue_us, encode_us, adapt_us, total_us))
        for stage, us in values if computed else (("total", total_us),):
            self.stage_seconds.labels(stage).observe(us / 1e6)

    def batch_observer(self, model: str) -> Callable[[int], None]:
        """The batcher's hook: one call per encoder batch with its size."""
        hist, views = self.batch_size.labels(model), self.views_encoded.labels(model)

        def observe(n: int) -> None:
            hist.observe(n)
            views.inc(n)
        return observe

    def watch_queue(self, model: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(model).set_function(depth)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (tests and benchmarks); 0 when it was never set."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def serve(self, port: int, host: str) -> HTTPServer:
        """Start the /metrics HTTP server on its own thread; port 0 picks a free one (see .server_port)."""
        httpd, _ = start_http_server(port, host.strip("[]"), registry=self.registry)
        return httpd
