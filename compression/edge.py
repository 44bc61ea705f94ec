"""Torch-free edge runner for exported bundles: onnxruntime, numpy and Pillow only.

    python -m adaptclip.compression.edge classify --bundle DIR IMAGE... [--top-k K] [--json]

Preprocessing reimplements open_clip's inference transform (resize the shortest side with PIL
bicubic, centre crop, scale to [0, 1], normalise) so answers match the torch model; the text
classifiers come precomputed in the bundle, so no text tower is needed. Works with onnxruntime or
onnxruntime-gpu (the CUDA provider is used when present). Importing this module must never pull
torch or grpc: it is what runs on devices that have neither.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

BUNDLE_FORMAT = "adaptclip-edge-bundle/1"
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def preprocess_image(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic", resize_mode: str = "shortest") -> np.ndarray:
    """[3, size, size] float32, as open_clip's transform (torchvision Resize + CenterCrop on PIL) gives."""
    image = image.convert("RGB")
    resample = _INTERPOLATION[interpolation]
    w, h = image.size
    if resize_mode == "squash":
        image = image.resize((size, size), resample)
    elif resize_mode == "shortest":
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample)
        w, h = image.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"resize mode {resize_mode!r} is not supported (shortest or squash)")
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class EdgeModel:
    """One exported bundle: the quantised image tower, its preprocessing and its label sets."""

    def __init__(self, bundle_dir: str | Path, providers: Sequence[str] | None = None) -> None:
        self.root = Path(bundle_dir)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{bundle_dir} is not a bundle: no manifest.json (make one with adaptclip quantize)")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        onnx_cfg = self.manifest["onnx"]
        import onnxruntime as ort  # here, not at import: the `adaptclip` CLI builds this parser on every call

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.root / onnx_cfg["file"]), opts,
                                            providers=list(providers or default_providers()))
        self.input_name, self.output_name = onnx_cfg["input"], onnx_cfg["output"]
        self.pre = self.manifest["preprocess"]
        self.logit_scale = float(self.manifest["logit_scale"])
        bias = self.manifest.get("logit_bias")
        self.logit_bias = None if bias is None else float(bias)
        self._label_sets: dict[str, tuple[list[str], np.ndarray]] = {}
        self.templates: dict[str, list[str]] = {}  # each label set's prompt templates (informational here)
        for entry in self.manifest["label_sets"]:
            data = json.loads((self.root / entry["labels"]).read_text(encoding="utf-8"))
            weights = np.load(self.root / entry["classifier"]).astype(np.float32)
            self._label_sets[entry["name"]] = (data["labels"], weights)
            self.templates[entry["name"]] = list(data.get("templates", []))

    @property
    def name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def image_size(self) -> int:
        return int(self.pre["size"])

    @property
    def label_set_names(self) -> list[str]:
        return list(self._label_sets)

    def label_set(self, name: str | None = None) -> tuple[list[str], np.ndarray]:
        """(labels, classifier [C, D]) of a label set; the first one by default."""
        key = name or self.label_set_names[0]
        if key not in self._label_sets:
            raise KeyError(f"label set {key!r} not in the bundle (has: {', '.join(self._label_sets)})")
        return self._label_sets[key]

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess_image(image, self.image_size, self.pre["mean"], self.pre["std"],
                                self.pre.get("interpolation", "bicubic"), self.pre.get("resize_mode", "shortest"))

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] preprocessed -> [N, D] embeddings, not normalised (like HostedModel.encode_images)."""
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(pixels, np.float32)})[0]

    def logits(self, feats: np.ndarray, label_set: str | None = None) -> np.ndarray:
        """Zero-shot logits with the model's own scale (and bias), as open_clip computes them."""
        _, weights = self.label_set(label_set)
        unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True).clip(1e-12)
        out = self.logit_scale * unit @ weights.T
        return out + self.logit_bias if self.logit_bias is not None else out

    def classify(self, images: Sequence[Image.Image], top_k: int = 5, label_set: str | None = None,
                 batch: int = 32) -> list[list[dict]]:
        """Top-k [{label, probability, logit}] per image."""
        labels, _ = self.label_set(label_set)
        results: list[list[dict]] = []
        for start in range(0, len(images), batch):
            pixels = np.stack([self.preprocess(im) for im in images[start:start + batch]])
            logits = self.logits(self.encode_images(pixels), label_set)
            probs = _softmax(logits)
            for row_l, row_p in zip(logits, probs):
                order = np.argsort(-row_p, kind="stable")[:max(1, min(top_k, len(labels)))]
                results.append([{"label": labels[i], "probability": float(row_p[i]), "logit": float(row_l[i])}
                                for i in order])
        return results


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--bundle", required=True, help="bundle folder written by adaptclip quantize")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--label-set", help="label set name in the bundle (default: its first)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument("--batch", type=int, default=32, help="images per encoder call")


def run_classify(args: argparse.Namespace) -> int:
    """Classify image files with a bundle; prints like `adaptclip classify`. Exit 1 if any image failed."""
    try:
        model = EdgeModel(args.bundle)
        model.label_set(args.label_set)
    except (OSError, ValueError, KeyError) as exc:
        print(f"adaptclip edge: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for start in range(0, len(args.images), args.batch):
        paths, images = [], []
        for path in args.images[start:start + args.batch]:
            try:
                with Image.open(path) as im:
                    im.load()
                    images.append(im.convert("RGB"))
                paths.append(path)
            except OSError as exc:
                failed += 1
                print(f"adaptclip edge: {path}: {exc}", file=sys.stderr)
        for path, top in zip(paths, model.classify(images, args.top_k, args.label_set, args.batch) if images else []):
            if args.json:
                print(json.dumps({"image": path, "top": top, "model": model.name}), flush=True)
            else:
                print(f"{path}  (model {model.name}, edge bundle)")
                for rank, s in enumerate(top, 1):
                    print(f"  {rank:>2}. {s['label']:<30} {s['probability'] * 100:6.2f}%  logit {s['logit']:8.4f}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptclip.compression.edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_classify_arguments(sub.add_parser("classify", help="classify images with an exported bundle"))
    args = parser.parse_args(argv)
    return run_classify(args)


if __name__ == "__main__":
    sys.exit(main())
