"""`adaptclip eval DATA_DIR`: accuracy of zero-shot and test-time adaptation under synthetic shifts.

In process (no server): the model, its adaptation defaults (from --config or the official values)
and the evaluation engine `adaptclip.adapt.evaluate`, which runs the served code path. Writes
clip_benchmark-shaped JSON records (one per shift x method x gate x chunk) and prints acc1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptclip.client import flags


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="accuracy of zero-shot and TTA on a class-folder data set, under shifts")
    p.add_argument("data_dir", metavar="DATA_DIR", help="one subfolder of images per class")
    p.add_argument("--config", help="server YAML: its first model (and its adaptation defaults) is evaluated")
    flags.add_model_flags(p)
    flags.add_label_flags(p, required=False, what="class folder names in label order (default: sorted folder names)")
    d = p.add_argument_group("data")
    d.add_argument("--limit-per-class", type=int, help="seeded random subset of each class")
    d.add_argument("--shifts", type=_names, help="comma list (default: clean and the whole suite)")
    t = p.add_argument_group("adaptation (unset values take the model's defaults)")
    t.add_argument("--tta", type=_names, default=["none", "gs_bias", "zero", "tpt"],
                   help="comma list of methods: none,gs_bias,zero,tpt")
    t.add_argument("--views", type=int)
    t.add_argument("--crop-scale", type=float, nargs=2, metavar=("LO", "HI"))
    t.add_argument("--augmix", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--seed", type=int, help="views of image i use seed + i; shifts too")
    t.add_argument("--skip-entropy", type=_floats, default=[0.0], help="comma list of gate thresholds")
    t.add_argument("--view-chunk", type=_ints, default=[0], help="comma list of chunk sizes (0 = all views at once)")
    p.add_argument("--batch-images", type=int, default=16, help="images whose views share an encoder batch")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("-o", "--output", required=True, help="results JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from adaptclip.adapt.data import load_folder
    from adaptclip.adapt.evaluate import EvalPlan, evaluate
    from adaptclip.adapt.shifts import SHIFT_NAMES, get_shift
    from adaptclip.compression.models import DEFAULT_TEMPLATES, ModelLoadError, ModelSpec, load_model
    from adaptclip.server.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.output).resolve().parent.is_dir():  # before hours of evaluation, not after
        print(f"adaptclip eval: no folder for the output {args.output}", file=sys.stderr)
        return 2
    try:
        spec = flags.model_spec(args, load_config(args.config).default_model if args.config else ModelSpec())
        model = load_model(spec)
        classes, templates = flags.labels_from_args(args)
        data = load_folder(args.data_dir, classes or None, args.limit_per_class, seed=args.seed or 0)
        templates = tuple(templates) or DEFAULT_TEMPLATES
        changes = {k: v for k, v in (("views", args.views), ("augmix", args.augmix), ("seed", args.seed),
                                     ("crop_scale", tuple(args.crop_scale) if args.crop_scale else None))
                   if v is not None}
        base = model.adapt_defaults.replace(**changes).validate()
        plan = EvalPlan(methods=tuple(args.tta), shifts=tuple(get_shift(s) for s in (args.shifts or SHIFT_NAMES)),
                        skip_entropies=tuple(args.skip_entropy), view_chunks=tuple(args.view_chunk),
                        batch_images=args.batch_images)
    except (ValueError, OSError, ModelLoadError) as exc:
        print(f"adaptclip eval: {exc}", file=sys.stderr)
        return 2
    labels = tuple(c.replace("_", " ") for c in data.classes)
    classifier = model.classifier(labels, templates)
    records = evaluate(model, data, classifier, base, plan, model_name=spec.model, pretrained=str(spec.pretrained),
                       extra={"limit_per_class": args.limit_per_class},
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    Path(args.output).write_text(json.dumps(records, indent=1))
    for r in records:
        a, c = r["adaptation"], r["cost"]
        print(f"{r['shift']:<15} {r['method']:<8} skip<{a['skip_entropy']:<4g} chunk {a['view_chunk']:<3} "
              f"acc1 {100 * r['metrics']['acc1']:6.2f}  acc5 {100 * r['metrics']['acc5']:6.2f}  "
              f"views {c['views_encoded']:5.1f}  {c['per_image_ms']:8.1f} ms/image")
    print(f"wrote {len(records)} records to {args.output}", file=sys.stderr)
    return 0
