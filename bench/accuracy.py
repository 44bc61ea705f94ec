"""Accuracy of zero-shot, GS-Bias, ZERO and TPT on the CIFAR model under the Kornia shift suite.

Runs `adaptclip.adapt.evaluate` (the served code path, in process) for one or more view settings
("configs"), writes clip_benchmark-shaped JSON, prints a markdown table (rows = method, columns =
shifts, the shift-suite average over the corrupted shifts, the gain over zero-shot, views and
per-image cost) and plots accuracy against per-image cost. Use --data /tmp/data/train to pick
settings, the test folder only to report them.

    .venv/bin/python bench/accuracy.py --data /tmp/data/test --limit-per-class 30 \\
        --configs picked=0.35,1,off official=0.08,1,on --view-chunk 0 16 --skip-entropy 0 0.5 \\
        --out bench/results/accuracy-test.json
    .venv/bin/python bench/accuracy.py --from-json a.json b.json --plot out.png   # table + plot again
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT.parent / "shared" / "models" / "cifar-clip"


def parse_config(text: str) -> tuple[str, tuple[float, float], bool]:
    """'name=lo,hi,on|off' -> (name, crop scale, augmix)."""
    name, _, rest = text.partition("=")
    parts = rest.split(",")
    if not name or len(parts) != 3 or parts[2] not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"config must be NAME=LO,HI,on|off, got {text!r}")
    return name, (float(parts[0]), float(parts[1])), parts[2] == "on"


def run_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate every config on the same images; the JSON is rewritten after each config."""
    import torch

    from adaptclip.adapt.data import load_folder
    from adaptclip.adapt.evaluate import EvalPlan, evaluate
    from adaptclip.adapt.settings import AdaptSettings
    from adaptclip.adapt.shifts import get_shift
    from adaptclip.compression.models import ModelSpec
    from adaptclip.compression.models import load_model

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    config = model_dir / "cifar-vit-w192-l6-rrc.json"
    weights = model_dir / "cifar-vit-w192-l6-rrc.pt"
    classes = [line.strip() for line in (model_dir / "classes.txt").read_text().splitlines() if line.strip()]
    templates = [line.strip() for line in (model_dir / "templates.txt").read_text().splitlines() if line.strip()]
    hosted = load_model(ModelSpec(model=str(config), pretrained=str(weights), device="cpu"))
    classifier = hosted.classifier(tuple(classes), tuple(templates))
    data = load_folder(args.data, classes, args.limit_per_class, seed=args.seed)
    plan = EvalPlan(methods=tuple(args.methods), shifts=tuple(get_shift(s) for s in args.shifts),
                    skip_entropies=tuple(args.skip_entropy), view_chunks=tuple(args.view_chunk))
    records: list[dict[str, Any]] = []
    for name, crop, augmix in args.configs:
        base = AdaptSettings(views=args.views, crop_scale=crop, augmix=augmix, seed=args.seed)
        extra = {"config": name, "data_dir": str(args.data), "limit_per_class": args.limit_per_class,
                 "machine": args.machine, "threads": args.threads, "command": " ".join(sys.argv)}
        start = time.perf_counter()
        records += evaluate(hosted, data, classifier, base, plan, model_name=config.stem, pretrained=weights.name,
                            extra=extra, progress=lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True))
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1))
    return records


def _key(r: dict[str, Any]) -> tuple[str, str, float, int]:
    a = r["adaptation"]
    return r.get("config", ""), r["method"], a["skip_entropy"], a["view_chunk"]


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, method, gate, chunk): acc1 per shift, suite average, gain, mean cost."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[_key(r)].append(r)
    rows = []
    for key, recs in groups.items():
        acc = {r["shift"]: 100 * r["metrics"]["acc1"] for r in recs}
        corrupted = [v for s, v in acc.items() if s != "clean"]
        rows.append({"config": key[0], "method": key[1], "skip_entropy": key[2], "view_chunk": key[3], "acc1": acc,
                     "suite_avg": sum(corrupted) / len(corrupted) if corrupted else float("nan"),
                     "views": sum(r["cost"]["views_encoded"] for r in recs) / len(recs),
                     "skipped": sum(r["cost"]["skipped_fraction"] for r in recs) / len(recs),
                     "ms": sum(r["cost"]["per_image_ms"] for r in recs) / len(recs),
                     # load-independent: cost in zero-shot forwards of the same run
                     "rel_cost": sum(r["cost"]["per_image_ms"] / r["cost"]["encoder_ms_per_view"] for r in recs) / len(recs),
                     "images": recs[0]["images"]})
    zero_shot = {(r["config"]): r for r in rows if r["method"] == "none"}
    for row in rows:
        ref = zero_shot.get(row["config"])
        row["gain"] = row["suite_avg"] - ref["suite_avg"] if ref else float("nan")
        row["worst_shift_gain"] = min((v - ref["acc1"][s] for s, v in row["acc1"].items() if s != "clean"),
                                      default=float("nan")) if ref else float("nan")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    shifts = list(rows[0]["acc1"])
    head = ["config", "method", "skip_entropy", "view_chunk", *shifts, "suite avg", "gain", "worst shift gain",
            "views", "skipped", "ms/image", "x zero-shot"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], r["method"], f"{r['skip_entropy']:g}", str(r["view_chunk"]),
                 *(f"{r['acc1'].get(s, float('nan')):.1f}" for s in shifts), f"{r['suite_avg']:.2f}",
                 f"{r['gain']:+.2f}", f"{r['worst_shift_gain']:+.1f}", f"{r['views']:.1f}",
                 f"{100 * r['skipped']:.0f}%", f"{r['ms']:.0f}", f"{r['rel_cost']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    images = rows[0]["images"]
    return "\n".join(lines) + f"\n\nacc1 in %, {images} images per shift; suite avg = mean over the corrupted shifts."


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Shift-suite average accuracy against per-image cost in zero-shot forwards of the same run (so
    runs measured under different load compare); full-view runs large, gated/chunked small."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"none": "black", "gs_bias": "tab:red", "zero": "tab:blue", "tpt": "tab:green"}
    markers = ["o", "s", "^", "D", "v", "P"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        full = r["skip_entropy"] == 0 and r["view_chunk"] == 0
        ax.scatter(r["rel_cost"], r["suite_avg"], color=colours[r["method"]], marker=markers[configs.index(r["config"]) % 6],
                   s=70 if full else 25, alpha=1.0 if full else 0.5, edgecolors="none")
        if full and (r["method"] != "none" or r["config"] == configs[0]):
            label = r["method"] if r["method"] == "none" else f"{r['method']} ({r['config']})"
            ax.annotate(label, (r["rel_cost"], r["suite_avg"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("per-image cost / one zero-shot forward, same run (encoder + views + method; log)")
    ax.set_ylabel("top-1 %, shift-suite average")
    ax.set_title("CIFAR model: accuracy vs cost; markers by view config (small: gate / chunked views)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    from adaptclip.adapt.settings import METHODS
    from adaptclip.adapt.shifts import SHIFT_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/data/test", help="folder with one subfolder per class")
    p.add_argument("--model-dir", default=str(MODEL_DIR))
    p.add_argument("--limit-per-class", type=int, default=30, help="seeded subsample per class (2 cores)")
    p.add_argument("--configs", nargs="+", type=parse_config,
                   default=[parse_config("picked=0.35,1,off"), parse_config("official=0.08,1,on")])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--shifts", nargs="+", choices=SHIFT_NAMES, default=list(SHIFT_NAMES))
    p.add_argument("--skip-entropy", nargs="+", type=float, default=[0.0])
    p.add_argument("--view-chunk", nargs="+", type=int, default=[0])
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a shared 2-core box)")
    p.add_argument("--machine", default="2-core CPU dev machine")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "accuracy.json"))
    p.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    p.add_argument("--from-json", nargs="+", help="skip the run: table and plot from these JSON files")
    args = p.parse_args()
    if args.from_json:
        records = [r for path in args.from_json for r in json.loads(Path(path).read_text())]
        args.out = args.from_json[0]
    else:
        records = run_configs(args)
    rows = summarise(records)
    print(f"{records[0]['model']} on {records[0]['data_dir']}, {platform.node()}")
    print(markdown(rows))
    png = Path(args.plot or Path(args.out).with_suffix(".png"))
    plot(rows, png)
    print(f"\nJSON: {args.out}\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
