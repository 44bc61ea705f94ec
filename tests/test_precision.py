"""Every path in fp32, fp16 and bf16 through gRPC: methods, token compression, cache, Embed, a bundle, labelling.

One server per (device, precision), shared by the tests of this file; the fp32 server (asked for as
`auto`, which is fp32 on the CPU) is the reference the half-precision answers are compared with. On a CPU
torch runs both half types (slowly); the `cuda` variants run the same tests on a GPU, skipped without one.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from adaptclip.client import Client, cli, flags
from adaptclip.client.client import classify_request
from adaptclip.compression.bundled import load_bundle
from adaptclip.compression.models import (
    PRECISIONS,
    ModelLoadError,
    ModelSpec,
    TorchModel,
    resolve_precision,
)
from adaptclip.server.app import load_models
from adaptclip.server.config import ServerConfig
from adaptclip.v1 import classifier_pb2 as pb
from bundles import tiny_bundle
from conftest import LABELS, TINY_CONFIG, ServerThread, make_image

pytestmark = pytest.mark.usefixtures("one_thread")
A = pb.Adaptation
METHODS = (A.NONE, A.GS_BIAS, A.ZERO, A.TPT)
IMAGES = range(6)
BUNDLE_LABELS, BUNDLE_TEMPLATES = ("cat", "dog", "car", "tree", "boat"), ("a photo of a {}.",)
REFERENCE = ("cpu", "auto")
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PLACES = [pytest.param(REFERENCE, id="cpu-fp32"), pytest.param(("cpu", "fp16"), id="cpu-fp16"),
          pytest.param(("cpu", "bf16"), id="cpu-bf16")] + [
    pytest.param(("cuda", p), id=f"cuda-{p}", marks=[pytest.mark.cuda, _NO_CUDA]) for p in ("fp16", "bf16", "auto")]
# How far a half-precision logit may be from fp32's on the tiny model (its logits span a few units; measured
# at most 0.01 / 0.05 zero-shot in fp16 / bf16, 0.01 / 0.28 after GS-Bias, whose top-K patches and confident
# views can change with the rounding). ZERO's vote and TPT's step can flip on a near tie: top-1 agreement only.
LOGIT_TOL = {A.NONE: {"fp32": 1e-4, "fp16": 0.03, "bf16": 0.15}, A.GS_BIAS: {"fp32": 1e-4, "fp16": 0.1, "bf16": 0.6}}


def _adaptation(method: int) -> pb.Adaptation:
    return A(method=method, views=8, seed=3, skip_entropy=0.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, hosted: TorchModel) -> Path:
    """An INT8 bundle of the tiny model (its graph fp32 + INT8, whatever the torch model's precision)."""
    return tiny_bundle(hosted, tmp_path_factory.mktemp("precision") / "bundle",
                       {"things": (BUNDLE_LABELS, BUNDLE_TEMPLATES)}, iters=1)


@pytest.fixture(scope="module")
def servers(tiny_spec: ModelSpec, bundle: Path) -> Iterator[dict]:
    """Servers by (device, precision), started on first use: the tiny model (token compression available,
    result cache on) beside the bundle."""
    started: dict[tuple[str, str], ServerThread] = {}

    def get(place: tuple[str, str]) -> ServerThread:
        if place not in started:
            device, precision = place
            spec = ModelSpec(model=tiny_spec.model, pretrained=tiny_spec.pretrained, device=device, precision=precision)
            cfg = ServerConfig(host="127.0.0.1", port=0, models=[
                spec, ModelSpec(bundle=str(bundle), name="edge", device="cpu")])
            started[place] = ServerThread(cfg, load_models(cfg)).start()
        return started[place]

    yield get
    for srv in started.values():
        srv.stop()


@pytest.fixture(params=PLACES)
def place(request) -> tuple[str, str]:
    return request.param


@pytest.fixture()
def client(servers, place) -> Iterator[Client]:
    with Client(servers(place).target, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(servers) -> Iterator[Client]:
    with Client(servers(REFERENCE).target, timeout_s=60) as c:
        yield c


def _expected_precision(place: tuple[str, str]) -> str:
    return resolve_precision(place[1], torch.device(place[0]))


def _matrix(c: Client) -> dict[tuple[int, float, int], pb.ClassifyResponse]:
    """Every method at keep rates 1 and 0.5 on IMAGES (all through the result cache's miss path)."""
    out = {}
    for method in METHODS:
        for keep in (1.0, 0.5):
            for i in IMAGES:
                req = classify_request(make_image(100 + i), labels=LABELS, top_k=len(LABELS),
                                       adaptation=_adaptation(method))
                req.token_keep_rate = keep
                out[method, keep, i] = c.stub.Classify(req, timeout=60)
    return out


_REFERENCE_MATRIX: dict = {}


def _reference_matrix(reference: Client) -> dict:
    if not _REFERENCE_MATRIX:
        _REFERENCE_MATRIX.update(_matrix(reference))
    return _REFERENCE_MATRIX


def _scores(resp: pb.ClassifyResponse) -> dict[str, float]:
    return {s.label: s.logit for s in resp.top}


def _sane(resp: pb.ClassifyResponse) -> None:
    assert len(resp.top) == len(LABELS)
    values = [v for s in resp.top for v in (s.logit, s.probability)]
    assert all(math.isfinite(v) for v in values), resp
    assert sum(s.probability for s in resp.top) == pytest.approx(1.0, abs=1e-4)


def test_model_info_reports_the_resolved_precision(client, reference, place):
    info = {m.name: m for m in client.model_info().models}
    assert info["tiny-vit"].precision == _expected_precision(place) != "auto"
    assert info["edge"].precision == "w8a8" and info["edge"].runtime.startswith("onnxruntime")
    fp32 = next(m for m in reference.model_info().models if m.name == "tiny-vit")
    # The cache keys carry the weights' fingerprint: features of another precision are never served.
    assert (info["tiny-vit"].fingerprint == fp32.fingerprint) == (_expected_precision(place) == "fp32")


def test_every_method_with_and_without_token_compression(client, reference, place):
    got, want = _matrix(client), _reference_matrix(reference)
    precision = _expected_precision(place)
    agree = 0
    for key, resp in got.items():
        method, keep, _ = key
        _sane(resp)
        assert resp.adaptation.method == method and resp.token_keep_rate == keep
        assert resp.adaptation.views_encoded == (1 if method == A.NONE else 8)
        agree += resp.top[0].label == want[key].top[0].label
        if method in LOGIT_TOL and place[0] == "cpu":  # CUDA's fp32 reference would differ anyway
            ref = _scores(want[key])
            assert max(abs(v - ref[k]) for k, v in _scores(resp).items()) < LOGIT_TOL[method][precision], (key, resp)
    assert agree >= 0.8 * len(got), f"top-1 agrees with fp32 on {agree} of {len(got)} answers"


def test_gate_and_chunked_early_stop(client, reference):
    """The gate and the chunks' agreement test run on fp32 logits of half features: same decisions as fp32."""
    same_views, encoded = 0, []
    for i in IMAGES:
        gated = client.classify(make_image(700 + i), labels=LABELS, top_k=len(LABELS),
                                adaptation=A(method=A.GS_BIAS, views=16, skip_entropy=1.0))
        assert gated.adaptation.skipped and gated.adaptation.views_encoded == 1
        assert [s.label for s in gated.top] == [s.label for s in gated.zero_shot_top]
        chunked = A(method=A.ZERO, views=32, view_chunk=4, selection_ratio=0.25, seed=i, skip_entropy=0.0)
        got, want = (c.classify(make_image(700 + i), labels=LABELS, top_k=len(LABELS), adaptation=chunked)
                     for c in (client, reference))
        _sane(got)
        encoded.append(got.adaptation.views_encoded)
        same_views += got.adaptation.views_encoded == want.adaptation.views_encoded
    assert all(5 <= n <= 32 for n in encoded) and min(encoded) < 32, encoded  # some stopped early
    assert same_views >= len(IMAGES) - 1, f"chunked runs stopped where fp32 did on {same_views} of {len(IMAGES)}"


def test_cache_miss_then_hit_gives_the_same_answer(client):
    for method in METHODS[1:]:
        req = classify_request(make_image(200 + method), labels=LABELS, top_k=3, adaptation=_adaptation(method))
        first, again = (client.stub.Classify(req, timeout=60) for _ in range(2))
        assert (first.cache_level, again.cache_level) == (pb.CACHE_MISS, pb.CACHE_RESULT)
        assert _scores(again) == _scores(first)
        other = classify_request(make_image(200 + method), labels=LABELS[::-1], top_k=3,
                                 adaptation=_adaptation(method))
        resp = client.stub.Classify(other, timeout=60)  # same image and views, another label set
        assert resp.cache_level == pb.CACHE_FEATURES and all(math.isfinite(s.logit) for s in resp.top)


def test_embed_agrees_with_fp32(client, reference):
    images, texts = [make_image(300), make_image(301)], ["a cat", "a boat"]
    got, want = client.embed(images=images, texts=texts), reference.embed(images=images, texts=texts)
    for name in ("image_embeddings", "text_embeddings"):
        a = np.array([e.values for e in getattr(got, name)])
        b = np.array([e.values for e in getattr(want, name)])
        assert np.isfinite(a).all() and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-3)
        assert (np.sum(a * b, axis=1) > 0.99).all(), name


def test_bundle_answers_as_in_fp32(client, reference):
    """The bundle runs its own graph: beside a half-precision torch model its answers are fp32's, bit for bit."""
    for method in (A.NONE, A.GS_BIAS, A.ZERO):
        kwargs = {"labels": list(BUNDLE_LABELS), "templates": list(BUNDLE_TEMPLATES), "model": "edge", "top_k": 5,
                      "adaptation": _adaptation(method)}
        got, want = client.classify(make_image(400), **kwargs), reference.classify(make_image(400), **kwargs)
        assert all(math.isfinite(s.logit) for s in got.top) and _scores(got) == _scores(want)


def test_bundle_refuses_a_precision(bundle):
    for precision in ("fp16", "bf16", "fp32"):
        with pytest.raises(ModelLoadError, match=f"precision '{precision}'.*leave precision at auto"):
            load_bundle(ModelSpec(bundle=str(bundle), device="cpu", precision=precision))


def test_labelling_job_in_process_equals_the_server(client, place, tiny_spec, tmp_path):
    """`adaptclip label --local --precision P` answers what a server in P answers, and agrees with fp32."""
    if place[0] != "cpu":
        pytest.skip("the in-process job's model is on the CPU here")
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in IMAGES:
        (folder / f"img{i}.png").write_bytes(make_image(500 + i))
    out = tmp_path / "labels.jsonl"
    args = ["label", str(folder), "-o", str(out), "--labels", ",".join(LABELS), "--top-k", "3", "--tta", "gs_bias",
            "--views", "8", "--seed", "3", "--skip-entropy", "0", "--local", "--model", str(TINY_CONFIG),
            "--pretrained", tiny_spec.pretrained, "--device", "cpu", "--precision", place[1]]
    assert cli.main(args) == 0
    records = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == len(IMAGES)
    for i in IMAGES:
        resp = client.classify(make_image(500 + i), labels=LABELS, top_k=3, adaptation=_adaptation(A.GS_BIAS))
        rec = records[f"img{i}.png"]
        assert [t["label"] for t in rec["top"]] == [s.label for s in resp.top]
        assert all(math.isfinite(t["probability"]) for t in rec["top"])


def test_an_unexpected_failure_is_internal_with_a_request_id_and_the_server_goes_on(servers, caplog, monkeypatch):
    """The bug this file was written for (TPT's fp32 prompt against half text features) reached clients as
    UNKNOWN; any such failure inside a method is INTERNAL naming the logged request id."""
    from adaptclip.adapt import methods

    def broken(*args, **kwargs):
        raise RuntimeError("expected m1 and m2 to have the same dtype, but got: float != c10::BFloat16")

    monkeypatch.setattr(methods, "tpt_logits", broken)
    with Client(servers(("cpu", "bf16")).target, timeout_s=60) as c, caplog.at_level(logging.ERROR):
        req = classify_request(make_image(600), labels=LABELS, adaptation=_adaptation(A.TPT), request_id="tpt-bf16-1")
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Classify(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "request id tpt-bf16-1" in err.value.details() and "dtype" not in err.value.details()
        assert any("request id tpt-bf16-1" in r.getMessage() and r.exc_info for r in caplog.records)
        monkeypatch.undo()
        _sane(c.classify(make_image(600), labels=LABELS, top_k=len(LABELS), adaptation=_adaptation(A.TPT)))


def test_auto_is_the_default_and_fp32_on_the_cpu():
    assert ModelSpec().precision == "auto" and list(PRECISIONS) == flags.PRECISIONS
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ModelLoadError, match="precision 'fp8' not supported"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.cuda
@_NO_CUDA
def test_auto_on_cuda_is_a_half_type():
    native = torch.cuda.get_device_capability()[0] >= 8  # Ampere and later run bf16 natively
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp16")
