"""The label-set store in one process: --state-dir across restarts, the memory default after LRU eviction,
reads checked against their id, a Redis outage (the set works where it was registered, elsewhere the error
says why, and it is written when Redis returns), a slow Redis, memory pressure, classifiers shared through
Redis, client-side health and targets, and the config rules."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2

from adaptclip.client import Client, cli
from adaptclip.client.flags import server_config
from adaptclip.client.targets import SERVICE, channel_target
from adaptclip.compression.models import DEFAULT_TEMPLATES
from adaptclip.server.app import SERVICE_NAME
from adaptclip.server.cache import Cache, RedisBackend
from adaptclip.server.config import ServerConfig
from adaptclip.server.labelstore import Durable, LabelSetDef, RedisStore, label_set_id
from conftest import LABELS, make_image, start_server
from redis_server import RedisServer

FAST = {"cache__timeout_ms": 100.0, "cache__retry_after_s": 0.2}


@pytest.fixture()
def redis_server(tmp_path):
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.kill()


def _answer(resp) -> list[tuple[str, float]]:
    return [(s.label, round(s.logit, 4)) for s in resp.top]


def _until(check, timeout_s: float = 15.0):
    """Poll `check` (returning a truthy value, or raising grpc.RpcError) until it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if got := check():
                return got
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def _refused(client: Client, ls_id: str, code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND) -> str:
    with pytest.raises(grpc.RpcError) as err:
        client.classify(make_image(1), label_set_id=ls_id)
    assert err.value.code() == code
    return err.value.details()


def test_state_dir_keeps_registered_sets_across_a_restart(tiny_spec, tmp_path):
    state = tmp_path / "state"
    srv = start_server(tiny_spec, state_dir=str(state), cache__enabled=False)
    try:
        with Client(srv.target) as c:
            ref = c.register_label_set(LABELS)
            before = _answer(c.classify(make_image(4), label_set_id=ref.label_set_id))
    finally:
        srv.stop()
    assert [p.name for p in state.iterdir()] == [f"{ref.label_set_id}.json"], "one file per set, no temp file left"
    assert json.loads((state / f"{ref.label_set_id}.json").read_text())["labels"] == LABELS
    srv = start_server(tiny_spec, state_dir=str(state), cache__enabled=False)
    try:
        with Client(srv.target) as c:
            assert _answer(c.classify(make_image(4), label_set_id=ref.label_set_id)) == before
    finally:
        srv.stop()


def test_tampered_entries_and_foreign_ids_are_not_found(tiny_spec, tmp_path, redis_server):
    claimed = label_set_id(("x", "y"), DEFAULT_TEMPLATES)
    other = json.dumps({"labels": ["evil", "labels"], "templates": list(DEFAULT_TEMPLATES)})
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / f"{claimed}.json").write_text(other)
    (tmp_path / "secret.json").write_text(other)
    redis_server.client().set(RedisStore.key(claimed), other)
    for where in ({"state_dir": str(tmp_path / "state")}, {"cache__redis_url": redis_server.url}):
        srv = start_server(tiny_spec, **where)
        try:
            with Client(srv.target) as c:
                for ls_id in (claimed, "../secret", "ls_" + "0" * 32):
                    assert "unknown label set" in _refused(c, ls_id)
        finally:
            srv.stop()


def test_memory_default_reads_back_a_set_the_lru_evicted(tiny_spec):
    srv = start_server(tiny_spec, label_set_cache_size=1, cache__enabled=False)
    try:
        with Client(srv.target) as c:
            first, second = c.register_label_set(["cat", "dog"]), c.register_label_set(["car", "boat"])
            assert list(srv.app.service.labels._sets) == [second.label_set_id]  # the first was evicted
            resp = c.classify(make_image(5), label_set_id=first.label_set_id)
            assert sorted(s.label for s in resp.top) == ["cat", "dog"]
    finally:
        srv.stop()


def test_redis_outage_registered_set_works_here_and_is_written_when_redis_returns(tiny_spec, redis_server):
    a = start_server(dataclasses.replace(tiny_spec, name="a"), cache__redis_url=redis_server.url, **FAST)
    b = start_server(dataclasses.replace(tiny_spec, name="b"), cache__redis_url=redis_server.url, **FAST)
    try:
        redis_server.kill()
        with Client(a.target) as ca, Client(b.target) as cb:
            start = time.monotonic()
            ref = ca.register_label_set(["owl", "hawk", "crow"])
            assert ca.classify(make_image(6), label_set_id=ref.label_set_id).model == "a"
            assert time.monotonic() - start < 5, "a dead Redis must not hold requests"
            details = _refused(cb, ref.label_set_id, grpc.StatusCode.UNAVAILABLE)
            assert "label-set store (redis) is unreachable" in details and ref.label_set_id in details
            assert ref.label_set_id in a.app.service.labels.durable.pending
            with Client(f"{a.target},{b.target}") as both:  # b's UNAVAILABLE is retried, on a
                assert {both.classify(make_image(i), label_set_id=ref.label_set_id).model for i in range(6)} == {"a"}
            redis_server.start()
            _until(lambda: redis_server.client().exists(RedisStore.key(ref.label_set_id)))
            assert _until(lambda: cb.classify(make_image(6), label_set_id=ref.label_set_id)).model == "b"
        assert a.app.service.labels.durable.pending == {}
    finally:
        a.stop()
        b.stop()


def test_slow_redis_holds_a_lookup_no_longer_than_the_call_bound(tiny_spec, redis_server):
    srv = start_server(tiny_spec, cache__redis_url=redis_server.url, **FAST)
    try:
        with Client(srv.target, timeout_s=10) as c:
            slept = []
            blocker = threading.Thread(
                target=lambda: slept.append(redis.Redis(port=redis_server.port, socket_timeout=10)
                                            .execute_command("DEBUG", "SLEEP", "3")))
            blocker.start()
            time.sleep(0.1)
            start = time.monotonic()
            details = _refused(c, "ls_" + "1" * 32, grpc.StatusCode.UNAVAILABLE)  # after the client's 5 tries
            assert "unreachable (timeout)" in details or "unreachable (unavailable)" in details
            assert time.monotonic() - start < 2.0, "each try waits one 100 ms bound at most"
            blocker.join()
            assert slept, "Redis did not sleep: the test proved nothing"
    finally:
        srv.stop()


def test_label_sets_outlive_cache_memory_pressure(tmp_path):
    """volatile-lru evicts the cache's entries (all with a TTL), never a label set (none)."""
    redis = RedisServer(tmp_path, maxmemory="4mb").start()
    ls = LabelSetDef(label_set_id(("a", "b"), ("{}",)), ("a", "b"), ("{}",))

    async def run() -> LabelSetDef | None:
        store = Durable(RedisStore(redis.url, 2.0), 2.0, 0.2)
        cache = Cache(RedisBackend(redis.url, 3600, 2.0), timeout_s=2.0)
        assert await store.put(ls)
        for i in range(300):  # ~10 MB of entries into 4 MB
            await cache.put("features", f"adaptclip:test:{i}", {"x": np.zeros(8192, np.float32)}, {})
        got = await store.get(ls.id)
        await cache.close()
        await store.close()
        return got

    try:
        assert asyncio.run(run()) == ls
        assert redis.client().info("stats")["evicted_keys"] > 0, "no memory pressure: the test proved nothing"
    finally:
        redis.kill()


def test_classifier_built_on_one_replica_is_read_by_another(tiny_spec, redis_server):
    a = start_server(dataclasses.replace(tiny_spec, name="a"), cache__redis_url=redis_server.url)
    b = start_server(dataclasses.replace(tiny_spec, name="b"), cache__redis_url=redis_server.url)
    try:
        with Client(a.target) as ca, Client(b.target) as cb:
            ref = ca.register_label_set(LABELS)
            want = _answer(ca.classify(make_image(7), label_set_id=ref.label_set_id))
            assert _answer(cb.classify(make_image(8), label_set_id=ref.label_set_id)) != []
            assert _answer(cb.classify(make_image(7), label_set_id=ref.label_set_id)) == want
        stats = b.app.service.cache.stats
        assert stats.value("hits", "redis", "classifier") == 1 and stats.value("misses", "redis", "classifier") == 0
    finally:
        a.stop()
        b.stop()


def test_client_skips_a_replica_that_is_not_serving(tiny_spec):
    a = start_server(dataclasses.replace(tiny_spec, name="a"), cache__enabled=False)
    b = start_server(dataclasses.replace(tiny_spec, name="b"), cache__enabled=False)
    try:
        a.call(a.app.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING))
        with Client(f"{a.target},{b.target}") as c:
            assert {c.classify(make_image(i), labels=LABELS).model for i in range(8)} == {"b"}
            a.call(a.app.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING))
            _until(lambda: {c.classify(make_image(i), labels=LABELS).model for i in range(4)} == {"a", "b"})
    finally:
        a.stop()
        b.stop()


def test_targets():
    assert channel_target("127.0.0.1:1,localhost:2")[0] == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1, [::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    for kept in ("localhost:50051", "dns:///adaptclip:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"):
        assert channel_target(kept)[0] == kept
    options = dict(channel_target("localhost:1")[1])
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": SERVICE} and SERVICE == SERVICE_NAME
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": SERVICE}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert options["grpc.per_rpc_retry_buffer_size"] >= 20 * 1024 * 1024  # the largest image still retries
    for bad, why in (("a:1,b", "expected HOST:PORT"), ("nosuchhost.invalid:1,a:2", "cannot resolve"),
                     ("127.0.0.1:1,[::1]:2", "one family")):
        with pytest.raises(ValueError, match=why):
            channel_target(bad)


def test_config_rules(tmp_path, capsys):
    cfg = ServerConfig()
    cfg.cache.redis_url, cfg.cache.ttl_s = "redis://127.0.0.1:1/0", 0
    with pytest.raises(ValueError, match="ttl_s"):
        cfg.check()
    cfg.cache.enabled = False  # no cache entries in Redis: no TTL needed
    cfg.check()
    cfg.state_dir = str(tmp_path)
    with pytest.raises(ValueError, match="state_dir"):
        cfg.check()
    assert cli.main(["serve", "--redis-url", "redis://127.0.0.1:1/0", "--cache-ttl", "0"]) == 2
    err = capsys.readouterr().err
    assert "bad config" in err and "ttl_s" in err
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers())
    got = server_config(parser.parse_args(["serve", "--state-dir", str(tmp_path), "--label-set-cache-size", "3"]))
    assert (got.state_dir, got.label_set_cache_size) == (str(tmp_path), 3)


def test_classify_cli_takes_several_addresses(server, capsys, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(make_image(9))
    both = f"{server.target},localhost:{server.port}"
    assert cli.main(["classify", str(image), "--labels", "cat,dog", "--server", both, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"]
    assert cli.main(["classify", str(image), "--labels", "cat", "--server", f"{server.target},oops"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
