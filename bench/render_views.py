"""Rendering cost alone: the augmented views of one image on the edge (numpy + PIL) and torch paths.

Times `ViewRenderer.render` (compression/edge_views.py) and `ViewPlan.render` (adapt/views.py) over
the same CIFAR test images upscaled to 256 px, V - 1 views each at S px, AugMix on and off, with
`--threads` torch/numpy threads, and each image's views split across `--render-threads` threads at
once (what shows whether rendering leaves other threads their cores: numpy's BLAS threads did not).
Rendering is single-image CPU work, so unlike the end-to-end cost of bench/edge_tta.py it measures
steadily on a shared machine. Both paths render the same draws
(adapt/draws.py), and on the CPU the same PIL code for AugMix (adapt/pil_augmix.py); each path is
compared with itself across code versions.
`--baseline` runs the measurement with another checkout's package (its `proto/adaptclip`,
`adapt`, ... folders) in alternating subprocesses, for a before/after ratio from one run:

    .venv/bin/python bench/render_views.py --images 10 --views 32 --size 224 --rounds 4 \
        --baseline /tmp/old --out bench/results/render-views.json

`--per-op` instead splits the edge AugMix rendering's time (one thread) by official op, and the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import machine_info

PACKAGES = ("adapt", "client", "compression", "kernels", "server")


def measure(args: argparse.Namespace) -> dict:
    """Median ms per image for each (path, augmix) in this process."""
    import numpy as np
    import torch
    from PIL import Image

    from adaptclip.adapt.data import load_folder
    from adaptclip.adapt.views import ViewGenerator
    from adaptclip.compression.edge_views import ViewRenderer

    torch.set_num_threads(args.threads)
    pool = ThreadPoolExecutor(args.render_threads)
    cuts = np.linspace(1, args.views, args.render_threads + 1).astype(int).tolist()
    parts = [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]  # view ranges [lo, hi), one per thread
    mean, std = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
    data = load_folder(args.data, limit_per_class=1, seed=1)
    images = [Image.open(p).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC) for p in data.paths[:args.images]]
    out = {}
    for augmix in (True, False):
        edge = ViewRenderer(args.size, mean, std, augmix=augmix)
        gen = ViewGenerator(args.size, mean, std, augmix=augmix)
        base = torch.zeros(3, args.size, args.size)
        times: dict[str, list[float]] = {"edge": [], "torch": []}
        for i, img in enumerate([images[0], *images]):  # the first image warms up
            start = time.perf_counter()
            pixels = edge.prepare(img)
            params = edge.sample(i, args.views - 1, *pixels.shape[:2])
            list(pool.map(lambda part: edge.render(pixels, params.select(part[0] - 1, part[1] - 1)), parts))
            edge_ms = 1000 * (time.perf_counter() - start)
            tensor = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1).contiguous()
            start = time.perf_counter()
            plan = gen.plan(tensor, base, args.views, i)
            list(pool.map(lambda part: plan.render(*part), parts))
            torch_ms = 1000 * (time.perf_counter() - start)
            if i:
                times["edge"].append(edge_ms)
                times["torch"].append(torch_ms)
        for path, values in times.items():
            out[f"{path}_{'augmix' if augmix else 'crops'}_ms"] = round(statistics.median(values), 2)
    pool.shutdown()
    return out


def per_op(args: argparse.Namespace) -> dict:
    """Where the edge renderer's AugMix time goes, one thread: ms an image in each official op (by
    name, with calls an image and ms a call) and in the rest (crops' resizes, flips, blend, normalisation)."""
    import numpy as np
    from PIL import Image

    import adaptclip.adapt.pil_augmix as pil_augmix
    from adaptclip.adapt.data import load_folder
    from adaptclip.compression.edge_views import ViewRenderer

    spent: dict[str, list[float]] = {}
    op = pil_augmix.augmix_op

    def timed(image: Image.Image, name: str, level: float, sign: float) -> Image.Image:
        start = time.perf_counter()
        out = op(image, name, level, sign)
        spent.setdefault(name, []).append(time.perf_counter() - start)
        return out

    pil_augmix.augmix_op = timed  # augmix_views looks the op up at each call
    data = load_folder(args.data, limit_per_class=1, seed=1)
    images = [Image.open(p).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC) for p in data.paths[:args.images]]
    edge = ViewRenderer(args.size, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276), augmix=True)
    total, n = 0.0, args.rounds * len(images)
    for r in range(args.rounds):
        for i, img in enumerate(images):
            pixels = edge.prepare(img)
            params = edge.sample(i, args.views - 1, *pixels.shape[:2])
            start = time.perf_counter()
            edge.render(pixels, params)
            total += time.perf_counter() - start
    ops = {name: {"ms_per_image": round(1000 * sum(t) / n, 2), "calls_per_image": round(len(t) / n, 2),
                  "ms_per_call": round(1000 * float(np.mean(t)), 3)} for name, t in sorted(spent.items())}
    in_ops = sum(sum(t) for t in spent.values())
    return {"render_ms_per_image": round(1000 * total / n, 2), "ops": ops,
            "ops_ms_per_image": round(1000 * in_ops / n, 2), "rest_ms_per_image": round(1000 * (total - in_ops) / n, 2)}


def _run(tree: str | None, args: argparse.Namespace) -> dict:
    """One measurement in a subprocess, with `tree`'s packages in place of this checkout's when given."""
    cmd = [sys.executable, __file__, "--worker", "--images", str(args.images), "--views", str(args.views),
           "--size", str(args.size), "--threads", str(args.threads), "--render-threads", str(args.render_threads), "--data", args.data]
    env = dict(os.environ)
    if tree:
        env["ADAPTCLIP_TREE"] = tree
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _use_tree(tree: str) -> None:
    """Point the editable install's package mapping at another checkout (a worktree of an older commit)."""
    finder = next(m for name, m in sys.modules.items()
                  if name.startswith("__editable___adaptclip") and name.endswith("_finder"))
    root = Path(tree)
    finder.MAPPING = {"adaptclip": str(root / "proto" / "adaptclip"),
                      **{f"adaptclip.{p}": str(root / p) for p in PACKAGES}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/data/test")
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--views", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-threads", type=int, default=1, help="threads each image's views are split across")
    p.add_argument("--rounds", type=int, default=4, help="subprocess pairs (baseline and this tree, in alternating order)")
    p.add_argument("--baseline", help="another checkout to compare with (its packages replace this one's)")
    p.add_argument("--per-op", action="store_true",
                   help="instead: the edge AugMix rendering's time per official op, one thread, --rounds passes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args()
    if args.per_op:
        result = {"machine": machine_info(), "command": " ".join(sys.argv), "per_op": per_op(args)}
        print(json.dumps(result["per_op"], indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return
    if args.worker:
        if os.environ.get("ADAPTCLIP_TREE"):
            _use_tree(os.environ["ADAPTCLIP_TREE"])
        print(json.dumps(measure(args)))
        return
    rounds: dict[str, list[dict]] = {"baseline": [], "this": []}
    for r in range(args.rounds):  # the order alternates, so neither tree always runs second
        order = ["this"] if not args.baseline else ["baseline", "this"][::1 if r % 2 == 0 else -1]
        for which in order:
            rounds[which].append(_run(args.baseline if which == "baseline" else None, args))
        print(f"round {r}: " + json.dumps({k: v[-1] for k, v in rounds.items() if v}), flush=True)
    # interference only adds time: each figure is the least over the rounds (each a median over images)
    summary = {k: {f: round(min(row[f] for row in v), 2) for f in v[0]} for k, v in rounds.items() if v}
    if args.baseline:
        summary["baseline_over_this"] = {f: round(summary["baseline"][f] / summary["this"][f], 3) for f in summary["this"]}
    result = {"machine": machine_info(), "command": " ".join(sys.argv), "rounds": rounds, "summary": summary}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
