"""The torch-free edge runner: preprocessing parity with open_clip, bundle inference, no-torch subprocess."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from adaptclip.client import cli_edge
from adaptclip.compression.bundle import BundleConfig, build_bundle
from adaptclip.compression.edge_model import EdgeModel, preprocess_image
from adaptclip.compression.export import QuantConfig, agreement, torch_embeddings
from adaptclip.compression.spdfq import SynthesisConfig
from adaptclip.compression.models import TorchModel

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ("cat", "dog", "car", "tree", "boat")
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def photo(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A photo-like picture: smooth gradients, a few shapes and mild noise (resampling sees real detail)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.stack([np.sin(6 * xx + c) * 80 + 128 + 60 * np.cos(9 * yy * (c + 1)) for c in range(3)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        arr[y0:y0 + h // 5, x0:x0 + w // 6] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, hosted: TorchModel) -> Path:
    out = tmp_path_factory.mktemp("edge") / "bundle"
    cfg = BundleConfig(calib="spdfq", n_calib=8, n_check=4, min_cosine=0.99, quant=QuantConfig(bits="w8a8"),
                       synthesis=SynthesisConfig(iters=5, progress=False))
    build_bundle(hosted, {"default": (LABELS, ("a photo of a {}.",))}, out, cfg)
    return out


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pics")
    paths = []
    for i, (w, h, mode, ext) in enumerate([(97, 61, "RGB", "jpg"), (40, 120, "L", "png"), (33, 33, "RGBA", "png")]):
        path = folder / f"img{i}.{ext}"
        photo(w, h, i, mode).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("size,resize_mode", [(224, "shortest"), (32, "shortest"), (32, "squash"), (64, "shortest")])
def test_preprocessing_matches_open_clip(size: int, resize_mode: str) -> None:
    transform = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD, resize_mode=resize_mode)
    for i, (w, h) in enumerate([(640, 480), (300, 500), (97, 61), (16, 40), (224, 224), (500, 499)]):
        for mode in ("RGB", "L", "RGBA"):
            im = photo(w, h, i, mode)
            want = transform(im).numpy()
            got = preprocess_image(im, size, MEAN, STD, "bicubic", resize_mode)
            assert got.shape == want.shape == (3, size, size)
            # Same PIL resampling and crop arithmetic: equal up to float rounding.
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_edge_model_follows_torch(bundle: Path, hosted: TorchModel, image_files: list[Path]) -> None:
    edge = EdgeModel(bundle)
    assert edge.name == hosted.name and edge.image_size == hosted.image_size and edge.label_set_names == ["default"]
    images = [Image.open(p) for p in image_files]
    pixels = np.stack([edge.preprocess(im) for im in images])
    ref = torch_embeddings(hosted.module, torch.stack([hosted.preprocess(im) for im in images]))
    feats = edge.encode_images(pixels)
    assert agreement(ref, feats, {}).cosine_mean > 0.99
    classifier = hosted.classifier(LABELS, ("a photo of a {}.",))
    want_logits = hosted.logits(torch.from_numpy(ref / np.linalg.norm(ref, axis=-1, keepdims=True)), classifier).numpy()
    np.testing.assert_allclose(edge.logits(ref), want_logits, atol=1e-4)  # same formula as the server
    top = edge.classify(images, top_k=3)
    assert len(top) == 3 and all(len(t) == 3 for t in top)
    for row, logits in zip(top, edge.logits(feats)):
        assert [s["label"] for s in row] == [LABELS[i] for i in np.argsort(-logits)[:3]]
        probs = [s["probability"] for s in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    with pytest.raises(KeyError, match="not in the bundle"):
        edge.label_set("nope")


def test_cli_edge_json_lines(bundle: Path, image_files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_edge.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["edge", "classify", "--bundle", str(bundle), *map(str, image_files), "--top-k", "2", "--json"])
    assert cli_edge.run(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == list(map(str, image_files))
    assert all(len(x["top"]) == 2 and set(x["top"][0]) == {"label", "probability", "logit"} for x in lines)
    args.images = [str(image_files[0]), str(bundle / "manifest.json")]
    assert cli_edge.run(args) == 1, "an unreadable image fails the run, the others are still answered"
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_runs_where_torch_cannot_be_imported(tmp_path: Path, bundle: Path, image_files: list[Path]) -> None:
    blocked = tmp_path / "blocked"
    for name in ("torch", "grpc", "open_clip"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not available on this device')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not available on this device" in probe.stderr
    run = subprocess.run([sys.executable, "-m", "adaptclip.compression.edge", "classify", "--bundle", str(bundle),
                          *map(str, image_files), "--top-k", "3", "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = [json.loads(x) for x in run.stdout.splitlines()]
    want = EdgeModel(bundle).classify([Image.open(p) for p in image_files], top_k=3)
    assert [[s["label"] for s in g["top"]] for g in got] == [[s["label"] for s in w] for w in want]
    np.testing.assert_allclose([[s["probability"] for s in g["top"]] for g in got],
                               [[s["probability"] for s in w] for w in want], rtol=1e-5)
    assert all(g["model"] == EdgeModel(bundle).name for g in got)
    # Test-time adaptation too: numpy views, onnxruntime patch tokens, numpy GS-Bias, still no torch.
    run = subprocess.run([sys.executable, "-m", "adaptclip.compression.edge", "classify", "--bundle", str(bundle),
                          *map(str, image_files), "--tta", "gs_bias", "--views", "6", "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    adapted = [json.loads(x) for x in run.stdout.splitlines()]
    assert len(adapted) == len(image_files)
    assert all(a["adaptation"]["views_encoded"] == 6 and not a["adaptation"]["global_only"] for a in adapted)


def test_cli_edge_scales_sixteen_bit_images_and_refuses_float_ones(bundle: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    grey = np.random.default_rng(0).integers(0, 65536, (40, 48), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")  # mode I;16: PIL's convert("RGB") would clip it white
    Image.fromarray(np.rint(grey / 257.0).astype(np.uint8)).convert("RGB").save(tmp_path / "eight.png")
    Image.new("F", (8, 8), 0.5).save(tmp_path / "float.tif")
    parser = argparse.ArgumentParser()
    cli_edge.add_parser(parser.add_subparsers(dest="command"))
    names = [str(tmp_path / n) for n in ("deep.png", "eight.png", "float.tif")]
    args = parser.parse_args(["edge", "classify", "--bundle", str(bundle), *names, "--json"])
    assert cli_edge.run(args) == 1
    out = capsys.readouterr()
    deep, eight = (json.loads(x) for x in out.out.splitlines())
    assert deep["top"] == eight["top"]
    assert "float.tif" in out.err and "mode F" in out.err
