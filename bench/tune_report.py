"""Served default adaptation, tuned and untuned, against zero-shot under the held-out shift families.

Loads the model twice the way `adaptclip serve` does: from the `adaptclip tune` file (its adaptation
block, default method included) and without any block (the untuned defaults of
adapt.settings.untuned_defaults, with GS-Bias asked for, as a request naming GS_BIAS gets them). Both
run through adapt.evaluate, the served loop, on the same images and shifts; prints one markdown table
per setup and writes the records.

    .venv/bin/python bench/tune_report.py --config tuned.yaml --data /tmp/data/test --per-class 20 \\
        --shifts held_out --out bench/results/tune-report-test.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any


def run_setup(name: str, spec: Any, method: str | None, args: argparse.Namespace, shifts: list[str]) -> list[dict]:
    from adaptclip.adapt.data import load_folder
    from adaptclip.adapt.evaluate import EvalPlan, evaluate
    from adaptclip.adapt.shifts import get_shift
    from adaptclip.client.client import load_lines
    from adaptclip.compression.models import DEFAULT_TEMPLATES, load_model

    model = load_model(spec)
    s = model.adapt_defaults.replace(method=method or model.adapt_defaults.method, seed=args.seed)
    classes = load_lines(args.labels_file) if args.labels_file else None
    templates = tuple(load_lines(args.templates_file)) if args.templates_file else DEFAULT_TEMPLATES
    data = load_folder(args.data, classes, args.per_class, seed=args.seed)
    classifier = model.classifier(tuple(c.replace("_", " ") for c in data.classes), templates)
    methods = ("none",) if s.method == "none" else ("none", s.method)
    plan = EvalPlan(methods=methods, shifts=tuple(get_shift(x) for x in shifts), skip_entropies=(s.skip_entropy,),
                    view_chunks=(s.view_chunk,))
    records = evaluate(model, data, classifier, s, plan, model_name=spec.model, pretrained=str(spec.pretrained),
                       extra={"setup": name, "per_class": args.per_class},
                       progress=lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True))
    return records


def table(records: list[dict], name: str) -> str:
    rows = {}
    for r in records:
        rows.setdefault(r["shift"], {})[r["method"]] = r
    lines = [f"**{name}**", "", "| shift | zero-shot | adapted | gain | fell back | views/image |", "|---|---|---|---|---|---|"]
    gains = []
    for shift, by in rows.items():
        zs = 100 * by["none"]["metrics"]["acc1"]
        adapted = next((r for m, r in by.items() if m != "none"), by["none"])
        acc = 100 * adapted["metrics"]["acc1"]
        if shift != "clean":
            gains.append(acc - zs)
        c = adapted["cost"]
        lines.append(f"| {shift} | {zs:.1f} | {acc:.1f} | {acc - zs:+.1f} | {100 * c['fell_back_fraction']:.0f} % | "
                     f"{c['views_encoded']:.1f} |")
    if gains:
        lines.append(f"| **mean of {len(gains)} shifts** | | | **{sum(gains) / len(gains):+.2f}** | | |")
        lines.append(f"| worst shift | | | {min(gains):+.1f} | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the server config `adaptclip tune` wrote")
    p.add_argument("--data", required=True, help="class folders (report on test, never on what tune saw)")
    p.add_argument("--labels-file")
    p.add_argument("--templates-file")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--shifts", default="held_out", help="held_out, tune, all, or a comma list")
    p.add_argument("--setups", default="tuned,untuned", help="comma list of tuned, untuned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch

    from adaptclip.adapt.shifts import HELD_OUT, SUITE
    from adaptclip.server.config import load_config

    torch.set_num_threads(args.threads)
    groups = {"held_out": list(HELD_OUT), "tune": list(SUITE), "all": [*SUITE, *HELD_OUT]}
    shifts = ["clean", *groups.get(args.shifts, [x for x in args.shifts.split(",") if x and x != "clean"])]
    tuned = load_config(args.config).default_model
    setups = {"tuned": (tuned, None), "untuned": (dataclasses.replace(tuned, adaptation={}), "gs_bias")}
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                           "command": " ".join(sys.argv), "setups": {}}
    for name in args.setups.split(","):
        spec, method = setups[name]
        start = time.perf_counter()
        records = run_setup(name, spec, method, args, shifts)
        out["setups"][name] = {"records": records, "seconds": time.perf_counter() - start}
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(table(records, f"{name}: {records[-1]['adaptation']['method']}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
