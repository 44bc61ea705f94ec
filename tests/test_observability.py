"""Prometheus /metrics, the one log line per request, and the request id that ties them to the client."""
from __future__ import annotations

import json
import logging
import re
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.server.logs import JsonFormatter
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, make_image, start_server


@pytest.fixture(scope="module")
def observed(tiny_spec):
    srv = start_server(tiny_spec, metrics_port=0, metrics_host="127.0.0.1")
    yield srv
    srv.stop()


def _scrape(srv) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.app.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_exports_requests_stages_batches_cache_and_models(observed):
    with Client(observed.target, timeout_s=30) as c:
        ref = c.register_label_set(LABELS)
        gs = pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=5, seed=3)
        for _ in range(2):  # the second is a result-cache hit
            c.classify(make_image(50), label_set_id=ref.label_set_id, adaptation=gs)
        skip = pb.Adaptation(method=pb.Adaptation.ZERO, views=5, skip_entropy=1.0)
        assert c.classify(make_image(51), label_set_id=ref.label_set_id, adaptation=skip).adaptation.skipped
        with pytest.raises(grpc.RpcError):
            c.classify(b"junk", label_set_id=ref.label_set_id)
    m = _scrape(observed)
    assert _sample(m, "adaptclip_requests_total", rpc="Classify", code="OK") == 3
    assert _sample(m, "adaptclip_requests_total", rpc="Classify", code="INVALID_ARGUMENT") == 1
    assert _sample(m, "adaptclip_requests_total", rpc="RegisterLabelSet", code="OK") == 1
    assert _sample(m, "adaptclip_request_duration_seconds_count", rpc="Classify") == 4
    for stage in ("decode", "queue", "encode", "adapt"):
        assert _sample(m, "adaptclip_stage_seconds_count", stage=stage) == 2, stage  # computed images only
    assert _sample(m, "adaptclip_stage_seconds_count", stage="total") == 3
    assert _sample(m, "adaptclip_views_encoded_total", model="tiny-vit") == 1 + 4 + 1
    assert _sample(m, "adaptclip_encoder_batch_size_count", model="tiny-vit") >= 2
    assert _sample(m, "adaptclip_encoder_batch_size_sum", model="tiny-vit") == 6
    assert _sample(m, "adaptclip_adaptation_skipped_total", method="zero") == 1
    assert _sample(m, "adaptclip_cache_hits_total", backend="memory", level="result") == 1
    assert _sample(m, "adaptclip_cache_misses_total", backend="memory", level="result") == 3  # junk looked up too
    assert ("adaptclip_queue_depth", (("model", "tiny-vit"),)) in m
    assert _sample(m, "adaptclip_views_in_flight") == 0 and _sample(m, "adaptclip_models_loaded") == 1
    assert _sample(m, "process_resident_memory_bytes") > 0
    assert _sample(m, "adaptclip_auth_tokens") == 0


def test_one_log_line_per_request_with_its_id_in_the_trailers(observed, caplog):
    with Client(observed.target, timeout_s=30) as c, caplog.at_level(logging.INFO, logger="adaptclip.requests"):
        _, call = c.stub.Classify.with_call(classify_request(make_image(60), labels=LABELS, request_id="job-7/img:1"))
        assert dict(call.trailing_metadata())["x-request-id"] == "job-7/img:1"
        _, call = c.stub.Classify.with_call(classify_request(make_image(60), labels=LABELS, request_id="has space"))
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", generated)
        with pytest.raises(grpc.RpcError) as err:
            c.classify(b"", labels=LABELS, request_id="bad-1")
        assert dict(err.value.trailing_metadata())["x-request-id"] == "bad-1"
        list(c.classify_stream([classify_request(make_image(61), labels=LABELS)]))
    lines = [r for r in caplog.records if r.name == "adaptclip.requests"]
    assert [(r.fields["rpc"], r.fields["status"], r.fields["request_id"]) for r in lines][:3] == [
        ("Classify", "OK", "job-7/img:1"), ("Classify", "OK", generated), ("Classify", "INVALID_ARGUMENT", "bad-1")]
    assert lines[3].fields["rpc"] == "ClassifyStream" and len(lines) == 4
    assert all(r.fields["ms"] > 0 and r.fields["peer"] for r in lines)
    assert "request_id=job-7/img:1 rpc=Classify status=OK ms=" in lines[0].getMessage()


def test_internal_errors_name_the_request_id_that_is_in_the_log(observed, caplog):
    labels = observed.app.service.labels
    original = labels.classifier

    async def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    labels.classifier = broken
    try:
        with Client(observed.target, timeout_s=30) as c, caplog.at_level(logging.ERROR):
            with pytest.raises(grpc.RpcError) as err:
                c.classify(make_image(70), labels=["zebra", "yak"], request_id="trace-42")
            item = next(iter(c.classify_stream([classify_request(make_image(70), labels=["zebra", "gnu"])])))
    finally:
        labels.classifier = original
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "request id trace-42" in err.value.details() and "simulated bug" not in err.value.details()
    assert any("request id trace-42" in r.getMessage() and r.exc_info for r in caplog.records)
    stream_id = re.search(r"request id ([0-9a-f]{16})", item.error.message).group(1)
    assert item.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert any(f"request id {stream_id}" in r.getMessage() for r in caplog.records)


def test_json_log_lines():
    record = logging.LogRecord("adaptclip.requests", logging.INFO, __file__, 1, "request_id=%s", ("a",), None)
    record.fields = {"request_id": "a", "rpc": "Classify", "status": "OK", "ms": 1.5}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "request_id=a" and line["rpc"] == "Classify" and line["level"] == "INFO"
    assert line["time"].endswith("+00:00")
