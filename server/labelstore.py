"""Where label sets live beyond one process's memory: labels + templates under their content-hash id.

Backends (one per server, `open_store`): Redis with `--redis-url` (shared by every replica, so any replica
resolves any id; keys carry no TTL, so a `volatile-lru` Redis evicts cache entries, never label sets), a
directory with `--state-dir` (one JSON file per set, written atomically: a restart forgets none), else this
process's memory (the embedded default, bounded by bytes). What is read back is checked: its id must be the
content hash of the labels and templates read, else it is ignored. `Durable` bounds every call (a dead
Redis costs a request one `timeout_ms` at most) and queues the writes that failed: such a set stays
findable on this replica and is written by a background task with back-off once the backend answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from adaptclip.server.cache import Backend, Bounded, MemoryBackend, Unreachable, redis_client
from adaptclip.server.config import ServerConfig

log = logging.getLogger(__name__)
LABELSET_SCHEMA = 1  # its own version: a cache SCHEMA bump drops disposable entries, never label sets
LOCAL_TIMEOUT_S = 2.0  # bound on a local store call (a loaded disk's fsync), far above its usual cost
MAX_FLUSH_DELAY_S = 10.0  # longest back-off between tries to write the pending sets
_ID = re.compile(r"ls_[0-9a-f]{32}")


@dataclass(frozen=True)
class LabelSetDef:
    id: str
    labels: tuple[str, ...]
    templates: tuple[str, ...]


def label_set_id(labels: tuple[str, ...], templates: tuple[str, ...]) -> str:
    """Stable id: hash of the labels and the resolved templates (so inline and registered sets match)."""
    payload = json.dumps({"labels": labels, "templates": templates}, ensure_ascii=False, separators=(",", ":"))
    return "ls_" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def encode_set(ls: LabelSetDef) -> bytes:
    return json.dumps({"labels": ls.labels, "templates": ls.templates}, ensure_ascii=False).encode()


def decode_set(ls_id: str, blob: bytes) -> LabelSetDef | None:
    """The set stored under `ls_id`, or None when the blob is not one or its content hashes to another id."""
    try:
        data = json.loads(blob)
        labels, templates = tuple(data["labels"]), tuple(data["templates"])
    except (ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(x, str) for x in labels + templates) or label_set_id(labels, templates) != ls_id:
        return None
    return LabelSetDef(ls_id, labels, templates)


class RedisStore:
    """Label sets in Redis under `adaptclip:labelset:<LABELSET_SCHEMA>:<id>`, without a TTL."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = redis_client(url, timeout_s)
        self._policy_checked = False

    @staticmethod
    def key(ls_id: str) -> str:
        return f"adaptclip:labelset:{LABELSET_SCHEMA}:{ls_id}"

    async def get(self, key: str) -> bytes | None:
        return await self._client.get(self.key(key))

    async def set(self, key: str, value: bytes) -> None:
        await self._client.set(self.key(key), value)
        if not self._policy_checked:
            self._policy_checked = True
            await self._warn_if_evicting()

    async def _warn_if_evicting(self) -> None:
        """Best effort (managed Redis may refuse CONFIG): say so when this Redis may evict label sets."""
        try:
            policy = (await self._client.config_get("maxmemory-policy")).get("maxmemory-policy", "")
        except Exception as exc:  # noqa: BLE001 - a check, not a requirement
            log.debug("cannot read Redis maxmemory-policy: %s", exc)
            return
        if policy.startswith("allkeys"):
            log.warning("Redis runs maxmemory-policy %s: under memory pressure it may evict registered label "
                        "sets; run it with volatile-lru (README, docker-compose.yml)", policy)

    async def close(self) -> None:
        await self._client.aclose()


class DirStore:
    """One `<id>.json` per set under `root`, each written to a temporary file, synced, then renamed over."""

    name = "dir"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _read(self, ls_id: str) -> bytes | None:
        try:
            return (self.root / f"{ls_id}.json").read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, ls_id: str, value: bytes) -> None:
        tmp = self.root / f".{ls_id}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / f"{ls_id}.json")
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a crash
        finally:
            os.close(fd)

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, key)

    async def set(self, key: str, value: bytes) -> None:
        await asyncio.to_thread(self._write, key, value)

    async def close(self) -> None:
        pass


class Durable:
    """A backend behind bounded calls, with the sets whose write failed kept here and written later."""

    def __init__(self, backend: Backend, timeout_s: float, retry_after_s: float) -> None:
        self.backend = backend
        self.bounded = Bounded(timeout_s, retry_after_s)
        self.pending: dict[str, LabelSetDef] = {}
        self._flusher: asyncio.Task | None = None

    async def put(self, ls: LabelSetDef) -> bool:
        """Write `ls` through; False when the backend did not take it now (then it is pending)."""
        try:
            await self.bounded.call(self.backend.set, ls.id, encode_set(ls))
            return True
        except Unreachable as exc:
            self.pending[ls.id] = ls
            log.warning("label set %s not written to the %s store (%s): it works on this replica and is "
                        "written when the store answers (%d pending)", ls.id, self.backend.name, exc, len(self.pending))
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.ensure_future(self._flush())
            return False

    async def get(self, ls_id: str) -> LabelSetDef | None:
        """The set under `ls_id`, None when the store has none; raises Unreachable when it did not answer."""
        if (ls := self.pending.get(ls_id)) is not None:
            return ls
        if not _ID.fullmatch(ls_id):
            return None  # no id we ever gave out: never a path or a key
        blob = await self.bounded.call(self.backend.get, ls_id)
        if blob is None:
            return None
        ls = decode_set(ls_id, blob)
        if ls is None:
            log.warning("label set %s in the %s store ignored: its content does not hash to its id",
                        ls_id, self.backend.name)
        return ls

    async def _write_pending(self) -> None:
        """One pass over the pending sets; raises Unreachable at the first the backend does not take."""
        for ls in list(self.pending.values()):
            await self.bounded.call(self.backend.set, ls.id, encode_set(ls))
            self.pending.pop(ls.id, None)
            log.info("pending label set %s written to the %s store", ls.id, self.backend.name)

    async def _flush(self) -> None:
        delay = self.bounded.retry_after_s
        while self.pending:
            await asyncio.sleep(delay)
            try:
                await self._write_pending()
            except Unreachable:
                delay = min(2 * delay, MAX_FLUSH_DELAY_S)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        with contextlib.suppress(Unreachable):
            await self._write_pending()  # a last try (skipped while backing off)
        if self.pending:
            log.warning("%d label set(s) never reached the %s store; re-register them", len(self.pending),
                        self.backend.name)
        try:
            await self.backend.close()
        except Exception as exc:  # noqa: BLE001
            log.debug("label-set store close: %s", exc)


def open_store(cfg: ServerConfig) -> Durable:
    """Redis when a URL is configured, else the state directory when given, else this process's memory."""
    c = cfg.cache
    if c.redis_url:
        return Durable(RedisStore(c.redis_url, c.timeout_ms / 1000), c.timeout_ms / 1000, c.retry_after_s)
    backend = DirStore(Path(cfg.state_dir)) if cfg.state_dir else MemoryBackend(cfg.label_set_memory_bytes)
    return Durable(backend, LOCAL_TIMEOUT_S, c.retry_after_s)
