"""Per-image adaptation state cache: Redis when configured, an in-process LRU by default.

Entries are versioned, checksummed blobs: a stale, foreign or corrupt entry is detected, ignored
(counted as an error) and overwritten, never served. No request fails because of the cache:
every backend call is bounded by a timeout, and a failing Redis is skipped for a short back-off
before the next try, so the service reconnects by itself when Redis returns.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)
SCHEMA = 2  # bump when the layout of an entry or of a key changes (2: reports store the method by name)
_MAGIC = b"ACC1"
_DIGEST = 16
T = TypeVar("T")


class CorruptEntry(ValueError):
    """The blob is not a valid entry of this schema."""


def encode_entry(kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """MAGIC | header length | JSON header (schema, kind, array specs, meta) | array bytes | blake2b."""
    specs, chunks = [], []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        specs.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
        chunks.append(arr.tobytes())
    header = json.dumps({"schema": SCHEMA, "kind": kind, "arrays": specs, "meta": meta}).encode()
    body = _MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)
    return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()


def decode_entry(blob: bytes, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of encode_entry; CorruptEntry for anything that does not check out."""
    if len(blob) < len(_MAGIC) + 4 + _DIGEST or not blob.startswith(_MAGIC):
        raise CorruptEntry("bad magic or truncated")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise CorruptEntry("checksum mismatch")
    (hlen,) = struct.unpack("<I", body[4:8])
    try:
        header = json.loads(body[8:8 + hlen])
    except ValueError as exc:
        raise CorruptEntry(f"bad header: {exc}") from None
    if header.get("schema") != SCHEMA or header.get("kind") != kind:
        raise CorruptEntry(f"schema/kind {header.get('schema')}/{header.get('kind')} != {SCHEMA}/{kind}")
    arrays, offset = {}, 8 + hlen
    for spec in header["arrays"]:
        dtype = np.dtype(spec["dtype"])
        n = int(np.prod(spec["shape"])) * dtype.itemsize
        if offset + n > len(body):
            raise CorruptEntry("array data truncated")
        arrays[spec["name"]] = np.frombuffer(body, dtype, count=n // dtype.itemsize, offset=offset).reshape(spec["shape"])
        offset += n
    if offset != len(body):
        raise CorruptEntry("trailing bytes")
    return arrays, header["meta"]


class Backend(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes) -> None: ...
    async def close(self) -> None: ...


class MemoryBackend:
    """In-process LRU bounded by the bytes of its values (the embedded default)."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        old = self._data.pop(key, None)
        self.bytes -= len(old) if old is not None else 0
        self._data[key] = value
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self.bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._data)

    async def close(self) -> None:
        self._data.clear()


def redis_client(url: str, timeout_s: float) -> aioredis.Redis:
    """The one redis-py asyncio client setup (cache and label-set store): every socket wait bounded."""
    return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                             retry_on_timeout=False, health_check_interval=30)


class RedisBackend:
    """redis-py asyncio. Every entry gets a TTL, so a Redis run with `maxmemory-policy volatile-lru` (see
    docker-compose.yml) evicts cache entries under memory pressure and never the label sets beside them."""

    name = "redis"

    def __init__(self, url: str, ttl_s: int, timeout_s: float) -> None:
        self.ttl_s = ttl_s
        self._client = redis_client(url, timeout_s)

    async def get(self, key: str) -> bytes | None:
        return await self._client.get(key)

    async def set(self, key: str, value: bytes) -> None:
        await self._client.set(key, value, ex=self.ttl_s)

    async def close(self) -> None:
        await self._client.aclose()


@dataclass
class CacheStats:
    """Prometheus counters in `registry` (the service's `Metrics` registry, exported on --metrics-port; a
    fresh one by default) and their totals, read back for tests."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels = ["backend", "level"]
        self.hits = Counter("adaptclip_cache_hits", "cache hits", labels, registry=self.registry)
        self.misses = Counter("adaptclip_cache_misses", "cache misses", labels, registry=self.registry)
        self.errors = Counter("adaptclip_cache_errors", "cache errors (backend down, slow, corrupt entry)",
                              labels + ["kind"], registry=self.registry)

    def value(self, metric: str, backend: str, level: str, **extra: str) -> float:
        name = {"hits": "adaptclip_cache_hits_total", "misses": "adaptclip_cache_misses_total",
                "errors": "adaptclip_cache_errors_total"}[metric]
        total = 0.0
        for m in self.registry.collect():
            for s in m.samples:
                if s.name == name and s.labels.get("backend") == backend and s.labels.get("level") == level \
                        and all(s.labels.get(k) == v for k, v in extra.items()):
                    total += s.value
        return total


class Unreachable(Exception):
    """A bounded call did not get an answer; `kind` is timeout, backend (it failed) or unavailable (backing off)."""

    def __init__(self, kind: str, cause: BaseException | str) -> None:
        super().__init__(f"{kind}: {cause}")
        self.kind = kind


class Bounded:
    """Calls to a remote backend that never wait past `timeout_s`; after a failure the backend is skipped
    for `retry_after_s`, so a dead one costs each request at most one bounded wait per back-off."""

    def __init__(self, timeout_s: float, retry_after_s: float) -> None:
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0

    async def call(self, coro_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if time.monotonic() < self._skip_until:
            raise Unreachable("unavailable", "backing off after an error")
        try:
            return await asyncio.wait_for(coro_fn(*args), self.timeout_s)
        except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - callers decide; none may hang
            self._skip_until = time.monotonic() + self.retry_after_s
            raise Unreachable("timeout" if isinstance(exc, asyncio.TimeoutError) else "backend", exc) from exc


class Cache:
    """Typed get/put over a backend; never raises, never waits past `timeout_s`."""

    def __init__(self, backend: Backend, timeout_s: float = 0.05, retry_after_s: float = 1.0,
                 stats: CacheStats | None = None) -> None:
        self.backend = backend
        self.bounded = Bounded(timeout_s, retry_after_s)
        self.stats = stats or CacheStats()

    @property
    def shared(self) -> bool:
        """Whether other processes see these entries (so worth filling with what every replica builds)."""
        return isinstance(self.backend, RedisBackend)

    def _error(self, level: str, kind: str, exc: BaseException | str) -> None:
        self.stats.errors.labels(self.backend.name, level, kind).inc()
        log.debug("cache %s error on %s: %s", kind, level, exc)

    async def _call(self, level: str, coro_fn, *args):
        try:
            return await self.bounded.call(coro_fn, *args)
        except Unreachable as exc:  # the cache must never fail a request
            self._error(level, exc.kind, exc)
            return None

    async def get(self, level: str, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        blob = await self._call(level, self.backend.get, key)
        if blob is None:
            self.stats.misses.labels(self.backend.name, level).inc()
            return None
        try:
            entry = decode_entry(blob, level)
        except CorruptEntry as exc:
            self._error(level, "corrupt", exc)
            self.stats.misses.labels(self.backend.name, level).inc()
            return None
        self.stats.hits.labels(self.backend.name, level).inc()
        return entry

    async def put(self, level: str, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        await self._call(level, self.backend.set, key, encode_entry(level, arrays, meta))

    async def close(self) -> None:
        try:
            await self.backend.close()
        except Exception as exc:  # noqa: BLE001
            log.debug("cache close: %s", exc)
