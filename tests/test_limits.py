"""Compute limits: per-request caps on views and steps, the bound on views in flight (RESOURCE_EXHAUSTED with a
retry hint, never a queue), and deadlines honoured inside the adaptation loop and between TPT steps."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc
import pytest
import torch
import torch.nn.functional as F

from adaptclip.adapt.loop import adapt_image
from adaptclip.adapt.methods import MethodResult
from adaptclip.adapt.peers import tpt_logits
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.server.config import Limits, ServerConfig
from adaptclip.server.errors import status_for
from adaptclip.server.limits import ViewBudget, check_limits
from adaptclip.server.service import ClassifierService
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, make_image, start_server


def _gs(views: int, steps: int = 1) -> pb.Adaptation:
    return pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=views, steps=steps, seed=1)


@pytest.fixture(scope="module")
def capped(tiny_spec):
    srv = start_server(tiny_spec, cache__enabled=False, limits__max_views=8, limits__max_steps=2,
                       limits__max_views_in_flight=8)
    yield srv
    srv.stop()


def test_views_and_steps_over_the_server_caps_are_refused_naming_the_field(capped):
    with Client(capped.target, timeout_s=30) as c:
        info = c.model_info().limits
        assert (info.max_views, info.max_steps, info.max_views_in_flight) == (8, 2, 8)
        for adaptation, field, limit in ((_gs(9), "adaptation.views", "limit of 8"),
                                         (_gs(8, steps=3), "adaptation.steps", "limit of 2")):
            with pytest.raises(grpc.RpcError) as err:
                c.classify(make_image(1), labels=LABELS, adaptation=adaptation)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(field) and limit in err.value.details()
        assert c.classify(make_image(1), labels=LABELS, adaptation=_gs(8, steps=2)).adaptation.views_encoded == 8
        # views do not matter without adaptation, nor steps to ZERO
        none = pb.Adaptation(method=pb.Adaptation.NONE, views=1000)
        assert c.classify(make_image(1), labels=LABELS, adaptation=none).top
        zero = pb.Adaptation(method=pb.Adaptation.ZERO, views=8, steps=50)
        assert c.classify(make_image(1), labels=LABELS, adaptation=zero).top
        items = list(c.classify_stream([classify_request(make_image(2), labels=LABELS, adaptation=_gs(9),
                                                         request_id="big"),
                                        classify_request(make_image(2), labels=LABELS, request_id="ok")]))
        assert items[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not items[1].HasField("error")


def test_views_in_flight_past_the_bound_get_resource_exhausted_with_a_retry_hint(capped):
    hosted = next(iter(capped.app.service.models.values()))
    encode = hosted.batcher._encode

    def slow(images, with_patches, keep_rate):
        time.sleep(0.3)
        return encode(images, with_patches, keep_rate)

    hosted.batcher._encode = slow
    try:
        with Client(capped.target, timeout_s=30) as c:
            ref = c.register_label_set(LABELS)

            def call(i: int):
                started = time.monotonic()
                try:
                    c.classify(make_image(10 + i), label_set_id=ref.label_set_id, adaptation=_gs(6))
                    return "ok", None, time.monotonic() - started
                except grpc.RpcError as exc:
                    return exc.code(), exc, time.monotonic() - started

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(call, range(4)))
    finally:
        hosted.batcher._encode = encode
    refused = [(exc, took) for code, exc, took in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert [r[0] for r in results].count("ok") >= 1 and refused, results
    assert {r[0] for r in results} <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
    for exc, took in refused:
        retry = dict(exc.trailing_metadata())["retry-after-ms"]
        assert int(retry) > 0 and f"retry after {retry} ms" in exc.details()
        assert exc.details().startswith("adaptation.views") and "limit 8" in exc.details()
        assert took < 0.3, "refused at once, not queued behind the encoder"
    assert capped.app.service.budget.in_flight == 0


def test_retry_hint_follows_the_rate_views_finish_at():
    budget = ViewBudget(10)
    assert budget.retry_after_ms(4) == 1000  # nothing finished yet
    for _ in range(10):
        with budget.hold(5):
            pass
    with budget.hold(8):  # 50 views finished in the window: 5/s; 2 views too many -> 400 ms
        assert budget.retry_after_ms(4) == 400
        with pytest.raises(Exception, match="retry after 400 ms"):
            with budget.hold(4):
                pass
    assert budget.in_flight == 0


def test_limits_that_could_never_serve_a_request_are_config_errors(tiny_spec, hosted):
    with pytest.raises(ValueError, match="max_views_in_flight"):
        check_limits(Limits(max_views=64, max_views_in_flight=32))
    from adaptclip.server.hosting import Hosted

    svc = ClassifierService(ServerConfig(models=[tiny_spec], limits=Limits(max_views=32)))
    before, hosted.adapt_defaults = hosted.adapt_defaults, AdaptSettings(method="gs_bias", views=64)
    try:
        with pytest.raises(ValueError, match="adaptation defaults.*adaptation.views"):
            svc.set_models([Hosted(hosted)])
    finally:
        hosted.adapt_defaults = before


class _Views:
    """A view source whose second chunk takes `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.feats = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
        self.delay_s, self.asked = delay_s, []

    async def original(self, with_patches: bool):
        return self.feats[0], None

    async def first(self, n: int):
        self.asked.append(n)
        if len(self.asked) == 2:
            await asyncio.sleep(self.delay_s)
        return self.feats[:n]


def test_deadline_stops_the_loop_between_chunks_and_before_the_method():
    classifier = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    s = AdaptSettings(method="zero", views=16, view_chunk=3)
    ran = []

    async def method(settings, feats, patches):
        ran.append(feats.shape[0])
        return MethodResult(feats[0] @ classifier.T, torch.ones(4) / 4, 0, False)

    views = _Views(0.55)
    with pytest.raises(TimeoutError, match="deadline passed after 7 of 16 views"):
        asyncio.run(adapt_image(views, s, classifier, 10.0, None, method, deadline=time.monotonic() + 0.5))
    assert views.asked == [4, 7] and not ran
    views = _Views(0.0)
    asyncio.run(adapt_image(views, s, classifier, 10.0, None, method, deadline=time.monotonic() + 60))
    assert ran == [16]
    code, message = status_for(TimeoutError("deadline passed after 7 of 16 views"), "Classify")
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and message.startswith("adaptation: deadline passed")


def test_tpt_checks_the_deadline_between_steps(hosted):
    text = hosted.text.prompt_side(LABELS)
    feats = F.normalize(torch.randn(4, hosted.embed_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    with pytest.raises(TimeoutError, match="after 0 of 3 TPT steps"):
        tpt_logits(text.model, text.tokenizer, LABELS, feats, logit_scale=10.0, steps=3, deadline=time.monotonic())
    assert tpt_logits(text.model, text.tokenizer, LABELS, feats, logit_scale=10.0, steps=1,
                      deadline=time.monotonic() + 60).shape == (len(LABELS),)
