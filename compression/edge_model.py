"""An exported bundle on the edge: onnxruntime, numpy and Pillow only (the runner's CLI is compression/edge.py).

Preprocessing reimplements open_clip's inference transform (resize the shortest side with PIL
bicubic, centre crop, scale to [0, 1], normalise) so answers match the torch model; the text
classifiers come precomputed in the bundle, so no text tower is needed. Works with onnxruntime or
onnxruntime-gpu (the CUDA provider is used when present). Importing this module must never pull
torch or grpc: it is what runs on devices that have neither.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from adaptclip.adapt.images import to_rgb

# Format 2 adds the patch output (GS-Bias's spatial bias) and the recorded adaptation defaults; a
# format 1 bundle still loads, global-only, with no defaults of its own.
BUNDLE_FORMAT = "adaptclip-edge-bundle/2"
READABLE_FORMATS = ("adaptclip-edge-bundle/1", BUNDLE_FORMAT)
_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def preprocess_image(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic", resize_mode: str = "shortest") -> np.ndarray:
    """[3, size, size] float32, as open_clip's transform (torchvision Resize + CenterCrop on PIL) gives."""
    image = to_rgb(image)
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


def read_manifest(bundle_dir: str | Path) -> dict:
    """A bundle's manifest.json, its format checked: what a caller needs before opening the graph."""
    manifest_path = Path(bundle_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle: no manifest.json (make one with adaptclip quantize)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected one of "
                         f"{', '.join(READABLE_FORMATS)}")
    return manifest


def recorded_adaptation(manifest: dict) -> dict:
    """The adaptation defaults a manifest recorded at export ({} for format 1 bundles), as given there."""
    return dict((manifest.get("adaptation") or {}).get("settings") or {})


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class EdgeModel:
    """One exported bundle: the quantised image tower, its preprocessing and its label sets."""

    def __init__(self, bundle_dir: str | Path, providers: Sequence[str] | None = None, threads: int = 0,
                 spin: bool = True) -> None:
        """threads: onnxruntime's intra-op threads (0: its default, one per core). spin: whether its
        workers spin-wait between ops (onnxruntime's default: the quickest hand-offs while nothing else
        needs the cores; off where views render beside the encoder, `edge_tta.spin_while_adapting`)."""
        self.root = Path(bundle_dir)
        self.manifest = read_manifest(bundle_dir)
        self.spins = spin
        onnx_cfg = self.manifest["onnx"]
        import onnxruntime as ort  # here, not at import: the `adaptclip` CLI builds this parser on every call

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(self.root / onnx_cfg["file"]), opts,
                                            providers=list(providers or default_providers()))
        self.input_name, self.output_name = onnx_cfg["input"], onnx_cfg["output"]
        self.patches_name: str | None = onnx_cfg.get("patches")  # None: exported before format 2, or no ViT
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
    def has_patches(self) -> bool:
        """Whether the graph returns patch features (GS-Bias's spatial bias)."""
        return self.patches_name is not None

    @property
    def patch_note(self) -> str:
        """Why GS-Bias adapts the global bias only, or "" when it need not."""
        if self.has_patches:
            return ""
        if self.manifest.get("format") != BUNDLE_FORMAT:
            return f"bundle format {self.manifest.get('format')} has no patch output (re-export it): global bias only"
        return "the exported tower has no patch tokens: global bias only"

    @property
    def adaptation(self) -> dict:
        """The adaptation defaults recorded at export ({} for format 1 bundles), as given there."""
        return recorded_adaptation(self.manifest)

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
        return self.encode(pixels)[0]

    def encode(self, pixels: np.ndarray, with_patches: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings [N, D] and, when asked and the graph has them, patch features [N, P, D] (not normalised)."""
        names = [self.output_name, self.patches_name] if with_patches and self.has_patches else [self.output_name]
        out = self.session.run(names, {self.input_name: np.ascontiguousarray(pixels, np.float32)})
        return out[0], out[1] if len(out) > 1 else None

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
            probs = softmax(logits)
            for row_l, row_p in zip(logits, probs):
                order = np.argsort(-row_p, kind="stable")[:max(1, min(top_k, len(labels)))]
                results.append([{"label": labels[i], "probability": float(row_p[i]), "logit": float(row_l[i])}
                                for i in order])
        return results
