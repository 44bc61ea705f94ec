"""`adaptclip tune DATA_DIR`: pick a model's adaptation defaults on labelled data and write a server config.

    adaptclip tune /data/train --model cfg.json --pretrained w.pt [--labels-file F] [--templates-file F]
        [--minutes 20] [--seed 0] -o tuned.yaml
    adaptclip serve --config tuned.yaml

The search and the rule are adapt/tune.py's; this module loads the model and data, shows progress and
writes the YAML: the model entry with the picked `adaptation:` block, and a `tuned:` record of what
was measured (the server reads the record as documentation only).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from adaptclip.client import flags


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"view counts must be integers >= 2, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="pick a model's adaptation defaults on labelled class folders; "
                                           "writes a server config")
    p.add_argument("data_dir", metavar="DATA_DIR", help="one subfolder of labelled images per class")
    p.add_argument("--config", help="server YAML whose first model is tuned (flags override it)")
    flags.add_model_flags(p)
    p.add_argument("--name", help="served model name in the written config")
    flags.add_label_flags(p, required=False, what="class folder names in label order (default: sorted folder names)")
    p.add_argument("--minutes", type=float, default=20.0, help="time budget; sets how many images are used (default 20)")
    p.add_argument("--seed", type=int, default=0, help="image order, split and views (same seed and images, same file)")
    p.add_argument("--per-class", type=int, help="images per class to use (default: as many as --minutes allows); "
                                                 "fixed, the result does not depend on the machine's speed")
    p.add_argument("--views", type=_ints, default=[8, 16, 32], help="view counts tried, comma list (default 8,16,32)")
    p.add_argument("--max-views", type=float, default=64.0, help="cost bound: mean views encoded per image")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("-o", "--output", required=True, help="server config YAML to write")


def run(args: argparse.Namespace) -> int:
    import torch
    import yaml
    from adaptclip.adapt.data import load_folder
    from adaptclip.adapt.tune import TunePlan, default_view_configs, tune
    from adaptclip.compression.models import (
        DEFAULT_TEMPLATES,
        ModelLoadError,
        ModelSpec,
        load_model,
    )
    from adaptclip.server.config import load_config
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    if not out.resolve().parent.is_dir():
        print(f"adaptclip tune: no folder for the output {args.output}", file=sys.stderr)
        return 2
    if args.minutes <= 0:
        print(f"adaptclip tune: --minutes must be > 0, got {args.minutes}", file=sys.stderr)
        return 2
    try:
        spec = flags.model_spec(args, load_config(args.config).default_model if args.config else ModelSpec())
        if spec.bundle:
            raise ValueError("tune a torch model (--model/--pretrained); bundles record the defaults at export")
        classes, templates = flags.labels_from_args(args)
        data = load_folder(args.data_dir, classes or None, seed=args.seed)
        model = load_model(spec)
    except (ValueError, OSError, ModelLoadError) as exc:
        print(f"adaptclip tune: {exc}", file=sys.stderr)
        return 2
    labels = tuple(c.replace("_", " ") for c in data.classes)
    classifier = model.classifier(labels, tuple(templates) or DEFAULT_TEMPLATES)
    plan = TunePlan(view_configs=default_view_configs(model.image_size), views=tuple(args.views),
                    max_views=args.max_views)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, file=sys.stderr,
                                                             unit=" rounds" if stage == "encode" else " parts"))
        bar.update(done - bar.n)

    result = tune(model, data, classifier, plan, minutes=args.minutes, seed=args.seed, per_class=args.per_class,
                  progress=progress)
    for bar in bars.values():
        bar.close()
    entry = model_entry(spec, args.name, result.chosen)
    doc = {"models": [entry], "tuned": record(result, args, plan)}
    header = (f"# written by `adaptclip tune` on {time.strftime('%Y-%m-%d %H:%M')} from {args.data_dir}\n"
              f"# serve it: adaptclip serve --config {out.name}\n")
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    summary(result, out)
    return 0


def model_entry(spec: Any, name: str | None, chosen: Any) -> dict[str, Any]:
    """The model's config entry with every picked setting in its `adaptation:` block (the seed aside), so
    later changes to the untuned defaults do not change what was tuned."""
    entry: dict[str, Any] = {"model": spec.model, "pretrained": spec.pretrained}
    if name or spec.name:
        entry["name"] = name or spec.name
    for key in ("device", "precision", "keep_rate", "kernels"):
        if getattr(spec, key) != getattr(type(spec)(), key):
            entry[key] = getattr(spec, key)
    entry["adaptation"] = settings_block(chosen)
    return entry


def settings_block(s: Any) -> dict[str, Any]:
    """Every AdaptSettings field but the seed, YAML-ready."""
    from adaptclip.adapt.settings import AdaptSettings

    block = {f.name: getattr(s, f.name) for f in dataclasses.fields(AdaptSettings) if f.name != "seed"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in block.items()}


def record(result: Any, args: argparse.Namespace, plan: Any) -> dict[str, Any]:
    """What was measured, for the file's reader: the rule, the data, gains per shift, cost."""
    def gains(p: Any) -> dict[str, float] | None:
        return None if p is None else {k: round(v, 2) for k, v in p.gains.items()}

    def errors(p: Any) -> dict[str, float] | None:
        return None if p is None else {k: round(v, 2) for k, v in p.errors.items()}

    return {
        "rule": f"largest mean gain over zero-shot on the tune part, every shift's gain less {plan.shift_se:g} paired "
                f"standard error(s) >= {plan.min_shift_gain:g} points, <= {plan.max_views:g} views per image; of the "
                f"candidates within {plan.mean_se:g} standard error(s) of the best mean, the best worst shift; checked "
                f"on the held-out part: every shift's gain plus {plan.shift_se:g} standard error(s) >= "
                f"{plan.min_shift_gain:g}, mean >= 0, the same views bound",
        "accepted": result.accepted, "data": str(args.data_dir), "seed": args.seed, "minutes": args.minutes,
        "per_class": args.per_class,
        "images": {"tune": result.images[0], "held_out": result.images[1]},
        "candidates_scored": result.candidates, "encoder_ms_per_view": round(result.ms_per_view, 2),
        "seconds": round(result.seconds, 1),
        "pick": None if result.pick is None else settings_block(result.pick.settings),  # served only if accepted
        "tune_part": None if result.pick is None else {
            "gain_per_shift": gains(result.pick), "standard_error": errors(result.pick),
            "mean_gain": round(result.pick.mean_gain, 2), "mean_gain_standard_error": round(result.pick.mean_error, 2),
            "views_per_image": round(result.pick.views_per_image, 1)},
        "held_out_part": None if result.check is None else {
            "gain_per_shift": gains(result.check), "standard_error": errors(result.check),
            "mean_gain": round(result.check.mean_gain, 2),
            "views_per_image": round(result.check.views_per_image, 1)},
    }


def summary(result: Any, out: Path) -> None:
    s = result.chosen
    if result.pick is None:
        print("no candidate passed the rule on the tune part: the model's default method is none", file=sys.stderr)
    elif not result.accepted:
        print(f"the pick failed the held-out check (mean {result.check.mean_gain:+.2f}, worst "
              f"{min(result.check.gains.values()):+.2f}): the model's default method is none", file=sys.stderr)
    else:
        print(f"picked {s.method}, {s.views} views, crop {s.crop_scale}, augmix {s.use_augmix}: tune part "
              f"{result.pick.mean_gain:+.2f}, held-out {result.check.mean_gain if result.check else float('nan'):+.2f} "
              f"points over zero-shot", file=sys.stderr)
    print(f"wrote {out} in {result.seconds:.0f} s", file=sys.stderr)
