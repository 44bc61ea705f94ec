"""The adaptation-state cache: in-process LRU and a real Redis (started here), hits, misses and faults."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.server.cache import SCHEMA, Cache, CorruptEntry, MemoryBackend, decode_entry, encode_entry
from adaptclip.compression.models import ModelSpec
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, TINY_CONFIG, make_image, start_server
from redis_server import RedisServer

A = pb.Adaptation
GS = A(method=A.GS_BIAS, views=8, seed=3)
OTHER_LABELS = ["apple", "banana", "cherry"]


@pytest.fixture()
def redis_server(tmp_path):
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.kill()


@pytest.fixture(params=["memory", "redis"])
def cached_server(request, tiny_spec, tmp_path):
    """A service with the in-process LRU, or pointed at its own Redis."""
    redis_srv = None
    overrides = {}
    if request.param == "redis":
        redis_srv = RedisServer(tmp_path).start()
        overrides = {"cache__redis_url": redis_srv.url, "cache__timeout_ms": 500.0}
    srv = start_server(tiny_spec, **overrides)
    yield srv, redis_srv
    srv.stop()
    if redis_srv:
        redis_srv.kill()


def _scores(resp):
    return [(s.label, s.logit, s.probability) for s in resp.top], [(s.label, s.logit) for s in resp.zero_shot_top]


def _batches(srv) -> int:
    return next(iter(srv.app.service.models.values())).batcher.batches


def test_entry_roundtrip_and_corruption():
    arrays = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.ones(4, np.float32)}
    blob = encode_entry("features", arrays, {"views": 8})
    got, meta = decode_entry(blob, "features")
    assert meta == {"views": 8} and all(np.array_equal(got[k], v) for k, v in arrays.items())
    for bad in (blob[:-1] + bytes([blob[-1] ^ 1]), blob[:20], b"junk" * 10, blob[:30] + b"x" + blob[31:]):
        with pytest.raises(CorruptEntry):
            decode_entry(bad, "features")
    with pytest.raises(CorruptEntry):
        decode_entry(blob, "result")  # right blob, wrong level


def test_stale_schema_is_not_served(monkeypatch):
    import adaptclip.server.cache as cache_mod

    monkeypatch.setattr(cache_mod, "SCHEMA", SCHEMA + 1)
    blob = encode_entry("features", {"a": np.zeros(2, np.float32)}, {})
    monkeypatch.setattr(cache_mod, "SCHEMA", SCHEMA)
    with pytest.raises(CorruptEntry, match="schema"):
        decode_entry(blob, "features")


def test_feature_keys_carry_the_view_draws_version(monkeypatch):
    """Features of views drawn by another draw algorithm (an older version) are never looked up."""
    import adaptclip.server.keys as keys
    from adaptclip.adapt.settings import AdaptSettings

    s, zero_shot = AdaptSettings(method="gs_bias", views=8), AdaptSettings(method="none")
    key, plain = keys.feature_key("fp", "img", s), keys.feature_key("fp", "img", zero_shot)
    assert key != keys.feature_key("fp", "img", s.replace(seed=1))
    monkeypatch.setattr(keys, "DRAWS", "older")
    assert keys.feature_key("fp", "img", s) != key
    assert keys.feature_key("fp", "img", zero_shot) == plain  # view 0 alone holds no draws: still served


def test_augmix_feature_keys_carry_the_device_that_renders_them():
    """AugMix views are PIL's on the CPU and Kornia's on a GPU (apart by rounding): one never answers for the other."""
    import torch

    import adaptclip.server.keys as keys
    from adaptclip.adapt.settings import AdaptSettings

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    mixed, crops = AdaptSettings(method="gs_bias", views=8, augmix=True), AdaptSettings(method="gs_bias", views=8, augmix=False)
    assert keys.feature_key("fp", "img", mixed, device=cpu) != keys.feature_key("fp", "img", mixed, device=gpu)
    assert keys.feature_key("fp", "img", crops, device=cpu) == keys.feature_key("fp", "img", crops, device=gpu)


def test_memory_lru_respects_byte_budget():
    async def run():
        backend = MemoryBackend(max_bytes=10_000)
        cache = Cache(backend)
        for i in range(50):
            await cache.put("features", f"k{i}", {"x": np.zeros(300, np.float32)}, {})
            assert backend.bytes <= 10_000
        assert 0 < len(backend) < 50
        assert await cache.get("features", "k0") is None  # oldest evicted
        assert await cache.get("features", "k49") is not None
        await cache.get("features", "k45")  # touch: now most recent
        for i in range(50, 55):
            await cache.put("features", f"k{i}", {"x": np.zeros(300, np.float32)}, {})
        assert await cache.get("features", "k45") is not None
    asyncio.run(run())


def test_hit_after_miss_identical_and_new_label_set_skips_encoder(cached_server):
    srv, _ = cached_server
    img = make_image(21, (64, 48))
    with Client(srv.target) as c:
        first = c.classify(img, labels=LABELS, adaptation=GS, top_k=8)
        assert first.cache_level == pb.CACHE_MISS and not first.cache_hit
        before = _batches(srv)
        again = c.classify(img, labels=LABELS, adaptation=GS, top_k=8)
        assert again.cache_level == pb.CACHE_RESULT and again.cache_hit
        assert _scores(again) == _scores(first)
        assert again.adaptation.views_encoded == first.adaptation.views_encoded == 8
        other = c.classify(img, labels=OTHER_LABELS, adaptation=GS, top_k=3)
        assert other.cache_level == pb.CACHE_FEATURES and other.timings.encode_us == 0
        assert _batches(srv) == before, "a cached image with a new label set must not touch the encoder"
        plain = c.classify(img, labels=LABELS, top_k=8)  # zero-shot: its own (view 0 only) entry
        assert [s.label for s in plain.top] == [label for label, _ in _scores(first)[1]]
        assert [s.logit for s in plain.top] == pytest.approx([logit for _, logit in _scores(first)[1]], abs=1e-5)


def test_feature_hit_equals_fresh_computation(cached_server, tiny_spec):
    """Adapting from cached (fp16) view features answers exactly as computing them fresh does."""
    srv, _ = cached_server
    img = make_image(22, (50, 50))
    with Client(srv.target) as c:
        c.classify(img, labels=OTHER_LABELS, adaptation=GS)  # fills the feature entry
        from_cache = c.classify(img, labels=LABELS, adaptation=GS, top_k=8)
    assert from_cache.cache_level == pb.CACHE_FEATURES
    fresh_srv = start_server(tiny_spec, cache__enabled=False)
    try:
        with Client(fresh_srv.target) as c:
            fresh = c.classify(img, labels=LABELS, adaptation=GS, top_k=8)
    finally:
        fresh_srv.stop()
    assert _scores(from_cache) == _scores(fresh)


def test_different_checkpoint_same_name_misses(redis_server, tiny_checkpoint, tmp_path):
    torch.manual_seed(1)
    import open_clip

    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("tiny-vit").state_dict(), other)
    img = make_image(23)
    answers = []
    for ckpt in (tiny_checkpoint, other):
        spec = ModelSpec(model=str(TINY_CONFIG), pretrained=str(ckpt), name="same-name", device="cpu")
        srv = start_server(spec, cache__redis_url=redis_server.url, cache__timeout_ms=500.0)
        try:
            with Client(srv.target) as c:
                resp = c.classify(img, labels=LABELS, adaptation=GS)
                answers.append(resp)
                assert resp.cache_level == pb.CACHE_MISS
                assert c.classify(img, labels=LABELS, adaptation=GS).cache_level == pb.CACHE_RESULT
        finally:
            srv.stop()
    assert _scores(answers[0]) != _scores(answers[1])


def test_corrupt_entries_are_recomputed_and_overwritten(redis_server, tiny_spec):
    srv = start_server(tiny_spec, cache__redis_url=redis_server.url, cache__timeout_ms=500.0)
    r = redis_server.client()
    img = make_image(24)
    try:
        with Client(srv.target) as c:
            first = c.classify(img, labels=LABELS, adaptation=GS)
            keys = r.keys(f"adaptclip:{SCHEMA}:*")
            assert {k.decode().split(":")[2] for k in keys} == {"features", "result", "classifier"}
            # every other key is a label set, versioned by its own schema (tests/test_replicas.py)
            assert {k.decode().split(":")[1] for k in r.keys("adaptclip:*")} == {str(SCHEMA), "labelset"}
            for k in keys:
                r.set(k, r.get(k)[:-3] + b"bad")
            errors = srv.app.service.cache.stats.value("errors", "redis", "result", kind="corrupt")
            again = c.classify(img, labels=LABELS, adaptation=GS)
            assert again.cache_level == pb.CACHE_MISS and _scores(again) == _scores(first)
            assert srv.app.service.cache.stats.value("errors", "redis", "result", kind="corrupt") == errors + 1
            assert c.classify(img, labels=LABELS, adaptation=GS).cache_level == pb.CACHE_RESULT  # overwritten
    finally:
        srv.stop()


def test_redis_killed_mid_stream_then_restarted(redis_server, tiny_spec):
    srv = start_server(tiny_spec, cache__redis_url=redis_server.url, cache__timeout_ms=100.0, cache__retry_after_s=0.2)
    n, killed, restarted = 120, threading.Event(), threading.Event()
    responses = []
    try:
        with Client(srv.target) as c:
            ref = c.register_label_set(LABELS)

            def requests():
                for i in range(n):
                    if i == 30:
                        redis_server.kill()
                        killed.set()
                    if i == 70:
                        redis_server.start()
                        time.sleep(0.3)  # past the back-off: the next requests reconnect
                        restarted.set()
                    # images repeat, so a working cache would hit
                    yield classify_request(make_image(i % 20), label_set_id=ref.label_set_id, request_id=str(i),
                                           adaptation=A(method=A.ZERO, views=4))

            for resp in c.classify_stream(requests(), timeout_s=120):
                responses.append(resp)
            assert [r.request_id for r in responses] == [str(i) for i in range(n)]
            assert not any(r.HasField("error") for r in responses), "no request may fail because of the cache"
            stats = srv.app.service.cache.stats
            assert stats.value("errors", "redis", "result", kind="backend") + \
                stats.value("errors", "redis", "result", kind="unavailable") > 0
            # Caching resumed after the restart: entries are back in Redis, and past any back-off a request is
            # stored and its repeat hits. (The stream's last puts may fall in a back-off window opened by a
            # stale pooled connection, so the stream's own entries are not what is checked.)
            assert redis_server.client().dbsize() > 0
            time.sleep(0.3)
            ask = dict(label_set_id=ref.label_set_id, adaptation=A(method=A.ZERO, views=4))
            c.classify(make_image(123), **ask)
            assert c.classify(make_image(123), **ask).cache_level == pb.CACHE_RESULT
    finally:
        srv.stop()


def test_slow_or_absent_redis_never_fails_requests(redis_server, tiny_spec):
    srv = start_server(tiny_spec, cache__redis_url=redis_server.url, cache__timeout_ms=50.0)
    try:
        with Client(srv.target, timeout_s=10) as c:
            slept = []
            blocker = threading.Thread(
                target=lambda: slept.append(redis_server.client().execute_command("DEBUG", "SLEEP", "1.5")))
            blocker.start()
            time.sleep(0.1)
            start = time.monotonic()
            resp = c.classify(make_image(25), labels=LABELS, adaptation=GS)
            assert resp.top and time.monotonic() - start < 1.4, "a slow Redis must not hold the request"
            blocker.join()
            assert slept, "Redis did not sleep: the test proved nothing"
            assert srv.app.service.cache.stats.value("errors", "redis", "result", kind="timeout") >= 1
    finally:
        srv.stop()
    absent = start_server(tiny_spec, cache__redis_url="redis://127.0.0.1:1/0", cache__timeout_ms=50.0)
    try:
        with Client(absent.target) as c:
            assert c.classify(make_image(26), labels=LABELS, adaptation=GS).top
    finally:
        absent.stop()
