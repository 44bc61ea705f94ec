"""The server's view source: views drawn while view 0 is encoded are the views the loop would have drawn,
and an image the confidence gate skips renders none (on the server and on the edge); pieces sharing a
batch count its encode time once."""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import time

import pytest
import torch
from bundles import tiny_bundle
from conftest import LABELS, make_image
from PIL import Image

from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.views import render_views
from adaptclip.compression.edge_model import EdgeModel
from adaptclip.compression.edge_tta import EdgeAdapter, edge_settings
from adaptclip.compression.models import TorchModel
from adaptclip.server.config import BatchingConfig
from adaptclip.server.hosting import Hosted
from adaptclip.server.pipeline import ImageViews, classify_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(make_image(seed, (61, 47)))).convert("RGB")


def _serve(model: TorchModel, s: AdaptSettings, img: Image.Image, max_batch: int = 4) -> ImageViews:
    """One image through ImageViews + classify_image with a real batcher (max batch 4: several pieces)."""
    classifier = model.classifier(LABELS, ("a photo of a {}.",))

    async def main() -> ImageViews:
        hosted = Hosted(model)
        hosted.start(BatchingConfig(max_batch_size=max_batch))
        pool = concurrent.futures.ThreadPoolExecutor(2)
        try:
            view0 = model.preprocess(img)

            async def decode():
                return img, view0

            views = ImageViews(hosted, s, decode, None, pool)
            start = time.perf_counter()
            views.outcome = await classify_image(hosted, views, classifier, LABELS, s, pool)
            views.wall_us, views.batches = int((time.perf_counter() - start) * 1e6), hosted.batcher.batches
            return views
        finally:
            await hosted.close()
            pool.shutdown()
    return asyncio.run(main())


@pytest.mark.parametrize("change", [{}, {"view_chunk": 3}, {"views": 2}])
def test_views_drawn_during_view_zero_are_the_loops_views(hosted: TorchModel, change: dict) -> None:
    s = AdaptSettings(method="gs_bias", views=10, crop_scale=(0.5, 1.0), augmix=False, seed=3).replace(**change)
    img = _image()
    views = _serve(hosted, s, img)
    n = views.outcome.report.views_encoded
    assert views.render_us > 0 and views.feats.shape[0] == n
    want = hosted.encode_images(render_views(hosted, img, hosted.preprocess(img), s)[:n])[0]
    torch.testing.assert_close(views.feats, want, atol=1e-5, rtol=1e-4)


def test_a_skipped_image_renders_no_views(hosted: TorchModel, tmp_path) -> None:
    s = AdaptSettings(method="gs_bias", views=10, crop_scale=(0.5, 1.0), augmix=False, skip_entropy=1.0)
    views = _serve(hosted, s, _image())
    assert views.outcome.report.skipped and views.render_us == 0 and views.feats.shape[0] == 1

    bundle = tiny_bundle(hosted, tmp_path / "bundle", {"things": (LABELS, ("a photo of a {}.",))})
    edge = EdgeModel(bundle)
    rendered = []
    with EdgeAdapter(edge, edge_settings({}, {"method": "gs_bias", "views": 10, "augmix": False,
                                              "skip_entropy": 1.0})[0]) as adapter:
        render = adapter.renderer.render
        adapter.renderer.render = lambda *a: rendered.append(1) or render(*a)
        answer = adapter.classify(_image())
    assert answer.report["skipped"] and answer.timings_ms["render_ms"] == 0.0 and not rendered


@pytest.mark.parametrize("augmix", [True, False])
def test_pieces_ramp_up_where_augmix_renders_on_the_cpu(hosted: TorchModel, tmp_path, monkeypatch,
                                                        augmix: bool) -> None:
    """View 0's encode hides a one-view piece, each doubled piece its predecessor's encode (adapt/pieces.py);
    cheap crops keep even pieces. Server (batches of at most 4 here) and edge cut alike."""
    want = [(1, 2), (2, 4), (4, 8), (8, 10)] if augmix else [(1, 5), (5, 9), (9, 10)]
    s = AdaptSettings(method="gs_bias", views=10, crop_scale=(0.5, 1.0), augmix=augmix, seed=3)
    rendered: list[tuple[int, int]] = []
    render = ImageViews._render
    monkeypatch.setattr(ImageViews, "_render", lambda self, lo, hi: rendered.append((lo, hi)) or render(self, lo, hi))
    img = _image()
    views = _serve(hosted, s, img)
    assert rendered == want and views.outcome.report.views_encoded == 10
    whole = hosted.encode_images(render_views(hosted, img, hosted.preprocess(img), s))[0]
    torch.testing.assert_close(views.feats, whole, atol=1e-5, rtol=1e-4)  # the same views, whatever the cut

    edge = EdgeModel(tiny_bundle(hosted, tmp_path / "bundle", {"things": (LABELS, ("a photo of a {}.",))}))
    with EdgeAdapter(edge, edge_settings({}, {"method": "gs_bias", "views": 10, "augmix": augmix})[0],
                     render_chunk=4) as adapter:
        sizes: list[int] = []
        encode = edge.encode
        monkeypatch.setattr(edge, "encode", lambda x, **kw: sizes.append(len(x)) or encode(x, **kw))
        adapter.classify(img)
    assert sizes == [1] + [hi - lo for lo, hi in want]


def test_pieces_sharing_a_batch_count_its_encode_time_once(hosted: TorchModel, monkeypatch) -> None:
    """A slow encoder lets the ramp's later pieces (2 + 4 + 2 views) queue and go as one batch of 8: the
    request's encode time counts that batch once, so it never exceeds the request's own wall time."""
    encode = hosted.encode_images
    monkeypatch.setattr(hosted, "encode_images", lambda *a, **kw: time.sleep(0.25) or encode(*a, **kw))
    s = AdaptSettings(method="gs_bias", views=10, crop_scale=(0.5, 1.0), augmix=True, seed=3)
    views = _serve(hosted, s, _image(), max_batch=8)
    assert views.outcome.report.views_encoded == 10 and views.batches == 3  # view 0, piece 1, pieces 2-4
    assert 3 * 250_000 <= views.encode_us <= views.wall_us
