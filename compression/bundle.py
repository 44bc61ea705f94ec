"""Quantise a hosted model into an edge bundle: calibration, export, QDQ, agreement check, files.

A bundle is a folder the torch-free edge runner (compression/edge.py) can use on its own:

    manifest.json            format, model source, preprocessing, logit scale, label sets,
                             adaptation defaults, quantisation settings, agreement with fp32, sizes, versions
    model.onnx               the quantised image tower (pixels [N,3,S,S] -> embedding [N,D], and for
                             ViT towers patches [N,P,D]: every patch token through ln_post and the
                             projection, for GS-Bias's spatial bias; format 1 bundles lack it)
    label_sets/NAME.json     labels and templates
    label_sets/NAME.npy      the precomputed zero-shot text classifier [C, D] (no text tower needed)

Nothing is written to the output folder unless the quantised model agrees with fp32.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import torch

from adaptclip.adapt.settings import AdaptSettings, FieldError, settings_from_dict
from adaptclip.compression.export import (INPUT_NAME, OUTPUT_NAME, PATCHES_NAME, SIMULATED_ONLY, Agreement,
                                          QuantConfig, agreement, check_agreement, export_image_tower, quantize,
                                          run_onnx, session, torch_embeddings)
from adaptclip.compression.edge_model import BUNDLE_FORMAT
from adaptclip.compression.spdfq import SynthesisConfig, gaussian_images, real_images, synthesize
from adaptclip.compression.models import TorchModel

SUPPORTED_RESIZE = ("shortest", "squash")


@dataclass
class BundleConfig:
    """Everything `adaptclip quantize` decides besides the model and the label sets."""

    calib: str = "spdfq"  # spdfq | gaussian | real:DIR
    n_calib: int = 32
    n_check: int = 16  # held-out images of the same source for the agreement check
    check_images: str | None = None  # a folder of real images for the check instead
    min_cosine: float = 0.98
    opset: int = 17
    quant: QuantConfig = field(default_factory=QuantConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    # The model's test-time adaptation defaults, recorded as given (a plain dict: fields a newer
    # adaptclip added are kept, the edge applies those it knows); None = the model spec's block.
    adaptation: dict | None = None
    adaptation_source: str = "model config"


def calibration_images(source: str, hosted: TorchModel, classifier: torch.Tensor, n: int,
                       synthesis: SynthesisConfig) -> torch.Tensor:
    """n images [n, 3, S, S] (normalised) from `spdfq`, `gaussian` or `real:DIR`."""
    if source == "spdfq":
        cfg = replace(synthesis, n=n)
        return synthesize(hosted.module, classifier, hosted.logit_scale, hosted.mean, hosted.std, hosted.image_size, cfg)
    if source == "gaussian":
        return gaussian_images(n, hosted.image_size, synthesis.seed)
    if source.startswith("real:"):
        return real_images(source[len("real:"):], hosted.preprocess, n, synthesis.seed)
    raise ValueError(f"calibration source must be spdfq, gaussian or real:DIR, not {source!r}")


def preprocess_params(hosted: TorchModel) -> dict:
    """open_clip's inference transform, as parameters the numpy preprocessing reproduces."""
    cfg = open_clip.get_model_preprocess_cfg(hosted.module)
    size = cfg.get("size", hosted.image_size)
    size = list(size) if isinstance(size, (tuple, list)) else [size, size]
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in SUPPORTED_RESIZE or size[0] != size[1]:
        raise ValueError(f"edge preprocessing supports square inputs with resize mode {' or '.join(SUPPORTED_RESIZE)}; "
                         f"this model has size {size}, resize mode {resize_mode!r}")
    return {"size": int(size[0]), "mean": list(hosted.mean), "std": list(hosted.std),
            "interpolation": cfg.get("interpolation", "bicubic"), "resize_mode": resize_mode, "mode": "RGB"}


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in [path, *path.parent.glob(path.name + ".data")] if p.exists())


def build_bundle(hosted: TorchModel, label_sets: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
                 out_dir: str | Path, cfg: BundleConfig) -> dict:
    """Calibrate, export, quantise, check against fp32 and write the bundle; returns the manifest.

    The first label set's classifier steers the SPDFQ synthesis. Raises ExportError (nothing
    written) when the mean embedding cosine to fp32 on the held-out images is below cfg.min_cosine.
    """
    if not label_sets:
        raise ValueError("at least one label set is needed (the text classifier plays the classifier head)")
    if hosted.device.type != "cpu":
        raise ValueError(f"quantisation runs on CPU (synthesis, export and onnxruntime calibration); load the model "
                         f"with device cpu, not {hosted.device}")
    cfg.quant.validate()
    adaptation = _adaptation(hosted, cfg)
    if cfg.quant.bits in SIMULATED_ONLY:
        raise ValueError(f"{cfg.quant.bits} has no onnxruntime kernels (int4 activations): it is for accuracy "
                         f"studies (bench/quantize.py), not bundles; use w8a8 or w4a8")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} is not empty")
    started = time.perf_counter()
    hosted.module.float().eval()
    classifiers = {name: hosted.classifier(labels, templates) for name, (labels, templates) in label_sets.items()}
    first = next(iter(classifiers.values()))
    n_check = 0 if cfg.check_images else cfg.n_check
    images = calibration_images(cfg.calib, hosted, first, cfg.n_calib + n_check, cfg.synthesis)
    calib, held_out = images[:cfg.n_calib], images[cfg.n_calib:]
    if cfg.check_images:
        held_out = real_images(cfg.check_images, hosted.preprocess, cfg.n_check, cfg.synthesis.seed + 1)
    if len(held_out) == 0:
        raise ValueError(f"no held-out images for the agreement check (the source gave {len(images)} images, "
                         f"{cfg.n_calib} of them for calibration)")
    calibrated_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = export_image_tower(hosted.module, work / "fp32.onnx", hosted.image_size, cfg.opset)
        (work / "bundle").mkdir()
        model_path = quantize(fp32, work / "bundle" / "model.onnx", calib.numpy(), cfg.quant)
        ref = torch_embeddings(hosted.module, held_out)
        class_np = {k: v.numpy() for k, v in classifiers.items()}
        result = agreement(ref, run_onnx(session(model_path), held_out.numpy()), class_np)
        check_agreement(result, cfg.min_cosine, f"the {cfg.quant.bits.upper()} model ({cfg.calib} calibration)")
        patches = _patch_agreement(hosted, model_path, held_out)
        manifest = _write_files(work / "bundle", hosted, label_sets, class_np, cfg, result, patches, adaptation,
                                fp32_bytes=_file_bytes(fp32), calibrated_s=calibrated_s,
                                total_s=time.perf_counter() - started)
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in (work / "bundle").iterdir():
            shutil.move(str(item), out_dir / item.name)
    return manifest


def _patch_agreement(hosted: TorchModel, model_path: Path, held_out: torch.Tensor) -> dict | None:
    """Cosine of the quantised patch features to fp32's on the held-out images (None: no patch output)."""
    if not hosted.has_patches:
        return None
    ref = torch_embeddings(hosted.module, held_out, patches=True)
    got = run_onnx(session(model_path), held_out.numpy(), output=PATCHES_NAME)
    result = agreement(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]), {})
    return {"cosine_mean": round(result.cosine_mean, 6), "cosine_min": round(result.cosine_min, 6),
            "n_patches": result.n_images}


def _adaptation(hosted: TorchModel, cfg: BundleConfig) -> dict:
    """The recorded defaults: the known fields checked now (a bad value fails the export, not the edge),
    every field kept as given."""
    block = dict(hosted.spec.adaptation if cfg.adaptation is None else cfg.adaptation)
    known = {f.name for f in fields(AdaptSettings)}
    try:
        settings_from_dict({k: v for k, v in block.items() if k in known})
    except FieldError as exc:
        raise ValueError(f"adaptation defaults ({cfg.adaptation_source}): {exc}") from None
    return {"settings": block, "source": cfg.adaptation_source}


def _write_files(folder: Path, hosted: TorchModel, label_sets: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
                 classifiers: dict[str, np.ndarray], cfg: BundleConfig, result: Agreement, patches: dict | None,
                 adaptation: dict, fp32_bytes: int, calibrated_s: float, total_s: float) -> dict:
    (folder / "label_sets").mkdir()
    entries = []
    for name, (labels, templates) in label_sets.items():
        (folder / "label_sets" / f"{name}.json").write_text(
            json.dumps({"labels": list(labels), "templates": list(templates)}, ensure_ascii=False, indent=1))
        np.save(folder / "label_sets" / f"{name}.npy", classifiers[name].astype(np.float32))
        entries.append({"name": name, "labels": f"label_sets/{name}.json", "classifier": f"label_sets/{name}.npy",
                        "num_labels": len(labels)})
    model_bytes = _file_bytes(folder / "model.onnx")
    held = f"real:{cfg.check_images}" if cfg.check_images else f"held-out {cfg.calib}"
    manifest = {
        "format": BUNDLE_FORMAT,
        "model": {"name": hosted.name, "source": hosted.spec.model, "pretrained": hosted.spec.pretrained,
                  "random_init": hosted.spec.random_init, "fingerprint": hosted.fingerprint,
                  "embed_dim": hosted.embed_dim},
        "onnx": {"file": "model.onnx", "input": INPUT_NAME, "output": OUTPUT_NAME,
                 "patches": PATCHES_NAME if patches is not None else None, "export_opset": cfg.opset,
                 "opset": next(d.version for d in onnx.load(str(folder / "model.onnx")).opset_import
                               if d.domain in ("", "ai.onnx"))},
        "preprocess": preprocess_params(hosted),
        "logit_scale": hosted.logit_scale,
        "logit_bias": hosted.logit_bias,
        "label_sets": entries,
        "adaptation": adaptation,
        "quantization": {**asdict(cfg.quant), "format": "QDQ", "weights": "per-channel" if cfg.quant.per_channel else "per-tensor",
                         "activations": "static per-tensor", "calibration": cfg.calib, "n_calib": cfg.n_calib,
                         **({"synthesis": asdict(cfg.synthesis)} if cfg.calib == "spdfq" else {})},
        "agreement": {"against": "fp32 torch", "images": held, "min_cosine": cfg.min_cosine, **result.as_dict(),
                      "patches": patches},
        "sizes": {"model_bytes": model_bytes, "fp32_onnx_bytes": fp32_bytes,
                  "ratio": round(model_bytes / fp32_bytes, 4) if fp32_bytes else None},
        "timings_s": {"calibration_images": round(calibrated_s, 2), "total": round(total_s, 2)},
        "versions": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
                     "open_clip": open_clip.__version__},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest
