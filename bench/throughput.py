"""Throughput: open_clip in-process (batched) vs the gRPC service with 1, 4 and 16 concurrent clients.

With --bundle DIR (an exported bundle of the same model, built with the 10 labels below and the
template "a photo of a {}."), the service also runs once more serving that bundle through
onnxruntime, with the same clients and images.

Both paths do the same work per image: decode the encoded bytes, open_clip's preprocessing, the image
encoder, normalise, zero-shot logits. The baseline runs first, then the server in its own process, so
they never share the CPU.

    .venv/bin/python bench/throughput.py --images ../shared/data/... --model ViT-B-32 --random-init
    .venv/bin/adaptclip quantize --model ViT-B-32 --random-init --labels airplane,car,bird,cat,deer,dog,frog,horse,ship,truck \
        --templates-file T --calib gaussian -o B   # T holds "a photo of a {}."
    .venv/bin/python bench/throughput.py --images ... --model ViT-B-32 --random-init --bundle B --concurrency 16
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LABELS = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_images(root: str, n: int) -> list[bytes]:
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    if not paths:
        raise SystemExit(f"no images under {root}")
    step = max(1, len(paths) // n)
    return [p.read_bytes() for p in paths[::step][:n]]


def percentiles(lat_s: list[float]) -> tuple[float, float]:
    arr = np.asarray(lat_s) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def in_process(args: argparse.Namespace, images: list[bytes]) -> dict:
    import open_clip
    import torch
    from adaptclip.compression.models import DTYPES, resolve_device, resolve_precision
    from PIL import Image

    model_name = args.model
    if model_name.endswith(".json"):
        open_clip.add_model_config(model_name)
        model_name = Path(model_name).stem
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)  # what the server resolves the same flag to
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=None if args.random_init else args.pretrained, device=device, precision=precision)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, LABELS, ["a photo of a {}."], device=device)
    scale = model.logit_scale.exp()

    def run_batch(chunk: list[bytes]) -> None:
        with torch.inference_mode():
            x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in chunk])
            feats = model.encode_image(x.to(device, DTYPES[precision]), normalize=True)
            (scale * feats @ classifier).softmax(-1).cpu()  # on the host, as the service answers (and a CUDA sync)

    run_batch(images[: args.batch_size])  # warm-up
    lat = []
    start = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        t = time.perf_counter()
        run_batch(images[i:i + args.batch_size])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    p50, p99 = percentiles(lat)
    return {"path": f"open_clip in-process, batch {args.batch_size}, {precision} on {device.type}",
            "images_per_s": len(images) / wall,
            "p50_ms": p50, "p99_ms": p99, "latency_of": "batch"}


async def through_service(target: str, images: list[bytes], concurrency: int, what: str = "gRPC service") -> dict:
    from adaptclip.client import AsyncClient

    async with AsyncClient(target, timeout_s=600) as client:
        ref = await client.register_label_set(LABELS, ["a photo of a {}."])
        for img in images[:concurrency]:
            await client.classify(img, label_set_id=ref.label_set_id)
        lat: list[float] = []
        next_index = iter(range(len(images)))

        async def worker() -> None:
            for i in next_index:
                t = time.perf_counter()
                await client.classify(images[i], label_set_id=ref.label_set_id)
                lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    p50, p99 = percentiles(lat)
    return {"path": f"{what}, {concurrency} client(s)", "images_per_s": len(images) / wall,
            "p50_ms": p50, "p99_ms": p99, "latency_of": "request"}


def start_server(args: argparse.Namespace, bundle: str | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "adaptclip.client.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(args.batch_size), "--log-level", "WARNING",
           "--no-cache"]  # the same images go to every concurrency level: cached answers would not be work
    if args.max_queue_delay_ms is not None:
        cmd += ["--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    if bundle:
        cmd += ["--bundle", bundle]
    else:
        cmd += ["--model", args.model, "--device", args.device, "--precision", args.precision]
        cmd += ["--random-init"] if args.random_init else ["--pretrained", args.pretrained]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    from adaptclip.client import Client

    with Client(f"127.0.0.1:{port}") as c:
        c.wait_ready(300)
    return proc, f"127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--n", type=int, default=512, help="images per measurement")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="both paths: auto (CUDA when available), cpu, cuda")
    p.add_argument("--precision", default="auto", help="both paths: auto (half on CUDA, fp32 on the CPU), fp32, ...")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--max-queue-delay-ms", type=float, help="the server's batching delay (default: the server's)")
    p.add_argument("--bundle", help="also serve this exported bundle (onnxruntime) and measure it")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not args.random_init and not args.pretrained:
        raise SystemExit("give --pretrained or --random-init")
    images = load_images(args.images, args.n)
    rows = [in_process(args, images)]
    base = rows[0]["images_per_s"]
    for bundle in [None] + ([args.bundle] if args.bundle else []):
        proc, target = start_server(args, bundle)
        what = "gRPC service, bundle via onnxruntime" if bundle else "gRPC service"
        try:
            for c in (int(x) for x in args.concurrency.split(",")):
                rows.append(asyncio.run(through_service(target, images, c, what)))
        finally:
            proc.terminate()
            proc.wait(60)
    import torch

    print(f"\n{args.model}, {len(images)} images from {args.images}, {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()}, {Path('/proc/cpuinfo').read_text().count('processor')} CPUs\n")
    print("| path | images/s | p50 ms | p99 ms | ratio vs in-process |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['images_per_s'] / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
