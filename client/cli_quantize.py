"""`adaptclip quantize`: data-free (SPDFQ) or calibrated INT8/INT4 ONNX bundle for the edge runner."""
from __future__ import annotations

import argparse
import json
import sys

from adaptclip.client import flags


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantise a model's image tower into an ONNX edge bundle")
    flags.add_model_flags(p, placement=False)  # quantisation runs on the CPU, in fp32
    flags.add_label_flags(p)
    p.add_argument("--label-set-name", default="default", help="name of the label set in the bundle")
    p.add_argument("--calib", default="spdfq", help="spdfq (data-free, default) | gaussian | real:DIR")
    p.add_argument("--bits", choices=["w8a8", "w4a8"], default="w8a8")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR", help="bundle folder (new or empty)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration images")
    p.add_argument("--n-check", type=int, default=16, help="held-out images for the agreement check")
    p.add_argument("--check-images", metavar="DIR", help="real images for the agreement check instead")
    p.add_argument("--iters", type=int, default=500, help="SPDFQ synthesis iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-cosine", type=float, default=0.98,
                   help="fail unless the mean embedding cosine to fp32 on held-out images reaches this")
    p.add_argument("--ops", choices=["linear", "all"], default="linear", help="which ops get quantised")
    p.add_argument("--attention", choices=["fp32", "int8"], default="fp32", help="attention probabilities")
    p.add_argument("--full-range-weights", action="store_true",
                   help="int8 weights on all 8 bits; by default 7, because x86 CPUs without VNNI overflow on 8")
    p.add_argument("--calib-method", choices=["minmax", "percentile", "entropy"], default="minmax")
    p.add_argument("--threads", type=int, help="torch CPU threads for the synthesis (1 is fastest on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--adaptation-from", metavar="YAML",
                   help="record the adaptation defaults of this server config (or `adaptclip tune` result) in the "
                        "bundle: the `adaptation:` block of the entry for --model, or of its only entry")


def adaptation_block(path: str, model: str) -> dict:
    """The `adaptation:` block of the config entry serving `model` (same file name or served name), or of
    the only entry; ValueError when none or several match."""
    from pathlib import Path

    from adaptclip.server.config import load_config

    specs = load_config(path).models
    stem = Path(model).stem
    matching = [s for s in specs if Path(s.model).name == Path(model).name or s.name == stem
                or (s.bundle is None and s.model == model)]
    if len(matching) == 1 or len(specs) == 1:
        return dict((matching or specs)[0].adaptation)
    found = ", ".join(s.name or s.model for s in specs)
    raise ValueError(f"--adaptation-from {path}: {'no' if not matching else 'several'} model entries for {model} "
                     f"(entries: {found})")


def run(args: argparse.Namespace) -> int:
    from adaptclip.compression.bundle import BundleConfig, build_bundle
    from adaptclip.compression.export import ExportError, QuantConfig
    from adaptclip.compression.models import DEFAULT_TEMPLATES, ModelLoadError, ModelSpec, load_model
    from adaptclip.compression.spdfq import SynthesisConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.model:
        print("adaptclip quantize: --model is required (an open_clip name or a JSON model config)", file=sys.stderr)
        return 2
    labels, given = flags.labels_from_args(args)
    templates = tuple(given) or DEFAULT_TEMPLATES
    if not labels:
        print("adaptclip quantize: no labels given", file=sys.stderr)
        return 2
    try:
        adaptation = adaptation_block(args.adaptation_from, args.model) if args.adaptation_from else None
    except (OSError, ValueError) as exc:
        print(f"adaptclip quantize: {exc}", file=sys.stderr)
        return 2
    cfg = BundleConfig(calib=args.calib, n_calib=args.n_calib, n_check=args.n_check, check_images=args.check_images,
                       min_cosine=args.min_cosine,
                       quant=QuantConfig(bits=args.bits, ops=args.ops, calib_method=args.calib_method,
                                         attention=args.attention, reduce_range=not args.full_range_weights),
                       synthesis=SynthesisConfig(iters=args.iters, seed=args.seed, progress=not args.quiet),
                       adaptation=adaptation, adaptation_source=args.adaptation_from or "model config")
    try:
        hosted = load_model(ModelSpec(model=args.model, pretrained=args.pretrained, device="cpu",
                                      random_init=args.random_init))
        manifest = build_bundle(hosted, {args.label_set_name: (tuple(labels), templates)}, args.output, cfg)
    except (ModelLoadError, ExportError, ValueError, OSError) as exc:
        print(f"adaptclip quantize: {exc}", file=sys.stderr)
        return 1
    a, s = manifest["agreement"], manifest["sizes"]
    print(json.dumps({"bundle": args.output, "bits": args.bits, "calib": args.calib,
                      "cosine_mean": a["cosine_mean"], "cosine_min": a["cosine_min"],
                      "top1_agreement": a["top1_agreement"], "model_bytes": s["model_bytes"],
                      "fp32_onnx_bytes": s["fp32_onnx_bytes"], "patches": manifest["onnx"]["patches"] is not None,
                      "adaptation": manifest["adaptation"]["settings"]}))
    return 0
