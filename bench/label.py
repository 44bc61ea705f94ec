"""Labelling-job throughput: `adaptclip label` with the local engine, through a server, and on Ray.

Every engine runs as the user runs it (a fresh `adaptclip label` process writing a fresh jsonl), one
after the other so they never share the CPU. The baseline, measured first in this process, is a plain
open_clip loop over the same files (read, decode, preprocess, encode in batches, zero-shot softmax).
"wall" counts the whole command (imports, model load, Ray start); "steady" is the job's own summary
(model loaded to last record; on Ray the workers load their models inside that time).

    .venv/bin/python bench/label.py --images /tmp/data/101_ObjectCategories --model ViT-B-32 --random-init
    .venv/bin/python bench/label.py --images /tmp/data/101_ObjectCategories --model ViT-B-32 --random-init --limit 50
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LABEL_CMD = [sys.executable, "-m", "adaptclip.client.cli", "label"]
SUMMARY = re.compile(r"label: (\d+) done, .* in ([\d.]+) s")


def pick_images(root: str, limit: int | None) -> list[str]:
    """The job's own collection order; --limit takes an even spread over all classes."""
    from adaptclip.client.label import collect_paths

    paths = collect_paths([root])
    if limit and limit < len(paths):
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return paths


def baseline(args: argparse.Namespace, paths: list[str]) -> dict:
    """open_clip directly: batches of --concurrency images, one process, no service machinery."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(
        args.model, pretrained=None if args.random_init else args.pretrained)
    model.eval()
    with torch.inference_mode():
        classifier = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(args.model), LABELS,
                                                          ["a photo of a {}."])
        scale = model.logit_scale.exp()

        def label(batch: list[str]) -> None:
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in batch])
            (scale * model.encode_image(x, normalize=True) @ classifier).softmax(-1)

        label(paths[:1])  # warm-up, as the service warms up at load
        start = time.perf_counter()
        for i in range(0, len(paths), args.concurrency):
            label(paths[i:i + args.concurrency])
        took = time.perf_counter() - start
    return {"engine": f"open_clip loop, batch {args.concurrency} (baseline)", "wall_s": took, "steady_s": took,
            "images": len(paths), "errors": 0}


def run_label(name: str, extra: list[str], listing: Path, out: Path, n: int) -> dict:
    """One `adaptclip label` command over the listed images into a fresh `out`; checks every image got a record."""
    cmd = [*LABEL_CMD, str(listing), "-o", str(out), "--labels", ",".join(LABELS), "--templates-file",
           str(listing.with_name("templates.txt")), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    m = SUMMARY.search(proc.stderr)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = out.read_text().splitlines()
    if int(m.group(1)) != n or len(records) != n:
        raise SystemExit(f"{name}: {m.group(1)} done, {len(records)} records, expected {n}")
    errors = [r for r in map(json.loads, records) if "error" in r]
    if errors:
        print(f"{name}: {len(errors)} error records, the first: {errors[0]}", file=sys.stderr)
    return {"engine": name, "wall_s": wall, "steady_s": float(m.group(2)), "images": n, "errors": len(errors)}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    from adaptclip.client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "adaptclip.client.cli", "serve", *model_flags(args), "--host", "127.0.0.1",
           "--port", str(port), "--no-cache", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}") as c:
        c.wait_ready(600)
    return proc, f"127.0.0.1:{port}"


def model_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, *(["--random-init"] if args.random_init else ["--pretrained", args.pretrained])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--limit", type=int, help="label only this many (an even spread), for smoke tests")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--concurrency", type=int, default=32, help="in flight (Ray: images per batch per worker)")
    p.add_argument("--ray-workers", type=int, default=2)
    p.add_argument("--engines", default="local,server,ray")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if not args.random_init and not args.pretrained:
        raise SystemExit("give --pretrained or --random-init")
    paths = pick_images(args.images, args.limit)
    rows = [baseline(args, paths)]
    conc = ["--concurrency", str(args.concurrency)]
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp, "images.txt")
        listing.write_text("\n".join(paths) + "\n")
        listing.with_name("templates.txt").write_text("a photo of a {}.\n")
        for name in args.engines.split(","):
            out = Path(tmp, f"{name}.jsonl")
            if name == "local":
                rows.append(run_label("local engine (--local)", [*model_flags(args), *conc], listing, out, len(paths)))
            elif name == "server":
                proc, target = start_server(args)
                try:
                    rows.append(run_label("through the server (--server)", ["--server", target, *conc], listing, out,
                                          len(paths)))
                finally:
                    proc.terminate()
                    proc.wait(60)
            elif name == "ray":
                rows.append(run_label(f"Ray Data, {args.ray_workers} workers (--engine ray)",
                                      [*model_flags(args), *conc, "--engine", "ray", "--ray-workers",
                                       str(args.ray_workers)], listing, out, len(paths)))
            else:
                raise SystemExit(f"unknown engine {name}")
    base = rows[0]["images"] / rows[0]["steady_s"]
    cpus = Path("/proc/cpuinfo").read_text().count("processor")
    print(f"\n{args.model}{' (random init)' if args.random_init else ''}, {len(paths)} images from {args.images}, "
          f"{platform.processor() or platform.machine()}, {cpus} CPUs\n")
    print("| engine | images/s steady | images/s wall | wall s | errors | steady vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        steady = r["images"] / r["steady_s"]
        print(f"| {r['engine']} | {steady:.1f} | {r['images'] / r['wall_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['errors']} | {steady / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
