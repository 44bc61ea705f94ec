"""The served default adaptation over gRPC, as a user meets it: `adaptclip serve --config FILE`, then one
Classify per shifted image with nothing but the view seed set (method and settings: the model's block).

The images, their corruption and their view seeds are those of bench/tune_report.py (adapt.evaluate:
image i of the seeded per-class sample, corrupted and its views drawn with seed + i, stored as 8-bit
RGB, here sent as PNG), so at the same --per-class and --seed the two must report the same accuracy
per shift; this checks that the harness's figures are the service's.

    .venv/bin/python bench/served_accuracy.py --config examples/cifar-clip-tuned.yaml --data /tmp/data/test \\
        --labels-file ../shared/models/cifar-clip/classes.txt --templates-file ../shared/models/cifar-clip/templates.txt \\
        --per-class 20 --out bench/results/served-accuracy.json
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cache import free_port  # noqa: E402

from adaptclip.adapt.data import decode_shifted, load_folder  # noqa: E402
from adaptclip.adapt.shifts import HELD_OUT, get_shift  # noqa: E402
from adaptclip.client import Client  # noqa: E402
from adaptclip.client.client import load_lines  # noqa: E402
from adaptclip.v1 import classifier_pb2 as pb  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the server config (a file `adaptclip tune` wrote)")
    p.add_argument("--data", required=True, help="class folders (the test set)")
    p.add_argument("--labels-file", required=True)
    p.add_argument("--templates-file")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shifts", default="clean," + ",".join(HELD_OUT))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    classes = load_lines(args.labels_file)
    templates = load_lines(args.templates_file) if args.templates_file else []
    data = load_folder(args.data, classes, args.per_class, seed=args.seed)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "adaptclip.client.cli", "serve", "--config", args.config,
                             "--host", "127.0.0.1", "--port", str(port), "--no-cache", "--log-level", "WARNING"],
                            stdin=subprocess.DEVNULL)
    out: dict = {"command": vars(args), "images_per_shift": len(data.paths), "shifts": {}}
    try:
        with Client(f"127.0.0.1:{port}", timeout_s=600) as c:
            c.wait_ready(300)
            info = c.model_info()
            out["served_defaults"] = str(info.models[0].adaptation).replace("\n", "; ") if info.models else ""
            label_set = c.register_label_set([x.replace("_", " ") for x in data.classes], templates).label_set_id
            print("| shift | zero-shot | adapted | gain | fell back | skipped |\n|---|---:|---:|---:|---:|---:|")
            for name in args.shifts.split(","):
                shift = get_shift(name)
                right = {"zero_shot": 0, "adapted": 0, "fell_back": 0, "skipped": 0}
                start = time.perf_counter()
                for i, (path, label) in enumerate(zip(data.paths, data.labels)):
                    buf = io.BytesIO()
                    decode_shifted(path, shift, args.seed + i).save(buf, format="PNG")
                    r = c.classify(buf.getvalue(), label_set_id=label_set, top_k=1,
                                   adaptation=pb.Adaptation(seed=args.seed + i))
                    right["zero_shot"] += (r.zero_shot_top or r.top)[0].index == label  # no zero-shot top: not adapted
                    right["adapted"] += r.top[0].index == label
                    right["fell_back"] += r.adaptation.fell_back
                    right["skipped"] += r.adaptation.skipped
                n = len(data.paths)
                row = {k: round(100 * v / n, 2) for k, v in right.items()}
                row["gain"] = round(row["adapted"] - row["zero_shot"], 2)
                row["seconds"] = round(time.perf_counter() - start, 1)
                out["shifts"][name] = row
                print(f"| {name} | {row['zero_shot']:.1f} | {row['adapted']:.1f} | {row['gain']:+.1f} | "
                      f"{row['fell_back']:.0f} % | {row['skipped']:.0f} % |", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    held = [r["gain"] for k, r in out["shifts"].items() if k != "clean"]
    if held:
        out["mean_gain_held_out"] = round(sum(held) / len(held), 2)
        print(f"| **mean of {len(held)} held-out shifts** | | | **{out['mean_gain_held_out']:+.2f}** | | |")
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
