"""Every Classifier RPC fed a few thousand seeded random, truncated and bit-flipped messages as raw bytes:
nothing comes back UNKNOWN or INTERNAL, bytes that do not parse get INVALID_ARGUMENT saying so, a good
request gets the same answer afterwards, and the process's resident memory stays bounded."""
from __future__ import annotations

import concurrent.futures
import os
import random

import grpc
import pytest

from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, make_image, start_server

SERVICE = "/adaptclip.v1.Classifier/"
PER_RPC = 700  # mutations per RPC (the stream gets as many items)
WARM_UP = 150  # of them, sent before the memory baseline is taken
MAX_GROWTH_MB = 96
TEMPLATES = ["a photo of a {}."]
REQUEST_TYPES = {"Classify": pb.ClassifyRequest, "ClassifyStream": pb.ClassifyRequest,
                 "RegisterLabelSet": pb.LabelSet, "Embed": pb.EmbedRequest, "GetModelInfo": pb.GetModelInfoRequest}
ANSWERED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION}


def _good() -> dict[str, bytes]:
    image = make_image(7, (40, 40))
    classify = pb.ClassifyRequest(image=image, label_set=pb.LabelSet(labels=LABELS, templates=TEMPLATES), top_k=3,
                                  request_id="good", adaptation=pb.Adaptation(method=pb.Adaptation.NONE))
    return {"Classify": classify.SerializeToString(), "ClassifyStream": classify.SerializeToString(),
            "RegisterLabelSet": pb.LabelSet(labels=LABELS[:3], templates=TEMPLATES).SerializeToString(),
            "Embed": pb.EmbedRequest(images=[image], texts=["a cat"], normalize=True).SerializeToString(),
            "GetModelInfo": b""}


def mutations(good: bytes, n: int, seed: int) -> list[bytes]:
    """n messages: random bytes, truncations of `good`, and `good` with 1-8 bits flipped, in turn."""
    rng, out = random.Random(seed), []
    for i in range(n):
        kind = i % 3 if good else 0
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 200)))
        elif kind == 1:
            out.append(good[:rng.randrange(len(good))])
        else:
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            out.append(bytes(data))
    return out


def _parses(message_type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
        return True
    except Exception:  # noqa: BLE001
        return False


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def fuzzed(tiny_spec):
    srv = start_server(tiny_spec, cache__enabled=False, limits__max_views=8, label_set_cache_size=64)
    yield srv
    srv.stop()


def _unary(channel: grpc.Channel, rpc: str, data: bytes) -> tuple[grpc.StatusCode, str, bytes | None]:
    try:
        return grpc.StatusCode.OK, "", channel.unary_unary(SERVICE + rpc)(data, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None


def _top(data: bytes) -> list[tuple[str, float, float]]:
    return [(s.label, s.probability, s.logit) for s in pb.ClassifyResponse.FromString(data).top]


def _check(rpc: str, data: bytes, code: grpc.StatusCode, details: str) -> None:
    assert code in ANSWERED, (rpc, data[:40], code, details)
    if not _parses(REQUEST_TYPES[rpc], data):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, code, details)
        assert details.startswith(f"request: could not be parsed as adaptclip.v1.{REQUEST_TYPES[rpc].__name__}")


def _stream(channel: grpc.Channel, items: list[bytes]) -> None:
    answers = [pb.ClassifyResponse.FromString(r) for r in channel.stream_stream(SERVICE + "ClassifyStream")(
        iter(items), timeout=300)]
    assert len(answers) == len(items)
    for data, answer in zip(items, answers):
        code = grpc.StatusCode.OK
        if answer.HasField("error"):
            code = next(c for c in grpc.StatusCode if c.value[0] == answer.error.code)
        _check("ClassifyStream", data, code, answer.error.message)


def test_fuzzed_messages_get_clear_statuses_and_change_nothing(fuzzed):
    good = _good()
    with grpc.insecure_channel(fuzzed.target) as channel, concurrent.futures.ThreadPoolExecutor(8) as pool:
        before = _unary(channel, "Classify", good["Classify"])
        assert before[0] == grpc.StatusCode.OK
        work = {rpc: mutations(data, PER_RPC, seed) for seed, (rpc, data) in enumerate(good.items())}
        baseline = None
        for part in (slice(0, WARM_UP), slice(WARM_UP, None)):
            for rpc, items in work.items():
                if rpc == "ClassifyStream":
                    _stream(channel, items[part])
                    continue
                results = pool.map(lambda d, rpc=rpc: (d, *_unary(channel, rpc, d)[:2]), items[part])
                for data, code, details in results:
                    _check(rpc, data, code, details)
            baseline = baseline or _rss_mb()
        growth = _rss_mb() - baseline
        after = _unary(channel, "Classify", good["Classify"])
    assert _top(after[2]) == _top(before[2]), "a good request must get the same answer after the fuzzing"
    assert growth < MAX_GROWTH_MB, f"resident memory grew {growth:.0f} MB over {len(work) * (PER_RPC - WARM_UP)} messages"
    counts = {c: fuzzed.app.metrics.value("adaptclip_requests_total", rpc="Classify", code=c)
              for c in ("OK", "INVALID_ARGUMENT", "UNKNOWN", "INTERNAL")}
    assert counts["UNKNOWN"] == counts["INTERNAL"] == 0 and counts["INVALID_ARGUMENT"] > PER_RPC / 2, counts
