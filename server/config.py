"""Server settings: embedded defaults, overridable by a YAML file and by CLI flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaptclip.compression.models import ModelSpec


@dataclass
class Limits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_labels: int = 2048
    max_templates: int = 128
    max_label_chars: int = 256
    max_embed_items: int = 256
    max_views: int = 256  # per request (the protocol allows 1024); above -> INVALID_ARGUMENT
    max_steps: int = 20  # per request (the protocol allows 100)
    # Views (and Embed images) of all requests being computed at once; past it RESOURCE_EXHAUSTED with a
    # retry hint, never a growing queue. The default equals the encoder queue, which then never fills.
    max_views_in_flight: int = 1024


@dataclass
class SecurityConfig:
    auth_token_file: str | None = None  # bearer tokens, one a line; re-read on SIGHUP; None = no auth
    tls_cert: str | None = None  # PEM certificate chain; with tls_key: the port speaks TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: mutual TLS, a client certificate it signed is required
    reflection: bool = True  # server reflection (open, like health, even with auth)


@dataclass
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0  # the longest a batch waits for other active requests' items (server/batcher.py)
    max_queue_size: int = 1024  # images waiting for the encoder; beyond -> RESOURCE_EXHAUSTED


@dataclass
class CacheConfig:
    enabled: bool = True
    redis_url: str | None = None  # e.g. redis://localhost:6379/0; None = in-process LRU
    max_bytes: int = 512 * 1024 * 1024  # in-process LRU budget
    ttl_s: int = 24 * 3600  # Redis entry lifetime; > 0 with Redis (volatile-lru evicts only keys with a TTL)
    timeout_ms: float = 50.0  # per cache call; past it the request computes instead
    retry_after_s: float = 1.0  # after a Redis error, skip it this long before trying again


@dataclass
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    label_set_cache_size: int = 256  # label sets whose classifiers stay built (per model); the rest are re-read
    label_set_memory_bytes: int = 64 * 1024 * 1024  # label sets kept in memory when there is no Redis, no state_dir
    state_dir: str | None = None  # without Redis: registered label sets kept here, across restarts
    preprocess_workers: int = 2  # threads decoding and preprocessing images
    grace_period_s: float = 30.0  # SIGTERM: how long in-flight work may take to finish
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = any free one); None = off
    metrics_host: str = "0.0.0.0"
    log_json: bool = False  # log JSON lines (one per request, and every other record)

    @property
    def default_model(self) -> ModelSpec:
        return self.models[0]

    def check(self) -> None:
        """Refuse settings that only fail together (ValueError, reported as a bad config)."""
        c = self.cache
        if c.redis_url and c.enabled and c.ttl_s <= 0:
            raise ValueError("cache.ttl_s (--cache-ttl) must be > 0 with Redis: label sets share it, so it runs "
                             "maxmemory-policy volatile-lru, which evicts only keys with a TTL")
        if c.redis_url and self.state_dir:
            raise ValueError("state_dir (--state-dir) and cache.redis_url (--redis-url) both keep label sets: give one")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Dataclass from a dict, rejecting unknown keys with the key's path in the message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) in {where}: {', '.join(unknown)}")
    return cls(**data)


def load_config(path: str | Path | None) -> ServerConfig:
    """Read a YAML config (see README); missing sections keep their defaults."""
    if path is None:
        return ServerConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    raw = dict(raw)
    raw.pop("tuned", None)  # `adaptclip tune`'s record of what it measured: for readers, not settings
    models = [_build(ModelSpec, dict(m), f"models[{i}]") for i, m in enumerate(raw.pop("models", []) or [])]
    limits = _build(Limits, dict(raw.pop("limits", {}) or {}), "limits")
    batching = _build(BatchingConfig, dict(raw.pop("batching", {}) or {}), "batching")
    cache = _build(CacheConfig, dict(raw.pop("cache", {}) or {}), "cache")
    security = _build(SecurityConfig, dict(raw.pop("security", {}) or {}), "security")
    cfg = _build(ServerConfig, raw, "config")
    cfg.models = models or [ModelSpec()]
    cfg.limits, cfg.batching, cfg.cache, cfg.security = limits, batching, cache, security
    return cfg
