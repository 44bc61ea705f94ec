"""Test-time adaptation through gRPC: results, determinism, the confidence gate, validation."""
from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.compression.models import ModelSpec
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, make_image, start_server

A = pb.Adaptation


def _classify(client, adaptation: pb.Adaptation, seed_img: int = 5, **kwargs) -> pb.ClassifyResponse:
    req = classify_request(make_image(seed_img, (64, 48)), labels=LABELS, adaptation=adaptation, top_k=len(LABELS), **kwargs)
    return client.stub.Classify(req, timeout=60)


def _logits(scores) -> dict[str, float]:
    return {s.label: s.logit for s in scores}


@pytest.mark.parametrize("method", [A.GS_BIAS, A.ZERO, A.TPT])
def test_adapted_and_zero_shot_results(client, method):
    plain = _classify(client, A(method=A.NONE))
    resp = _classify(client, A(method=method, views=8, seed=1))
    assert not plain.zero_shot_top and plain.adaptation.views_encoded == 1
    assert _logits(resp.zero_shot_top) == pytest.approx(_logits(plain.top), abs=1e-4)
    assert resp.adaptation.method == method and resp.adaptation.views_encoded == 8
    assert len(resp.top) == len(LABELS) and resp.timings.adapt_us > 0
    assert sum(s.probability for s in resp.top) == pytest.approx(1.0, abs=1e-4)
    if method != A.ZERO:
        assert _logits(resp.top) != pytest.approx(_logits(resp.zero_shot_top), abs=1e-6)


def test_gs_bias_uses_spatial_features(client):
    resp = _classify(client, A(method=A.GS_BIAS, views=8, seed=2))
    assert resp.adaptation.steps_run == 1 and not resp.adaptation.global_only


def test_same_seed_same_answer_other_seed_other_views(client):
    a = _classify(client, A(method=A.GS_BIAS, views=8, seed=7))
    b = _classify(client, A(method=A.GS_BIAS, views=8, seed=7))
    c = _classify(client, A(method=A.GS_BIAS, views=8, seed=8))
    assert _logits(a.top) == _logits(b.top)
    assert _logits(a.top) != _logits(c.top)


def test_confidence_gate_skips_views(client):
    resp = _classify(client, A(method=A.GS_BIAS, views=16, skip_entropy=1.0))
    assert resp.adaptation.skipped and resp.adaptation.views_encoded == 1
    assert _logits(resp.top) == pytest.approx(_logits(resp.zero_shot_top))
    resp = _classify(client, A(method=A.GS_BIAS, views=16, skip_entropy=0.0))
    assert not resp.adaptation.skipped and resp.adaptation.views_encoded == 16


def test_view_chunks_stop_early_when_selected_views_agree(client):
    encoded = [_classify(client, A(method=A.ZERO, views=64, view_chunk=8, selection_ratio=0.1, seed=s), seed_img=s)
               .adaptation.views_encoded for s in range(6)]
    assert all(25 <= n <= 64 for n in encoded), "10% of fewer than 20 views is one view: no agreement test"
    assert min(encoded) < 64, "with 10% of a handful of views selected, some image should stop early"


@pytest.mark.parametrize("field,value", [
    ("views", 0), ("views", 5000), ("selection_ratio", 0.0), ("selection_ratio", 1.5),
    ("selection_ratio", float("nan")), ("steps", -1), ("steps", 1000), ("alpha", -1.0), ("alpha", float("inf")),
    ("beta", float("nan")), ("spatial_top_k", 0), ("crop_scale_min", 0.0), ("crop_scale_min", float("nan")),
    ("crop_scale_max", 1.5), ("skip_entropy", 2.0), ("skip_entropy", float("nan")), ("view_chunk", -3),
])
def test_invalid_adaptation_fields(client, field, value):
    adaptation = A(method=A.GS_BIAS)
    setattr(adaptation, field, value)
    with pytest.raises(grpc.RpcError) as err:
        _classify(client, adaptation)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"adaptation.{field}"), err.value.details()


def test_crop_min_above_max_names_max(client):
    with pytest.raises(grpc.RpcError) as err:
        _classify(client, A(method=A.GS_BIAS, crop_scale_min=0.9, crop_scale_max=0.5))
    assert err.value.details().startswith("adaptation.crop_scale_max")


def test_model_defaults_from_config_and_in_model_info(tiny_checkpoint):
    from conftest import TINY_CONFIG

    spec = ModelSpec(model=str(TINY_CONFIG), pretrained=str(tiny_checkpoint), device="cpu",
                     adaptation={"views": 6, "crop_scale": [0.5, 1.0], "augmix": False, "method": "gs_bias"})
    srv = start_server(spec)
    try:
        with Client(srv.target) as c:
            info = c.model_info().models[0].adaptation
            assert (info.views, info.crop_scale_min, info.augmix) == (6, 0.5, False)
            resp = c.classify(make_image(3), labels=LABELS)  # method unset: the model's default, GS-Bias
            assert resp.adaptation.method == A.GS_BIAS and resp.adaptation.views_encoded == 6
            resp = c.classify(make_image(3), labels=LABELS, adaptation=A(method=A.NONE))
            assert resp.adaptation.views_encoded == 1 and not resp.zero_shot_top
    finally:
        srv.stop()


def test_concurrent_adapted_requests_share_batches(server, client):
    batcher = server.app.service.models[server.app.service.default_model].batcher
    before = batcher.batches

    def call(i):
        with Client(server.target) as c:
            return _classify(c, A(method=A.GS_BIAS, views=4, seed=i), seed_img=i).adaptation.views_encoded

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(8))) == [4] * 8
    # Each request needs two encoder submissions (original view, then views); alone that is 16 batches.
    assert batcher.batches - before < 16


def test_safety_gate_falls_back_after_the_views(client):
    open_gate = _classify(client, A(method=A.ZERO, views=8, seed=3, gate_agreement=0.0, gate_entropy_rise=1.0))
    assert not open_gate.adaptation.fell_back
    shut = _classify(client, A(method=A.ZERO, views=8, seed=3, gate_agreement=1.0, gate_entropy_rise=0.0))
    assert shut.adaptation.fell_back and shut.adaptation.views_encoded == 8 and not shut.adaptation.skipped
    assert "safety gate" in shut.adaptation.note
    assert _logits(shut.top) == pytest.approx(_logits(shut.zero_shot_top))  # the zero-shot answer, not a cached one
    alike = _classify(client, A(method=A.ZERO, views=8, seed=3, gate_similarity=0.0))  # any views are "too alike"
    assert alike.adaptation.fell_back and "alike" in alike.adaptation.note


@pytest.mark.parametrize("field,value", [("gate_entropy_rise", 2.0), ("gate_agreement", -1.0), ("gate_top_k", -2),
                                         ("gate_similarity", 1.5)])
def test_gate_settings_checked_with_the_field_named(client, field, value):
    with pytest.raises(grpc.RpcError) as exc:
        _classify(client, A(method=A.GS_BIAS, views=8, **{field: value}))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"adaptation.{field}" in exc.value.details()
