"""Token compression through the service: per-request keep rates, validation, caching, model info."""
from __future__ import annotations

import grpc
import pytest

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from adaptclip.compression.models import ModelSpec
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, TINY_CONFIG, make_image, start_server

A = pb.Adaptation


@pytest.fixture(scope="module")
def compressed(tiny_checkpoint):
    spec = ModelSpec(model=str(TINY_CONFIG), pretrained=str(tiny_checkpoint), device="cpu", keep_rate=0.5,
                     token_reduce_at=[0])
    srv = start_server(spec)
    yield srv
    srv.stop()


def _call(c, keep_rate=None, adaptation=None, img=1):
    req = classify_request(make_image(img), labels=LABELS, top_k=len(LABELS), adaptation=adaptation)
    if keep_rate is not None:
        req.token_keep_rate = keep_rate
    return c.stub.Classify(req, timeout=30)


def _logits(resp):
    return {s.label: s.logit for s in resp.top}


def test_default_and_per_request_keep_rate(compressed, server):
    with Client(compressed.target) as c, Client(server.target) as plain:
        info = c.model_info().models[0].token_compression
        assert (info.available, info.keep_rate, list(info.reduce_at), info.fuse) == (True, 0.5, [0], True)
        default = _call(c)
        assert default.token_keep_rate == 0.5
        full = _call(c, keep_rate=1.0)
        assert full.token_keep_rate == 1.0 and full.cache_level == pb.CACHE_MISS  # its own cache entry
        assert _logits(full) == pytest.approx(_logits(_call(plain)), abs=1e-5)  # keep 1.0 = the plain model
        assert _logits(default) != pytest.approx(_logits(full), abs=1e-4)
        gs = _call(c, keep_rate=0.5, adaptation=A(method=A.GS_BIAS, views=4, spatial_top_k=16), img=2)
        assert gs.adaptation.views_encoded == 4 and not gs.adaptation.global_only


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan")])
def test_invalid_keep_rate(compressed, value):
    with Client(compressed.target) as c, pytest.raises(grpc.RpcError) as err:
        _call(c, keep_rate=value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("token_keep_rate")


def test_serve_refuses_bad_keep_rate(tiny_checkpoint):
    from adaptclip.compression.models import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="keep_rate"):
        load_model(ModelSpec(model=str(TINY_CONFIG), pretrained=str(tiny_checkpoint), device="cpu", keep_rate=0.0))


def test_classify_cli_keep_rate(compressed, tmp_path):
    import json
    import subprocess
    import sys

    img = tmp_path / "a.png"
    img.write_bytes(make_image(5))
    out = []
    for rate in ("1.0", "0.5"):
        proc = subprocess.run([sys.executable, "-m", "adaptclip.client.cli", "classify", str(img), "--labels",
                               ",".join(LABELS), "--server", compressed.target, "--json", "--keep-rate", rate],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out.append(json.loads(proc.stdout)["top"][0]["logit"])
    with Client(compressed.target) as c:
        assert out == pytest.approx([_call(c, 1.0, img=5).top[0].logit, _call(c, 0.5, img=5).top[0].logit], abs=1e-5)


def test_a_vit_the_compressor_does_not_know_fails_at_load_not_silently(tmp_path):
    """A ViT tower whose attention the compressor cannot run (QK-normalised) is refused at load with the way
    out in the message; `token_compression: false` serves it, reported as unavailable."""
    import json

    import open_clip
    import torch

    from adaptclip.compression.models import ModelLoadError, load_model

    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["vision_cfg"]["qk_norm"] = True
    path = tmp_path / "tiny-qknorm.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    ckpt = tmp_path / "w.pt"
    torch.save(open_clip.create_model("tiny-qknorm").state_dict(), ckpt)
    spec = ModelSpec(model=str(path), pretrained=str(ckpt), device="cpu")
    with pytest.raises(ModelLoadError, match="token_compression: false"):
        load_model(spec)
    spec.token_compression = False
    model = load_model(spec)
    assert model.compressor is None
    with pytest.raises(ValueError, match="token_keep_rate"):
        model.check_keep_rate(0.5, "token_keep_rate")
