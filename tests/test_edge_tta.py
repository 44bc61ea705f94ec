"""Test-time adaptation on the edge: patch output of a bundle, recorded adaptation defaults, the numpy loop
against the torch loop on the same features, old bundles (global only), `edge classify --tta`."""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import as_format_one, tiny_bundle
from conftest import make_image

from adaptclip.adapt.evaluate import Precomputed
from adaptclip.adapt.loop import adapt_image
from adaptclip.adapt.methods import adapt_views
from adaptclip.client import cli_edge, cli_quantize
from adaptclip.compression.bundled import load_bundle
from adaptclip.compression.edge_model import EdgeModel
from adaptclip.compression.edge_tta import EdgeAdapter, edge_settings, spin_while_adapting
from adaptclip.compression.models import ModelSpec, TorchModel, image_features

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ("cat", "dog", "car", "tree", "boat")
TEMPLATES = ("a photo of a {}.",)
# As a tune result may write it, with a field this version does not know (a newer safety gate).
RECORDED = {"method": "gs_bias", "views": 12, "crop_scale": [0.5, 1.0], "augmix": False, "safety_gate": 0.3}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, hosted: TorchModel) -> Path:
    return tiny_bundle(hosted, tmp_path_factory.mktemp("tta") / "bundle", {"things": (LABELS, TEMPLATES)},
                       adaptation=RECORDED, adaptation_source="tune.yaml")


@pytest.fixture(scope="module")
def old_bundle(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return as_format_one(bundle, tmp_path_factory.mktemp("old") / "bundle")


@pytest.fixture(scope="module")
def images() -> list:
    from PIL import Image
    import io

    return [Image.open(io.BytesIO(make_image(seed, (61, 47)))).convert("RGB") for seed in range(4)]


def test_bundle_exports_patches_and_records_the_adaptation_block(bundle: Path, hosted: TorchModel, images) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "adaptclip-edge-bundle/2" and manifest["onnx"]["patches"] == "patches"
    assert manifest["adaptation"] == {"settings": RECORDED, "source": "tune.yaml"}
    assert manifest["agreement"]["patches"]["cosine_mean"] > 0.99
    edge = EdgeModel(bundle)
    pixels = np.stack([edge.preprocess(im) for im in images])
    feats, patches = edge.encode(pixels, with_patches=True)
    _, want_patches = image_features(hosted.module, torch.from_numpy(pixels), True)
    assert patches.shape == tuple(want_patches.shape) == (4, 16, hosted.embed_dim)
    cos = (patches * want_patches.numpy()).sum(-1) / np.linalg.norm(patches, axis=-1) / want_patches.norm(dim=-1).numpy()
    assert cos.mean() > 0.99, "INT8 patch tokens through ln_post and the projection follow fp32"
    np.testing.assert_array_equal(edge.encode(pixels)[0], feats)
    assert edge.encode(pixels)[1] is None, "patches only when asked"


def test_settings_apply_what_the_edge_knows_and_report_the_rest(bundle: Path) -> None:
    s, ignored = edge_settings(EdgeModel(bundle).adaptation, {"views": 6, "seed": None})
    assert (s.method, s.views, s.crop_scale, s.augmix) == ("gs_bias", 6, (0.5, 1.0), False)
    assert ignored == ["safety_gate"]
    with pytest.raises(ValueError, match="adaptation.views"):
        edge_settings({"views": 0})
    with pytest.raises(ValueError, match="text tower"):
        edge_settings({}, {"method": "tpt"})


def _features(edge: EdgeModel, adapter: EdgeAdapter, image, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The features the edge loop computed: view 0 alone (with patches), then its pieces of views."""
    views = adapter.renderer(image, adapter.s.views, seed=seed)
    feat0, patches = edge.encode(views[:1], with_patches=True)
    rest = [edge.encode(views[lo:hi])[0] for lo, hi, _ in adapter._pieces()]
    return np.concatenate([feat0, *rest]), patches[0]


@pytest.mark.parametrize("change", [{"method": "gs_bias"}, {"method": "gs_bias", "view_chunk": 3, "steps": 3},
                                    {"method": "zero", "view_chunk": 4}, {"method": "gs_bias", "skip_entropy": 1.0},
                                    {"method": "gs_bias", "gate_agreement": 0.6}, {"method": "zero", "gate_top_k": 1},
                                    {"method": "gs_bias", "gate_similarity": 0.95},
                                    {"method": "zero", "gate_entropy_rise": 0.0}])
def test_edge_loop_equals_the_torch_loop_on_the_same_features(bundle: Path, images, change: dict) -> None:
    edge = EdgeModel(bundle)
    s, _ = edge_settings(edge.adaptation, {"views": 12, **change})
    _, weights = edge.label_set()
    classifier = torch.from_numpy(weights.copy())

    async def method(settings, feats, patches):
        return adapt_views(settings, feats, patches, classifier, edge.logit_scale)

    with EdgeAdapter(edge, s, render_chunk=5) as adapter:
        for seed, image in enumerate(images):
            got = adapter.classify(image, seed=seed)
            feats, patches = _features(edge, adapter, image, seed)
            source = Precomputed(torch.from_numpy(feats), torch.from_numpy(patches))
            want = asyncio.run(adapt_image(source, s, classifier, edge.logit_scale, edge.logit_bias, method))
            r = want.report
            assert (got.report["views_encoded"], got.report["skipped"], got.report["fell_back"], got.report["steps_run"],
                    got.report["global_only"]) == (r.views_encoded, r.skipped, r.fell_back, r.steps_run, r.global_only)
            np.testing.assert_allclose(got.zero_shot, want.zero_shot.numpy(), atol=1e-4)
            if want.result is None:
                np.testing.assert_array_equal(got.logits, got.zero_shot)
                continue
            np.testing.assert_allclose(got.logits, want.result.logits.numpy(), atol=1e-4)
            np.testing.assert_allclose(got.probs, want.result.probs.numpy(), atol=1e-4)
            if s.method == "gs_bias":
                assert want.result.spatial_bias.abs().max() > 0, "the spatial bias took part"


def test_old_bundle_loads_and_adapts_globally_only(old_bundle: Path, images) -> None:
    edge = EdgeModel(old_bundle)
    assert not edge.has_patches and edge.adaptation == {}
    with EdgeAdapter(edge, edge_settings({}, {"method": "gs_bias", "views": 6})[0]) as adapter:
        answer = adapter.classify(images[0])
    assert answer.report["global_only"] and "format adaptclip-edge-bundle/1" in answer.report["note"]
    served = load_bundle(ModelSpec(bundle=str(old_bundle), device="cpu"))
    assert not served.has_patches and served.adapt_defaults.method == "none"
    feats, patches = served.encode_images(torch.zeros(2, 3, 32, 32), with_patches=True)
    assert feats.shape == (2, 32) and patches is None


def test_hosted_bundle_gets_patches_and_recorded_defaults_under_the_config(bundle: Path) -> None:
    served = load_bundle(ModelSpec(bundle=str(bundle), device="cpu", adaptation={"views": 20}))
    assert served.has_patches
    d = served.adapt_defaults
    assert (d.method, d.views, d.crop_scale, d.augmix) == ("gs_bias", 20, (0.5, 1.0), False)
    _, patches = served.encode_images(torch.zeros(2, 3, 32, 32), with_patches=True)
    assert patches.shape == (2, 16, 32) and patches.dtype == torch.float32


def _cli(bundle: Path, paths: list[str], *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_edge.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["edge", "classify", "--bundle", str(bundle), *paths, "--json", "--top-k", "3", *flags])


def test_cli_tta_json_lines(bundle: Path, old_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(make_image(10 + i, (50, 44)))
    assert cli_edge.run(_cli(bundle, paths)) == 0  # the bundle's recorded method: gs_bias, 12 views
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert "safety_gate" in captured.err
    assert [x["image"] for x in lines] == paths
    for x in lines:
        a = x["adaptation"]
        assert (a["method"], a["views_encoded"], a["global_only"], a["skipped"]) == ("gs_bias", 12, False, False)
        assert a["ignored_settings"] == ["safety_gate"] and a["steps_run"] == 1
        assert len(x["top"]) == len(x["zero_shot_top"]) == 3 and set(x["top"][0]) == {"label", "probability", "logit"}
        assert {"render_ms", "encode_ms", "adapt_ms", "total_ms"} <= set(x["timings_ms"])
    again = [json.loads(x) for x in (cli_edge.run(_cli(bundle, paths)), capsys.readouterr().out)[1].splitlines()]
    assert [x["top"] for x in again] == [x["top"] for x in lines], "same seed, same answer"
    assert cli_edge.run(_cli(bundle, paths, "--tta", "zero", "--views", "8", "--seed", "3")) == 0
    zero = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all(x["adaptation"]["method"] == "zero" and x["adaptation"]["views_encoded"] == 8 for x in zero)
    assert cli_edge.run(_cli(bundle, paths, "--tta", "none")) == 0
    assert all("adaptation" not in json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert cli_edge.run(_cli(old_bundle, paths[:1], "--tta", "gs_bias", "--views", "4")) == 0
    (old,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert old["adaptation"]["global_only"] and "re-export" in old["adaptation"]["note"]
    assert cli_edge.run(_cli(bundle, paths[:1], "--views", "1")) == 0
    (one,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert one["adaptation"]["views_encoded"] == 1
    assert cli_edge.run(_cli(bundle, paths, "--views", "0")) == 2
    assert "adaptation.views" in capsys.readouterr().err


def test_quantize_takes_the_adaptation_block_of_the_matching_entry(tmp_path: Path) -> None:
    cfg = tmp_path / "tuned.yaml"
    cfg.write_text("models:\n"
                   "  - {model: ../m/cifar.json, pretrained: x.pt, name: cifar, adaptation: {views: 32, gate: 1}}\n"
                   "  - {model: ViT-B-32, pretrained: tag, adaptation: {views: 16}}\n")
    assert cli_quantize.adaptation_block(str(cfg), "/elsewhere/m/cifar.json") == {"views": 32, "gate": 1}
    assert cli_quantize.adaptation_block(str(cfg), "ViT-B-32") == {"views": 16}
    with pytest.raises(ValueError, match="no model entries for RN50"):
        cli_quantize.adaptation_block(str(cfg), "RN50")
    single = tmp_path / "one.yaml"
    single.write_text("models:\n  - {model: other.json, pretrained: y.pt, adaptation: {method: zero}}\n")
    assert cli_quantize.adaptation_block(str(single), "RN50") == {"method": "zero"}


def test_workers_spin_unless_augmix_renders_beside_them(bundle: Path, images, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = edge_settings(RECORDED)
    assert spin_while_adapting(base), "crops alone render in a millisecond: spinning's quick hand-offs win"
    assert not spin_while_adapting(base.replace(augmix=True))
    assert spin_while_adapting(base.replace(augmix=True, method="none")), "no views rendered"
    served = load_bundle(ModelSpec(bundle=str(bundle), device="cpu"))
    augmixed = load_bundle(ModelSpec(bundle=str(bundle), device="cpu", adaptation={"augmix": True}))
    assert served.edge.spins and not augmixed.edge.spins, "the host opens the graph for its defaults"
    asks = load_bundle(ModelSpec(bundle=str(bundle), device="cpu", adaptation={"method": "none", "augmix": True}))
    assert not asks.edge.spins, "requests pick the method: a server adapting with none by default still renders"
    pixels = torch.from_numpy(np.stack([served.edge.preprocess(im) for im in images]))
    torch.testing.assert_close(augmixed.encode_images(pixels), served.encode_images(pixels), rtol=0, atol=1e-6)
    opened = []

    class Recording(EdgeModel):
        def __init__(self, *args, spin: bool = True, **kwargs) -> None:
            opened.append(spin)
            super().__init__(*args, spin=spin, **kwargs)

    monkeypatch.setattr("adaptclip.compression.edge.EdgeModel", Recording)
    shutil.copytree(bundle, tmp_path / "augmix")
    manifest = json.loads((tmp_path / "augmix" / "manifest.json").read_text())
    manifest["adaptation"]["settings"]["augmix"] = True
    (tmp_path / "augmix" / "manifest.json").write_text(json.dumps(manifest))
    path = str(tmp_path / "0.png")
    Path(path).write_bytes(make_image(3, (40, 36)))
    for where, flags in ((bundle, ()), (tmp_path / "augmix", ()), (tmp_path / "augmix", ("--tta", "none"))):
        assert cli_edge.run(_cli(where, [path], "--views", "4", *flags)) == 0
    assert opened == [True, False, True]
