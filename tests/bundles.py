"""Tiny INT8 bundles for tests: built fast from the tiny model, and their format-1 (older) twin."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adaptclip.compression.bundle import BundleConfig, build_bundle
from adaptclip.compression.export import QuantConfig
from adaptclip.compression.models import TorchModel
from adaptclip.compression.spdfq import SynthesisConfig


def tiny_bundle(hosted: TorchModel, out: Path, label_sets: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
                iters: int = 2, **config: Any) -> Path:
    """A W8A8 bundle of `hosted` in `out`, on a few Gaussian calibration images (seconds, not minutes)."""
    cfg = BundleConfig(calib="gaussian", n_calib=8, n_check=4, min_cosine=0.9, quant=QuantConfig(bits="w8a8"),
                       synthesis=SynthesisConfig(iters=iters, progress=False), **config)
    build_bundle(hosted, label_sets, out, cfg)
    return out


def as_format_one(bundle: Path, out: Path) -> Path:
    """The bundle as format 1 wrote it: no patch output named, no recorded adaptation defaults."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = "adaptclip-edge-bundle/1"
    del manifest["onnx"]["patches"], manifest["adaptation"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
