"""Two `adaptclip serve` processes on one redis-server, as a load balancer runs them: label sets registered on
one replica resolve on the other, survive a restart and the memory LRU, and a replica SIGKILLed during 200
requests from a client given both addresses costs no failed request."""
from __future__ import annotations

import pytest

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.server.labelstore import RedisStore
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, TINY_CONFIG, make_image
from redis_server import RedisServer
from replicas import Replica, drive

A = pb.Adaptation
SETS = [["cat", "dog"], ["car", "boat", "plane"], ["tree", "house"], ["bird", "fish", "frog", "horse"]]


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    """Redis plus replicas `a` and `b` (label-set LRU of 2, so a few registrations evict)."""
    work = tmp_path_factory.mktemp("replicas")
    redis = RedisServer(work).start()
    args = ["--model", str(TINY_CONFIG), "--pretrained", str(tiny_checkpoint), "--device", "cpu",
            "--redis-url", redis.url, "--label-set-cache-size", "2"]
    replicas = {name: Replica(name, args, work).start() for name in ("a", "b")}
    try:
        for r in replicas.values():
            r.wait_ready()
        yield redis, replicas
    finally:
        for r in replicas.values():
            r.kill()
        redis.kill()


def _answer(resp: pb.ClassifyResponse) -> list[tuple[str, float]]:
    return [(s.label, round(s.logit, 4)) for s in resp.top]


def test_registered_on_a_classifies_by_id_on_b(cluster):
    redis, r = cluster
    with Client(r["a"].target) as a, Client(r["b"].target) as b:
        ref = a.register_label_set(LABELS)
        on_a = a.classify(make_image(1), label_set_id=ref.label_set_id, top_k=8)
        on_b = b.classify(make_image(1), label_set_id=ref.label_set_id, top_k=8)
    assert (on_a.model, on_b.model) == ("a", "b") and on_b.label_set_id == ref.label_set_id
    assert _answer(on_b) == _answer(on_a)
    assert redis.client().ttl(RedisStore.key(ref.label_set_id)) == -1, "a label set must carry no TTL"


def test_restarted_replica_still_resolves_the_id(cluster):
    _, r = cluster
    with Client(r["a"].target) as a:
        ref = a.register_label_set(SETS[0])
        before = _answer(a.classify(make_image(2), label_set_id=ref.label_set_id))
    r["a"].stop()
    r["a"].start().wait_ready()
    with Client(r["a"].target) as a:
        assert _answer(a.classify(make_image(2), label_set_id=ref.label_set_id)) == before


def test_set_evicted_from_the_memory_lru_is_read_back(cluster):
    _, r = cluster
    with Client(r["b"].target) as b:
        refs = [b.register_label_set(labels) for labels in SETS]  # LRU of 2: the first two are evicted
        for ref, labels in zip(refs, SETS):
            resp = b.classify(make_image(3), label_set_id=ref.label_set_id, top_k=len(labels))
            assert sorted(s.label for s in resp.top) == sorted(labels)


def test_sigkill_during_200_requests_fails_none(cluster):
    """Every request is seeded (idempotent) and bigger than gRPC's default 256 KiB retry buffer."""
    _, r = cluster
    with Client(r["a"].target) as a:
        ref = a.register_label_set(LABELS)
    images = [make_image(i, (400, 400)) for i in range(10)]
    assert len(images[0]) > 256 * 1024
    requests = [classify_request(images[i % 10], label_set_id=ref.label_set_id,
                                 adaptation=A(method=A.ZERO, views=4, seed=i)) for i in range(200)]
    calls, killed_at = drive(f"{r['a'].target},{r['b'].target}", requests, concurrency=8, kill_at=60,
                             kill=r["b"].kill)
    assert [c.error for c in calls if c.error] == []
    assert {c.model for c in calls if c.end < killed_at} == {"a", "b"}, "both replicas served before the kill"
    assert {c.model for c in calls if c.start > killed_at + 0.01} == {"a"}
    assert len(calls) == 200  # b stays dead: this is the module's last test
