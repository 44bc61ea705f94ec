"""Cache speed-ups through gRPC: cold miss vs full hit vs image-level hit with a new label set.

GS-Bias with 64 views. One run measures both backends: the in-process LRU and Redis (a
redis-server started here on a free port, or --redis-url). Targets: full hit >= 50x faster than
the miss; new-label-set hit >= 20x faster.

    .venv/bin/python bench/cache.py --images DIR --model ViT-B-32 --random-init
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import load_images  # noqa: E402

from adaptclip.client import Client  # noqa: E402
from adaptclip.v1 import classifier_pb2 as pb  # noqa: E402

LABELS_A = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LABELS_B = ["a face", "a leopard", "a motorbike", "a watch", "a chair", "a lamp"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: argparse.Namespace, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "adaptclip.client.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "WARNING", *extra]
    cmd += ["--random-init"] if args.random_init else ["--pretrained", args.pretrained]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}") as c:
        c.wait_ready(300)
    return proc, f"127.0.0.1:{port}"


def measure(target: str, images: list[bytes], views: int) -> dict[str, list[float]]:
    adaptation = pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=views, seed=0)
    times: dict[str, list[float]] = {"miss": [], "hit": [], "new_labels": []}
    levels = {"miss": pb.CACHE_MISS, "hit": pb.CACHE_RESULT, "new_labels": pb.CACHE_FEATURES}
    with Client(target, timeout_s=600) as c:
        a = c.register_label_set(LABELS_A).label_set_id
        b = c.register_label_set(LABELS_B).label_set_id
        c.classify(images[0], label_set_id=a, adaptation=pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=4, seed=9))
        for img in images:
            for kind, ls in (("miss", a), ("hit", a), ("new_labels", b)):
                t = time.perf_counter()
                resp = c.classify(img, label_set_id=ls, adaptation=adaptation)
                times[kind].append(time.perf_counter() - t)
                if resp.cache_level != levels[kind]:
                    raise RuntimeError(f"{kind}: expected cache level {levels[kind]}, got {resp.cache_level}")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    args = p.parse_args()
    images = load_images(args.images, args.n)
    redis_proc = None
    redis_url = args.redis_url
    if redis_url is None:
        port = free_port()
        redis_proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
                                       "--appendonly", "no", "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru",
                                       "--dir", tempfile.mkdtemp()], stdout=subprocess.DEVNULL)
        redis_url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
    rows = []
    try:
        for backend, extra in (("in-process LRU", []), ("Redis", ["--redis-url", redis_url])):
            proc, target = serve(args, extra)
            try:
                t = measure(target, images, args.views)
            finally:
                proc.terminate()
                proc.wait(60)
            miss = statistics.median(t["miss"])
            rows.append((backend, miss, statistics.median(t["hit"]), statistics.median(t["new_labels"])))
    finally:
        if redis_proc:
            redis_proc.terminate()
    print(f"\nGS-Bias, {args.views} views, {args.model}, {len(images)} images from {args.images}; median latency per request\n")
    print("| backend | cold miss ms | full hit ms | new label set ms | hit speed-up | new-label-set speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for backend, miss, hit, new in rows:
        print(f"| {backend} | {miss * 1000:.1f} | {hit * 1000:.2f} | {new * 1000:.2f} | {miss / hit:.0f}x | {miss / new:.0f}x |")


if __name__ == "__main__":
    main()
