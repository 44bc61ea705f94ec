"""fp16 and bf16 against fp32 on the CIFAR model, on the CPU, through the served code path (adapt/evaluate.py).

For each precision the model is loaded as the server loads it (`load_model`, open_clip's mixed precision:
the encoder in the half type, LayerNorms and embeddings fp32, the adaptation math fp32) with
examples/cifar-clip.yaml's adaptation block, and `adapt.evaluate.Run` scores the clean test images:

1. zero-shot on --zs-per-class images per class (all 10k by default): top-1 agreement with fp32, accuracy;
2. GS-Bias with the YAML's settings (64 views, its gate and view chunks) on --gs-per-class per class:
   accuracy against fp32's on the same images, and per-image agreement of the adapted top-1;
3. ZERO, TPT and GS-Bias, every image adapted (no gate, all views), on --peers-per-class per class: every
   method answers in every precision; top-1 agreement with fp32.

    .venv/bin/python bench/precision.py --data /tmp/data/test --model-dir ../shared/models/cifar-clip \\
        --gs-per-class 100 --out bench/results/precision-cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "fp16", "bf16")


def load(model_dir: Path, precision: str, adaptation: dict[str, Any]):
    """The CIFAR model in `precision` on the CPU, with its served adaptation defaults, and its classifier."""
    from adaptclip.client.client import load_lines
    from adaptclip.compression.models import ModelSpec, load_model

    json_file = next(model_dir.glob("*.json"))
    spec = ModelSpec(model=str(json_file), pretrained=str(json_file.with_suffix(".pt")), device="cpu",
                     precision=precision, adaptation=dict(adaptation), kernels="torch")
    model = load_model(spec)
    classes = load_lines(model_dir / "classes.txt")
    classifier = model.classifier([c.replace("_", " ") for c in classes], load_lines(model_dir / "templates.txt"))
    return model, classes, classifier


def score(model, data, classifier, methods: tuple[str, ...], batch_images: int, gated: bool = True) -> dict[str, Any]:
    """Top-1 per image of each method through adapt.evaluate.Run: with the YAML's gate and chunks, or
    (gated=False) with every image adapted over all its views."""
    from adaptclip.adapt.evaluate import EvalPlan, Run
    from adaptclip.adapt.shifts import get_shift

    base = model.adapt_defaults
    plan = EvalPlan(methods=methods, shifts=(get_shift("clean"),),
                    skip_entropies=(base.skip_entropy if gated else 0.0,),
                    view_chunks=(base.view_chunk if gated else 0,), batch_images=batch_images)
    run = Run(model, data, classifier, base, plan)
    start = time.perf_counter()
    images = run.shift(plan.shifts[0])
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"seconds": seconds, "images": len(images), "labels": [img.label for img in images]}
    for s in run.settings:
        out[s.method] = {"top1": [img.scored[s].top[0] for img in images],
                         "skipped": sum(img.scored[s].skipped for img in images),
                         "views": sum(img.scored[s].views for img in images) / len(images)}
    return out


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def accuracy(top1: list[int], labels: list[int]) -> float:
    return sum(x == y for x, y in zip(top1, labels)) / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/data/test", help="class-folder test set (CIFAR-10 test)")
    p.add_argument("--model-dir", type=Path, default=ROOT.parent / "shared" / "models" / "cifar-clip")
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "cifar-clip.yaml",
                   help="its first model's adaptation block is used")
    p.add_argument("--zs-per-class", type=int, default=0, help="zero-shot images per class (0: all, -1: none)")
    p.add_argument("--gs-per-class", type=int, default=5, help="GS-Bias images per class")
    p.add_argument("--peers-per-class", type=int, default=2, help="ZERO and TPT images per class")
    p.add_argument("--subset-seed", type=int, default=1, help="which GS-Bias images (seeded sample per class)")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (a shared machine: 1)")
    p.add_argument("--batch-images", type=int, default=16)
    p.add_argument("--out", type=Path, help="write the results here (JSON)")
    p.add_argument("--merge", type=Path, nargs="+", help="only print the table of these result files together "
                                                         "(runs of some precisions each; one holds fp32)")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        merged = {**parts[0], "precisions": {}, "command": [part["command"] for part in parts]}
        for precision in PRECISIONS:  # fp32 first
            for part in parts:
                merged["precisions"].setdefault(precision, {}).update(part["precisions"].get(precision, {}))
        merged["precisions"] = {k: v for k, v in merged["precisions"].items() if v}
        if args.out:
            args.out.write_text(json.dumps(merged))
        print(table(merged))
        return

    import torch
    from adaptclip.adapt.data import load_folder
    from adaptclip.server.config import load_config

    torch.set_num_threads(args.threads)
    adaptation = load_config(args.config).default_model.adaptation
    precisions = args.precisions.split(",")
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, "
                                          f"{Path('/proc/cpuinfo').read_text().count('processor')} CPUs, "
                                          f"{args.threads} torch thread(s), shared with other jobs",
                               "adaptation": adaptation, "command": " ".join(sys.argv), "precisions": {}}
    for precision in precisions:
        model, classes, classifier = load(args.model_dir, precision, adaptation)
        row: dict[str, Any] = {}
        if args.zs_per_class >= 0:
            data = load_folder(args.data, classes, args.zs_per_class or None)
            row["zero_shot"] = score(model, data, classifier, ("none",), 256)
        if args.gs_per_class > 0:
            data = load_folder(args.data, classes, args.gs_per_class, seed=args.subset_seed)
            row["gs_bias"] = score(model, data, classifier, ("none", "gs_bias"), args.batch_images)
        if args.peers_per_class > 0:
            data = load_folder(args.data, classes, args.peers_per_class, seed=2)
            row["peers"] = score(model, data, classifier, ("zero", "tpt", "gs_bias"), args.batch_images, gated=False)
        results["precisions"][precision] = row
        took = ", ".join(f"{part} {r['seconds']:.0f} s" for part, r in row.items())
        print(f"{precision}: done ({took})", file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(results))
    print(table(results) if "fp32" in results["precisions"] else "no fp32 here: print the table with --merge")


def table(results: dict[str, Any]) -> str:
    """The markdown summary: per precision, agreement and accuracy against fp32."""
    ref = results["precisions"]["fp32"]
    lines = [f"{results['machine']}; adaptation {json.dumps(results['adaptation'])}", "",
             ("| precision | zero-shot images | zero-shot acc | top-1 agreement with fp32 | GS-Bias images | "
              "GS-Bias acc | vs fp32 (points) | GS-Bias top-1 agreement | gate skipped | ungated: images, top-1 "
              "agreement with fp32 of ZERO / TPT / GS-Bias |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for precision, row in results["precisions"].items():
        cells = [precision]
        if "zero_shot" in row:
            zs, zs_ref = row["zero_shot"], ref["zero_shot"]
            cells += [str(zs["images"]), f"{100 * accuracy(zs['none']['top1'], zs['labels']):.2f} %",
                      f"{100 * agreement(zs['none']['top1'], zs_ref['none']['top1']):.2f} %"]
        else:
            cells += ["", "", ""]
        if "gs_bias" in row:
            gs, gs_ref = row["gs_bias"], ref["gs_bias"]
            acc, acc_ref = (accuracy(r["gs_bias"]["top1"], r["labels"]) for r in (gs, gs_ref))
            n = gs["images"]
            se = 100 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)
            cells += [str(n), f"{100 * acc:.2f} % (± {se:.2f} s.e.)", f"{100 * (acc - acc_ref):+.2f}",
                      f"{100 * agreement(gs['gs_bias']['top1'], gs_ref['gs_bias']['top1']):.2f} %",
                      f"{gs['gs_bias']['skipped']}"]
        else:
            cells += ["", "", "", "", ""]
        if "peers" in row:
            pe, pe_ref = row["peers"], ref["peers"]
            cells.append(f"{pe['images']}: " + " / ".join(
                f"{100 * agreement(pe[m]['top1'], pe_ref[m]['top1']):.0f} %" for m in ("zero", "tpt", "gs_bias")))
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
