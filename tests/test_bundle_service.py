"""An exported bundle served through onnxruntime beside a torch model: same answers as the edge runner,
GS-Bias with the bundle's patch tokens (a format-1 bundle: global only, said), its limits (no text
tower) refused with FAILED_PRECONDITION naming the field."""
from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from bundles import as_format_one, tiny_bundle
from conftest import ServerThread, make_image

from adaptclip.client import Client, flags
from adaptclip.client.client import classify_request
from adaptclip.compression.edge_model import EdgeModel
from adaptclip.server.app import load_models
from adaptclip.compression.bundled import load_bundle
from adaptclip.compression.models import ModelSpec
from adaptclip.server.config import ServerConfig
from adaptclip.server.labels import label_set_id
from adaptclip.compression.models import ModelLoadError, TorchModel
from adaptclip.v1 import classifier_pb2 as pb

pytestmark = pytest.mark.usefixtures("one_thread")
A = pb.Adaptation
LABELS = ("cat", "dog", "car", "tree", "boat")
TEMPLATES = ("a photo of a {}.", "a picture of a {}.")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, hosted: TorchModel) -> Path:
    return tiny_bundle(hosted, tmp_path_factory.mktemp("served") / "bundle", {"things": (LABELS, TEMPLATES)})


@pytest.fixture(scope="module")
def old_bundle(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return as_format_one(bundle, tmp_path_factory.mktemp("old") / "bundle")


@pytest.fixture(scope="module")
def server(bundle: Path, old_bundle: Path, tiny_spec: ModelSpec) -> Iterator[ServerThread]:
    cfg = ServerConfig(host="127.0.0.1", port=0, models=[
        tiny_spec, ModelSpec(bundle=str(bundle), name="edge", device="cpu",
                             adaptation={"crop_scale": [0.5, 1.0], "augmix": False}),
        ModelSpec(bundle=str(old_bundle), name="old", device="cpu",  # same views: only the spatial bias differs
                  adaptation={"crop_scale": [0.5, 1.0], "augmix": False})])
    srv = ServerThread(cfg, load_models(cfg)).start()
    yield srv
    srv.stop()


def _edge_info(client: Client) -> pb.ModelDescription:
    return next(m for m in client.model_info().models if m.name == "edge")


def test_model_info_describes_the_bundle(client: Client) -> None:
    info = client.model_info()
    torch_model, edge, old = info.models
    assert torch_model.runtime == "torch" and not torch_model.bundled_label_sets and torch_model.patch_tokens
    assert edge.patch_tokens and not old.patch_tokens
    assert edge.runtime == "onnxruntime:CPUExecutionProvider" and edge.precision == "w8a8"
    assert edge.pretrained == "bundle" and edge.fingerprint.startswith("onnx-") and not edge.token_compression.available
    (ls,) = edge.bundled_label_sets
    assert (ls.name, ls.num_labels, ls.label_set_id) == ("things", 5, label_set_id(LABELS, TEMPLATES))
    assert edge.adaptation.crop_scale_min == pytest.approx(0.5) and not edge.adaptation.augmix


def test_zero_shot_equals_the_edge_runner(client: Client, bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(make_image(3, (70, 45)))
    resp = client.classify(path, labels=list(LABELS), templates=list(TEMPLATES), model="edge", top_k=5)
    with Image.open(path) as im:
        (expected,) = EdgeModel(bundle, ["CPUExecutionProvider"]).classify([im.convert("RGB")], top_k=5)
    assert [s.label for s in resp.top] == [e["label"] for e in expected]
    np.testing.assert_allclose([s.logit for s in resp.top], [e["logit"] for e in expected], atol=1e-4)
    # The same set by id, from GetModelInfo, answers the same.
    by_id = client.classify(path, label_set_id=_edge_info(client).bundled_label_sets[0].label_set_id, model="edge")
    assert [s.logit for s in by_id.top] == [s.logit for s in resp.top]


def test_gs_bias_uses_the_patch_tokens_and_is_seeded(client: Client) -> None:
    def run(seed: int, model: str = "edge") -> pb.ClassifyResponse:
        return client.classify(make_image(5), labels=list(LABELS), templates=list(TEMPLATES), model=model,
                               adaptation=A(method=A.GS_BIAS, views=8, seed=seed, skip_entropy=0.0))
    a, b = run(1), run(1)
    assert not a.adaptation.global_only and a.adaptation.note == ""
    old = run(1, "old")
    assert old.adaptation.global_only and "global bias only" in old.adaptation.note
    assert [s.logit for s in old.top] != [s.logit for s in a.top], "the spatial bias moved the answer"
    assert a.adaptation.views_encoded == 8 and len(a.zero_shot_top) == 5
    assert [s.logit for s in a.top] == [s.logit for s in b.top]
    zero = client.classify(make_image(5), labels=list(LABELS), templates=list(TEMPLATES), model="edge",
                           adaptation=A(method=A.ZERO, views=8, seed=1, skip_entropy=0.0))
    assert zero.adaptation.views_encoded == 8 and sum(s.probability for s in zero.top) == pytest.approx(1.0)


def _error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def test_what_a_bundle_cannot_do_is_refused_naming_the_field(client: Client) -> None:
    img = make_image(1)
    other = _error(lambda: client.classify(img, labels=["x", "y"], model="edge"))
    assert other.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert other.details().startswith("label_set:") and label_set_id(LABELS, TEMPLATES) in other.details()
    tpt = _error(lambda: client.classify(img, labels=list(LABELS), templates=list(TEMPLATES), model="edge",
                                         adaptation=A(method=A.TPT)))
    assert tpt.code() == grpc.StatusCode.FAILED_PRECONDITION and tpt.details().startswith("adaptation.method:")
    texts = _error(lambda: client.embed(texts=["a cat"], model="edge"))
    assert texts.code() == grpc.StatusCode.FAILED_PRECONDITION and texts.details().startswith("texts:")
    req = classify_request(img, labels=list(LABELS), templates=list(TEMPLATES), model="edge")
    req.token_keep_rate = 0.5
    keep = _error(lambda: client.stub.Classify(req, timeout=30))
    assert keep.code() == grpc.StatusCode.INVALID_ARGUMENT and keep.details().startswith("token_keep_rate:")
    # A set registered for the whole server is built for the torch model, and still refused by the bundle.
    ref = client.register_label_set(["x", "y"])
    assert client.classify(img, label_set_id=ref.label_set_id).top
    by_id = _error(lambda: client.classify(img, label_set_id=ref.label_set_id, model="edge"))
    assert by_id.code() == grpc.StatusCode.FAILED_PRECONDITION and by_id.details().startswith("label_set_id:")


def test_image_embeddings_match_the_edge_runner(client: Client, bundle: Path) -> None:
    img = make_image(9, (50, 37))
    resp = client.embed(images=[img], model="edge", normalize=False)
    edge = EdgeModel(bundle, ["CPUExecutionProvider"])
    expected = edge.encode_images(edge.preprocess(Image.open(io.BytesIO(img)).convert("RGB"))[None])[0]
    np.testing.assert_allclose(resp.image_embeddings[0].values, expected, rtol=1e-5, atol=1e-5)


def test_answers_are_cached_per_bundle(client: Client) -> None:
    img = make_image(21)
    first = client.classify(img, labels=list(LABELS), templates=list(TEMPLATES), model="edge")
    again = client.classify(img, labels=list(LABELS), templates=list(TEMPLATES), model="edge")
    assert not first.cache_hit and again.cache_hit
    assert [s.logit for s in again.top] == [s.logit for s in first.top]


@pytest.mark.parametrize("change, message", [
    (dict(device="cuda"), "CUDA provider"), (dict(keep_rate=0.5), "keep_rate"),
    (dict(adaptation={"method": "tpt"}), "text tower"), (dict(device="tpu"), "device"),
])
def test_load_errors_say_why(bundle: Path, change: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_bundle(ModelSpec(bundle=str(bundle), **change))


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="manifest.json"):
        load_bundle(ModelSpec(bundle=str(tmp_path)))


def test_serve_flag_builds_a_bundle_spec(bundle: Path) -> None:
    from adaptclip.client import cli

    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers())
    cfg = flags.server_config(parser.parse_args(["serve", "--bundle", str(bundle), "--name", "e", "--device", "cpu"]))
    (spec,) = cfg.models
    assert (spec.bundle, spec.name, spec.device) == (str(bundle), "e", "cpu")
    with pytest.raises(ValueError, match="--bundle"):
        flags.server_config(parser.parse_args(["serve", "--bundle", str(bundle), "--model", "ViT-B-32"]))
