"""The kernels behind the compute APIs' `backend=` and the server's `kernels:` setting: same answers as
torch, `auto` is torch on a CPU, and a kernel that fails its load-time check falls back to torch.

Without CUDA the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before
triton is first imported), so these use tiny shapes; the CUDA variants run where CUDA is.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from adaptclip.adapt.gsbias import gs_bias, gs_bias_logits
from adaptclip.adapt.methods import adapt_views
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.views import ViewGenerator
from adaptclip.client import Client, flags
from adaptclip.compression.models import ModelLoadError, ModelSpec, load_model
from adaptclip.compression.tokens import TokenCompressor
from adaptclip.kernels import gsbias as gsbias_kernels
from adaptclip.kernels import views as views_kernels
from adaptclip.kernels.backend import interpreted, resolve
from adaptclip.server.config import ServerConfig
from adaptclip.v1 import classifier_pb2 as pb
from conftest import LABELS, ServerThread, make_image

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreted(), reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available() or interpreted(), reason="needs CUDA and compiled kernels")]),
]
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _images(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 37, 50, generator=g).to(device), torch.rand(3, 20, 13, generator=g).to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_view_generator_same_seed_same_views(device: str, mode: str) -> None:
    """AugMix off: the kernel is the whole pipeline, within 1e-3 in [0, 1] units of the torch backend."""
    base = torch.randn(2, 3, 16, 16, device=device)
    views = {b: ViewGenerator(16, MEAN, STD, augmix=False, interpolation=mode, backend=b)(_images(device), base, 5,
                                                                                           seed=3)
             for b in ("torch", "triton")}
    assert views["triton"].shape == (2, 5, 3, 16, 16) and torch.equal(views["triton"][:, 0], base)
    std = torch.tensor(STD, device=device).view(3, 1, 1)
    assert float(((views["triton"] - views["torch"]).abs() * std).max()) <= 1e-3
    half = ViewGenerator(16, MEAN, STD, augmix=False, backend="triton")(_images(device), base.half(), 3, seed=3)
    assert half.dtype == torch.float16  # written in view 0's (the model's) dtype


@pytest.mark.parametrize("device", DEVICES)
def test_view_generator_augmix_crops_with_the_kernel(device: str) -> None:
    image = _images(device)[0]
    boxes = [(0, 0, 37, 50), (5, 7, 3, 4), (30, 40, 7, 10)]
    crops = [ViewGenerator(16, MEAN, STD, backend=b)._crops(image, boxes) for b in ("torch", "triton")]
    assert float((crops[1] - crops[0]).abs().max()) <= 1e-3
    views = ViewGenerator(16, MEAN, STD, backend="triton")([image], torch.zeros(1, 3, 16, 16, device=device), 4, seed=1)
    assert views.shape == (1, 4, 3, 16, 16) and bool(views.isfinite().all())


def test_auto_is_torch_without_cuda() -> None:
    assert resolve("auto", "cpu") == "torch" and resolve("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        resolve("cuda", "cpu")
    base = torch.zeros(2, 3, 16, 16)
    views = [ViewGenerator(16, MEAN, STD, backend=b)(_images("cpu"), base, 3, seed=0) for b in ("auto", "torch")]
    assert torch.equal(*views)


def _gs_inputs(views: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device)
                 for shape in ((views, 16), (7, 16), (37, 16)))


@pytest.mark.parametrize("device", DEVICES)
def test_gs_bias_backends_agree(device: str) -> None:
    feats, patches, classifier = _gs_inputs(8, device)
    kwargs = dict(steps=2, selection_ratio=0.25, top_k_patches=4)
    want, got = (gs_bias(feats, patches, classifier, backend=b, **kwargs) for b in ("torch", "triton"))
    for field in dataclasses.fields(want):
        torch.testing.assert_close(getattr(got, field.name), getattr(want, field.name), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gs_bias_logits(feats, patches, classifier, backend="triton", **kwargs), want.logits,
                               atol=1e-4, rtol=1e-4)
    s = AdaptSettings(method="gs_bias", views=8, steps=2, selection_ratio=0.25, spatial_top_k=4)
    served = adapt_views(s, feats.cpu(), patches.cpu(), classifier.cpu(), 100.0, None, "triton", device)
    ref = adapt_views(s, feats.cpu(), patches.cpu(), classifier.cpu(), 100.0)
    assert served.logits.device.type == "cpu" and served.steps_run == ref.steps_run
    torch.testing.assert_close(served.logits, ref.logits, atol=1e-4, rtol=1e-4)


def test_gs_bias_runs_torch_past_the_kernel_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the kernel was called")

    monkeypatch.setattr(gsbias_kernels, "gs_bias", refuse)
    feats, patches, classifier = _gs_inputs(gsbias_kernels.MAX_VIEWS + 1, "cpu")
    assert torch.equal(gs_bias(feats, patches, classifier, backend="triton").logits,
                       gs_bias(feats, patches, classifier).logits)


@pytest.mark.parametrize("device", DEVICES)
def test_token_compressor_backends_agree(device: str, hosted) -> None:
    module = hosted.module.to(device)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    try:
        want, got = (TokenCompressor(module, backend=b).encode(images, 0.5, with_patches=True)
                     for b in ("torch", "triton"))
    finally:
        hosted.module.to("cpu")
    assert torch.equal(got.patch_index, want.patch_index) and got.kept == want.kept
    torch.testing.assert_close(got.pooled, want.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.patches, want.patches, atol=1e-5, rtol=1e-5)


def _triton_spec(spec: ModelSpec, **changes) -> ModelSpec:
    return dataclasses.replace(spec, **{"kernels": "triton", "keep_rate": 0.5, "adaptation": {"views": 8}, **changes})


@pytest.mark.skipif(not interpreted(), reason="forces triton on the CPU: needs the interpreter")
def test_a_failing_kernel_falls_back_to_torch(tiny_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """One kernel raises (a compile error, say), another answers wrong: both run torch, the third Triton."""
    def broken(*args, **kwargs):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(gsbias_kernels, "gs_bias", broken)
    right = views_kernels.render_batch
    monkeypatch.setattr(views_kernels, "render_batch", lambda *a, **k: right(*a, **k) + 0.1)
    with caplog.at_level(logging.WARNING, logger="adaptclip.compression.kernel_check"):
        model = load_model(_triton_spec(tiny_spec))
    k = model.kernels
    assert (k.requested, k.views, k.gs_bias, k.tokens) == ("triton", "torch", "torch", "triton")
    assert model.compressor.backend == "triton"
    assert "PTX compile failed" in k.notes[1] and "views differ from torch" in k.notes[0]
    assert sum("warm-up check" in r.getMessage() for r in caplog.records) == 2


def test_kernels_setting_and_flag(tiny_spec: ModelSpec, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="kernels 'cuda' not supported"):
        load_model(dataclasses.replace(tiny_spec, kernels="cuda"))
    auto = load_model(tiny_spec)  # the default, on a CPU: torch, kernels not checked
    assert (auto.kernels.requested, auto.kernels.views, auto.kernels.gs_bias, auto.kernels.tokens) == (
        "auto", "torch", "torch", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a server process: compiled kernels, which need CUDA
    refused = load_model(dataclasses.replace(tiny_spec, kernels="triton"))
    assert (refused.kernels.views, refused.kernels.gs_bias, refused.kernels.tokens) == ("torch",) * 3
    assert "need a CUDA device" in refused.kernels.notes[0]
    config = tmp_path / "server.yaml"
    config.write_text("models:\n  - model: a\n    kernels: torch\n  - model: b\n")
    parser = argparse.ArgumentParser()
    flags.add_model_flags(parser, serving=True)
    parser.add_argument("--config")
    cfg = flags.server_config(parser.parse_args(["--config", str(config), "--kernels", "triton"]))
    assert [m.kernels for m in cfg.models] == ["triton", "triton"]  # server-wide
    assert [m.kernels for m in flags.server_config(parser.parse_args(["--config", str(config)])).models] == [
        "torch", "auto"]


@pytest.mark.parametrize("device", DEVICES)
def test_server_reports_and_serves_the_kernels(tiny_spec: ModelSpec, device: str) -> None:
    """A model on Triton kernels (all checks passed) answers as its torch twin; GetModelInfo says which.
    On the CPU triton is forced (the interpreter); on CUDA `auto` must choose it."""
    asked = "triton" if device == "cpu" else "auto"
    specs = [_triton_spec(tiny_spec, name="tiny-torch", kernels="torch", device=device),
             _triton_spec(tiny_spec, name="tiny-triton", kernels=asked, device=device)]
    models = [load_model(spec) for spec in specs]
    assert (models[1].kernels.views, models[1].kernels.gs_bias, models[1].kernels.tokens) == ("triton",) * 3
    cfg = ServerConfig(host="127.0.0.1", port=0, models=specs)
    cfg.cache.enabled = False
    srv = ServerThread(cfg, models).start()
    try:
        with Client(srv.target, timeout_s=120) as client:
            info = {m.name: m.kernels for m in client.model_info().models}
            assert info["tiny-torch"] == pb.KernelBackends(requested="torch", views="torch", gs_bias="torch",
                                                           tokens="torch")
            assert info["tiny-triton"] == pb.KernelBackends(requested=asked, views="triton", gs_bias="triton",
                                                            tokens="triton")
            adaptation = pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=4, seed=2, augmix=False)
            answers = [client.classify(make_image(3, (64, 48)), labels=LABELS, model=m.name, adaptation=adaptation,
                                       top_k=len(LABELS)) for m in models]
    finally:
        srv.stop()
    logits = [{s.label: s.logit for s in a.top} for a in answers]
    assert answers[1].adaptation.views_encoded == 4 and answers[0].top[0].label == answers[1].top[0].label
    assert logits[1] == pytest.approx(logits[0], abs=1e-3)
