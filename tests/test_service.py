"""Service behaviour: batching, streams, label sets, model info, health and reflection."""
from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.server.app import App
from adaptclip.server.config import ServerConfig
from adaptclip.compression.models import load_model
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, ServerThread, make_image


def _top(resp):
    return [s.label for s in resp.top], [s.logit for s in resp.top]


def assert_same(a, b):
    n = min(len(a[0]), len(b[0]))
    assert a[0][:n] == b[0][:n]
    assert a[1][:n] == pytest.approx(b[1][:n], abs=1e-4)


def test_concurrent_clients_share_batches(server, client):
    ref = client.register_label_set(LABELS)
    images = [make_image(100 + i) for i in range(24)]
    batcher = server.app.service.models[server.app.service.default_model].batcher
    batches_before = batcher.batches

    def call(i: int):
        with Client(server.target) as c:
            return _top(c.classify(images[i], label_set_id=ref.label_set_id))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, range(len(images))))
    assert batcher.batches - batches_before < len(images), "concurrent requests should have shared encoder batches"
    with Client(server.target) as c:  # the same images one at a time answer the same
        for img, g in zip(images, got):
            assert_same(g, _top(c.classify(img, label_set_id=ref.label_set_id)))


def test_stream_answers_in_order_with_request_ids(client):
    ref = client.register_label_set(LABELS)
    images = [make_image(200 + i, (30 + i, 40)) for i in range(30)]
    reqs = [classify_request(img, label_set_id=ref.label_set_id, request_id=f"req-{i}") for i, img in enumerate(images)]
    reqs[7] = classify_request(b"not an image", label_set_id=ref.label_set_id, request_id="req-7")
    responses = list(client.classify_stream(reqs, timeout_s=60))
    assert [r.request_id for r in responses] == [f"req-{i}" for i in range(30)]
    assert responses[7].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image" in responses[7].error.message
    for i in (0, 13, 29):
        assert not responses[i].HasField("error")
        assert_same(_top(responses[i]), _top(client.classify(images[i], label_set_id=ref.label_set_id)))


def test_label_set_id_is_a_stable_content_hash(client):
    a = client.register_label_set(["x", "y"], ["a {}."])
    b = client.register_label_set(["x", "y"], ["a {}."])
    c = client.register_label_set(["y", "x"], ["a {}."])
    assert a.label_set_id == b.label_set_id != c.label_set_id
    inline = client.classify(make_image(3), labels=["x", "y"], templates=["a {}."])
    assert inline.label_set_id == a.label_set_id
    assert inline.top[0].label in ("x", "y") and len(inline.top) == 2  # top_k clamped to the labels


def test_model_info(client):
    info = client.model_info()
    assert info.default_model == "tiny-vit"
    m = info.models[0]
    assert (m.name, m.embed_dim, m.image_size, m.is_default, m.random_init) == ("tiny-vit", 32, 32, True, False)
    assert m.pretrained == "tiny.pt" and len(m.fingerprint) == 32 and m.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert info.limits.max_labels > 0 and info.versions.open_clip and info.versions.torch


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "adaptclip.v1.Classifier"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "adaptclip.v1.Classifier" in db.get_services()
        assert "grpc.health.v1.Health" in db.get_services()
        methods = {m.name for m in db.FindFileContainingSymbol("adaptclip.v1.Classifier").service[0].method}
        assert {"Classify", "ClassifyStream", "RegisterLabelSet", "Embed", "GetModelInfo"} <= methods


def test_health_not_serving_until_loaded(tiny_spec):
    """Port open, model not loaded yet: health NOT_SERVING and Classify UNAVAILABLE; then SERVING."""
    model = load_model(tiny_spec)
    thread = ServerThread(ServerConfig(host="127.0.0.1", port=0, models=[tiny_spec]), [model])

    async def only_start():
        thread.app = App(thread.cfg)
        thread.port = await thread.app.start()

    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(only_start(), loop).result(30)
    try:
        with grpc.insecure_channel(thread.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            req = health_pb2.HealthCheckRequest(service="adaptclip.v1.Classifier")
            assert health.Check(req).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with Client(thread.target) as c, pytest.raises(grpc.RpcError) as err:
                c.classify(make_image(1), labels=LABELS)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            asyncio.run_coroutine_threadsafe(thread.app.load([model]), loop).result(30)
            assert health.Check(req).status == health_pb2.HealthCheckResponse.SERVING
            asyncio.run_coroutine_threadsafe(thread.app.stop(0), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)


def test_in_process_pipeline_answers_as_the_server(server, client, tiny_spec):
    """InProcess (batch jobs' --local mode) runs the same pipeline as gRPC, without a server."""
    import asyncio

    from adaptclip.server.app import InProcess

    img = make_image(300)
    expected = client.classify(img, labels=LABELS, adaptation=pb_adaptation(), top_k=4)

    async def run():
        async with InProcess(ServerConfig(models=[tiny_spec])) as svc:
            ref = await svc.register_label_set(pb.LabelSet(labels=LABELS))
            good = await svc.classify_or_error(classify_request(img, label_set_id=ref.label_set_id, top_k=4,
                                                                adaptation=pb_adaptation(), request_id="a"))
            bad = await svc.classify_or_error(classify_request(b"junk", label_set_id=ref.label_set_id, request_id="b"))
            return good, bad

    good, bad = asyncio.run(run())
    assert_same(_top(good), _top(expected)) and good.request_id == "a"
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and bad.error.message.startswith("image")


def pb_adaptation():
    return pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=6, seed=1)


def test_async_client(server):
    import asyncio

    from adaptclip.client import AsyncClient

    async def run():
        async with AsyncClient(server.target) as c:
            ref = await c.register_label_set(LABELS)
            one = await c.classify(make_image(400), label_set_id=ref.label_set_id, top_k=2)

            async def reqs():
                for i in range(3):
                    yield classify_request(make_image(401 + i), label_set_id=ref.label_set_id, request_id=str(i))

            streamed = [r.request_id async for r in c.classify_stream(reqs())]
            emb = await c.embed(texts=["x"])
            info = await c.model_info()
            return one, streamed, emb, info

    one, streamed, emb, info = asyncio.run(run())
    assert len(one.top) == 2 and streamed == ["0", "1", "2"] and len(emb.text_embeddings) == 1
    assert info.default_model == "tiny-vit"
