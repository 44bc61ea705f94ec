"""Every error status the API promises, each naming the field at fault."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, make_image, start_server


def _error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value


@pytest.mark.parametrize("kwargs,code,field", [
    (dict(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    (dict(image=b"\x89PNG\r\n\x1a\nnot really"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    (dict(image=b"GIF89a" + b"\x00" * 50), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model"),
    (dict(labels=None, label_set_id="ls_unknown"), grpc.StatusCode.NOT_FOUND, "label_set_id"),
    (dict(labels=None), grpc.StatusCode.INVALID_ARGUMENT, "label_set"),
    (dict(labels=[]), grpc.StatusCode.INVALID_ARGUMENT, "label_set"),
    (dict(labels=["a", "b", "a"]), grpc.StatusCode.INVALID_ARGUMENT, "label_set.labels[2]"),
    (dict(labels=["a", "  "]), grpc.StatusCode.INVALID_ARGUMENT, "label_set.labels[1]"),
    (dict(labels=[f"l{i}" for i in range(3000)]), grpc.StatusCode.INVALID_ARGUMENT, "label_set.labels"),
    (dict(templates=["no placeholder"]), grpc.StatusCode.INVALID_ARGUMENT, "label_set.templates[0]"),
    (dict(templates=["{} and {}"]), grpc.StatusCode.INVALID_ARGUMENT, "label_set.templates[0]"),
    (dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
])
def test_bad_requests(client, kwargs, code, field):
    args = dict(image=make_image(1), labels=LABELS) | kwargs
    image = args.pop("image")
    err = _error(client.classify, image, **args)
    assert err.code() == code
    assert err.details().startswith(field), err.details()


def test_image_over_byte_and_pixel_limits(tiny_spec):
    srv = start_server(tiny_spec, limits__max_image_bytes=5000, limits__max_image_pixels=64 * 64)
    try:
        with Client(srv.target) as c:
            big_bytes = make_image(1, (100, 100), "PNG")  # ~30 kB of noise
            err = _error(c.classify, big_bytes, labels=LABELS)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in err.details()
            assert err.details().startswith("image")
            many_pixels = make_image(2, (65, 65), "JPEG")
            assert len(many_pixels) < 5000
            err = _error(c.classify, many_pixels, labels=LABELS)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pixels" in err.details()
            assert c.classify(make_image(3, (64, 64), "JPEG"), labels=LABELS).top
    finally:
        srv.stop()


def test_embed_errors(client):
    err = _error(client.embed)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("images")
    err = _error(client.embed, images=[make_image(1), b"junk"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("images[1]")


def _slow_server(tiny_spec, delay_s: float, **overrides):
    """A server whose encoder sleeps, so requests pile up in its queue; counts the rows it encodes."""
    srv = start_server(tiny_spec, batching__max_batch_size=1, batching__max_queue_delay_ms=0, **overrides)
    hosted = next(iter(srv.app.service.models.values()))
    encode, encoded = hosted.batcher._encode, []

    def slow(images, with_patches, keep_rate):
        time.sleep(delay_s)
        encoded.append(images.shape[0])
        return encode(images, with_patches, keep_rate)

    hosted.batcher._encode = slow
    return srv, hosted.batcher, encoded


def test_queue_full_is_resource_exhausted(tiny_spec):
    srv, _, _ = _slow_server(tiny_spec, 0.3, batching__max_queue_size=2)
    try:
        with Client(srv.target) as c:
            ref = c.register_label_set(LABELS)

            def call(i):
                try:
                    c.classify(make_image(i), label_set_id=ref.label_set_id)
                    return "ok"
                except grpc.RpcError as exc:
                    assert "queue full" in exc.details()
                    return exc.code()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(call, range(8)))
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 3 and "ok" in codes
    finally:
        srv.stop()


def test_deadline_and_cancel_drop_queued_work(tiny_spec):
    srv, batcher, encoded = _slow_server(tiny_spec, 0.4)
    try:
        with Client(srv.target) as c:
            ref = c.register_label_set(LABELS)
            blocker = threading.Thread(target=c.classify, args=(make_image(0),), kwargs=dict(label_set_id=ref.label_set_id))
            blocker.start()
            time.sleep(0.1)
            req = classify_request(make_image(1), label_set_id=ref.label_set_id)
            err = _error(c.stub.Classify, req, timeout=0.15)
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            future = c.stub.Classify.future(classify_request(make_image(2), label_set_id=ref.label_set_id))
            time.sleep(0.1)
            future.cancel()
            blocker.join()
            time.sleep(0.6)
            assert sum(encoded) == 1, "expired and cancelled requests must never reach the encoder"
            assert batcher.dropped == 2
            assert c.classify(make_image(3), label_set_id=ref.label_set_id).top
    finally:
        srv.stop()


def test_unknown_adaptation_method_is_rejected(client):
    req = classify_request(make_image(1), labels=LABELS)
    req.adaptation.method = 42
    err = _error(client.stub.Classify, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("adaptation.method")
    assert pb.Adaptation.NONE
