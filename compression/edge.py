"""Torch-free edge runner for exported bundles: onnxruntime, numpy and Pillow only.

    python -m adaptclip.compression.edge classify --bundle DIR IMAGE... [--tta gs_bias|zero|none]
        [--views N] [--seed S] [--top-k K] [--json]

Zero-shot (`--tta none`) batches images through the bundle's graph (compression/edge_model.py);
with a method each image is adapted at test time (compression/edge_tta.py), with the bundle's
recorded adaptation defaults under the flags. Works with onnxruntime or onnxruntime-gpu (the CUDA
provider is used when present). Importing this module must never pull torch or grpc: it is what
runs on devices that have neither.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from adaptclip.adapt.images import UnsupportedImage, to_rgb
from adaptclip.adapt.settings import METHODS
from adaptclip.compression.edge_model import EdgeModel, read_manifest, recorded_adaptation, softmax
from adaptclip.compression.edge_tta import EdgeAdapter, EdgeAnswer, edge_settings, spin_while_adapting


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--bundle", required=True, help="bundle folder written by adaptclip quantize")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--label-set", help="label set name in the bundle (default: its first)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument("--batch", type=int, default=32, help="images per encoder call (zero-shot)")
    tta = p.add_argument_group("test-time adaptation (unset values take the bundle's recorded defaults)")
    tta.add_argument("--tta", choices=[m for m in METHODS if m != "tpt"],
                     help="adaptation method (default: the bundle's, else none)")
    tta.add_argument("--views", type=int, help="views per image, the original included")
    tta.add_argument("--seed", type=int, help="view sampling seed (same seed, same answer)")
    tta.add_argument("--skip-entropy", type=float, help="answer zero-shot when normalised entropy is below this")
    tta.add_argument("--view-chunk", type=int, help="encode views this many at a time, stop once selected views agree")


def _top(labels: Sequence[str], logits: np.ndarray, probs: np.ndarray, k: int) -> list[dict]:
    """Top-k by probability, ties broken by logit (ZERO's votes tie often), as the server's fill_top."""
    order = sorted(range(len(labels)), key=lambda i: (-float(probs[i]), -float(logits[i])))[:max(1, k)]
    return [{"label": labels[i], "probability": float(probs[i]), "logit": float(logits[i])} for i in order]


def answer_record(path: str, model: EdgeModel, labels: Sequence[str], answer: EdgeAnswer, k: int,
                  ignored: Sequence[str]) -> dict:
    """The JSON line of one adapted image, shaped like `adaptclip classify --json`'s."""
    rec = {"image": path, "top": _top(labels, answer.logits, answer.probs, k), "model": model.name}
    if answer.report["method"] != "none":
        rec["zero_shot_top"] = _top(labels, answer.zero_shot, softmax(answer.zero_shot), k)
        rec["adaptation"] = {**answer.report, "adapt_ms": answer.timings_ms["adapt_ms"],
                             "ignored_settings": list(ignored)}
    rec["timings_ms"] = {k2: round(v, 3) for k2, v in answer.timings_ms.items()}
    return rec


def _print(rec: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rec), flush=True)
        return
    print(f"{rec['image']}  (model {rec['model']}, edge bundle)")
    for rank, s in enumerate(rec["top"], 1):
        print(f"  {rank:>2}. {s['label']:<30} {s['probability'] * 100:6.2f}%  logit {s['logit']:8.4f}")
    if "adaptation" in rec:
        a = rec["adaptation"]
        print(f"  adaptation: {a['method']}, {a['views_encoded']} views, {a['steps_run']} steps"
              + (", skipped" if a["skipped"] else "") + (", global only" if a["global_only"] else "")
              + (f" ({a['note']})" if a["note"] else ""))


def _open(paths: Sequence[str]) -> Iterator[tuple[str, Image.Image | None]]:
    """(path, RGB image) per file; None (and a line on stderr) for one that cannot be read."""
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
                rgb = im.copy() if rgb is im else rgb  # closing the file frees the pixels it loaded
        except (OSError, UnsupportedImage) as exc:
            print(f"adaptclip edge: {path}: {exc}", file=sys.stderr)
            rgb = None
        yield path, rgb


def run_classify(args: argparse.Namespace) -> int:
    """Classify image files with a bundle; prints like `adaptclip classify`. Exit 1 if any image failed."""
    try:
        manifest = read_manifest(args.bundle)  # the settings first: they decide how the graph's threads wait
        settings, ignored = edge_settings(recorded_adaptation(manifest), {
            "method": args.tta, "views": args.views, "seed": args.seed, "skip_entropy": args.skip_entropy,
            "view_chunk": args.view_chunk}, int(manifest["preprocess"]["size"]))
        model = EdgeModel(args.bundle, spin=spin_while_adapting(settings))
        labels, _ = model.label_set(args.label_set)
    except (OSError, ValueError, KeyError) as exc:  # FieldError is a ValueError naming the field
        print(f"adaptclip edge: {exc}", file=sys.stderr)
        return 2
    if ignored:
        print(f"adaptclip edge: bundle adaptation setting(s) not applied on the edge: {', '.join(ignored)}",
              file=sys.stderr)
    failed = 0
    if settings.method == "none":
        for start in range(0, len(args.images), args.batch):
            opened = [(p, im) for p, im in _open(args.images[start:start + args.batch])]
            failed += sum(im is None for _, im in opened)
            good = [(p, im) for p, im in opened if im is not None]
            tops = model.classify([im for _, im in good], args.top_k, args.label_set, args.batch) if good else []
            for (path, _), top in zip(good, tops):
                _print({"image": path, "top": top, "model": model.name}, args.json)
        return 1 if failed else 0
    with EdgeAdapter(model, settings, args.label_set) as adapter:
        for path, image in _open(args.images):
            if image is None:
                failed += 1
                continue
            _print(answer_record(path, model, labels, adapter.classify(image), args.top_k, ignored), args.json)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptclip.compression.edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_classify_arguments(sub.add_parser("classify", help="classify images with an exported bundle"))
    args = parser.parse_args(argv)
    return run_classify(args)


if __name__ == "__main__":
    sys.exit(main())

