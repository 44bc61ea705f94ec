"""The whole GPU check (#14) in one command: the CUDA tests, then the service's speed in half precision, one table.

On a CUDA machine, from the project root (on the offline GPU machine first `source bench/gpu_env.sh`, which
installs the wheels carried in .whl/; no network is used, no redis-server is needed):

    python3 bench/gpu_check.py --out "$OUT"

1. the kernel half, bench/gpu_kernels.py (#13): the CUDA tests of the Triton kernels and bench/kernels.py;
2. every other test file with `@pytest.mark.cuda` cases (tests/test_precision.py: the gRPC matrix of
   methods, token compression, cache, Embed, bundle on CUDA in fp16, bf16 and auto), `pytest -m cuda`;
3. service throughput: ViT-B-16, random init, --precision (auto: bf16 where the GPU runs it natively),
   16 clients through gRPC against open_clip in-process batched at the same precision
   (bench/throughput.py's two paths; target >= 0.9x);
4. GS-Bias at 64 views, one client through gRPC, cold (decode, view rendering, encoder, GS-Bias), against
   the bare 64-view forward pass of the served encoder (target <= 1.2x), and the cache: a full hit and an
   image-level hit with a new label set (bench/cache.py's measurement, in-process LRU).

Prints one table with the GPU's name and writes it, with the raw rows, to OUT/summary.txt and
OUT/gpu_check.json. Budget: about 6 minutes on one GPU (each step has its own timeout). On a machine
without a GPU, `--device cpu --smoke` runs the same steps on the tiny test model with a few images, to
check the script itself (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import gpu_kernels  # noqa: E402
from cache import measure, serve  # noqa: E402
from throughput import in_process, load_images, through_service  # noqa: E402

TINY = ROOT / "tests" / "models" / "tiny-vit.json"


def cuda_test_files() -> list[str]:
    """Test files with CUDA cases that the kernel half does not run."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text() and str(p.relative_to(ROOT)) not in gpu_kernels.TESTS)


def synthetic_images(folder: Path, n: int, seed: int = 0) -> None:
    """n photo-sized JPEGs (smooth gradients and a few shapes, so they decode like photos, not like noise)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:360, 0:480]
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        base = (127 + 60 * np.sin(a * xs / 40 + b * ys / 50 + c))[..., None] * rng.uniform(0.5, 1.0, 3)
        for _ in range(3):
            y, x, r = rng.integers(0, 360), rng.integers(0, 480), rng.integers(20, 90)
            base[(ys - y) ** 2 + (xs - x) ** 2 < r * r] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (folder / f"img{i:04d}.jpg").write_bytes(buf.getvalue())


def forward_floor(args: argparse.Namespace, image: bytes, repeats: int) -> tuple[float, str]:
    """Median seconds of the served encoder's forward over 64 rendered views of `image` (the same views a
    GS-Bias request encodes), and the precision it ran in. The model is freed before the server starts."""
    import torch

    from adaptclip.adapt.views import render_views
    from adaptclip.compression.models import ModelSpec, load_model

    model = load_model(ModelSpec(model=args.model, random_init=True, device=args.device, precision=args.precision))
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    views = render_views(model, pil, model.preprocess(pil), model.adapt_defaults.replace(views=args.views))
    times = []
    for i in range(repeats + 2):  # two warm-ups (cuDNN / kernel selection)
        start = time.perf_counter()
        model.encode_images(views)  # features come back to the host: synchronised
        if i >= 2:
            times.append(time.perf_counter() - start)
    precision = model.precision
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return statistics.median(times), precision


def speed(args: argparse.Namespace, images: list[bytes]) -> dict:
    """Steps 3 and 4: throughput rows, the GS-Bias latency against the forward floor, the cache latencies."""
    opts = SimpleNamespace(model=args.model, pretrained=None, random_init=True, batch_size=args.batch_size,
                           device=args.device, precision=args.precision)
    out = {"in_process": in_process(opts, images)}
    out["floor_s"], out["precision"] = forward_floor(args, images[0], args.repeats)
    placement = ["--device", args.device, "--precision", args.precision]
    proc, target = serve(opts, ["--max-batch-size", str(args.batch_size), "--no-cache", *placement])
    try:
        out["service"] = asyncio.run(through_service(target, images, args.clients))
    finally:
        proc.terminate()
        proc.wait(60)
    # One client: no other request to batch with, so the batcher sends at once (--max-queue-delay-ms 0)
    # and a request's 63 augmented views go in one batch.
    proc, target = serve(opts, ["--max-batch-size", str(args.views), "--max-queue-delay-ms", "0", *placement])
    try:
        times = measure(target, images[:args.cache_images], args.views)
    finally:
        proc.terminate()
        proc.wait(60)
    out.update({kind: statistics.median(t) for kind, t in times.items()})
    return out


def table(device: str, tests: list[tuple[str, int, dict]], rows: dict, args: argparse.Namespace) -> str:
    lines = [f"GPU check on {device}"]
    for what, status, counts in tests:
        total = {k: sum(c[k] for c in counts.values()) for k in ("passed", "failed", "skipped")}
        lines.append(f"  {what}: exit {status}, {total['passed']} passed, {total['failed']} failed, "
                     f"{total['skipped']} skipped")
    if not rows:
        lines.append("  speed checks did not run (see speed.log)")
        return "\n".join(lines)
    ip, svc = rows["in_process"], rows["service"]
    ratio_tp, ratio_gs = svc["images_per_s"] / ip["images_per_s"], rows["miss"] / rows["floor_s"]
    lines += [f"  model {args.model}, random init, {rows['precision']}; {args.n} images, batch {args.batch_size}", "",
              "| check | measured | against | ratio | target |", "|---|---:|---:|---:|---|",
              (f"| service throughput, {args.clients} clients vs open_clip in-process batched | "
               f"{svc['images_per_s']:.0f} img/s | {ip['images_per_s']:.0f} img/s | {ratio_tp:.2f}x | >= 0.9x "
               f"{'met' if ratio_tp >= 0.9 else 'MISSED'} |"),
              (f"| GS-Bias, {args.views} views, 1 client, cold (decode + views + encoder + GS-Bias) vs the "
               f"{args.views}-view forward | {1000 * rows['miss']:.1f} ms | {1000 * rows['floor_s']:.1f} ms | "
               f"{ratio_gs:.2f}x | <= 1.2x {'met' if ratio_gs <= 1.2 else 'MISSED'} |"),
              (f"| cache: full hit vs that cold GS-Bias request | {1000 * rows['hit']:.2f} ms | "
               f"{1000 * rows['miss']:.1f} ms | {rows['miss'] / rows['hit']:.0f}x faster | |"),
              (f"| cache: image-level hit, new label set | {1000 * rows['new_labels']:.2f} ms | "
               f"{1000 * rows['miss']:.1f} ms | {rows['miss'] / rows['new_labels']:.0f}x faster | |"),
              (f"| service p50 / p99 at {args.clients} clients (per request) | {svc['p50_ms']:.1f} / "
               f"{svc['p99_ms']:.1f} ms | | | |")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-check"), help="folder for the results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto", help="auto (bf16 where native, else fp16 on CUDA), fp16, bf16")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--images", help="a folder of images (default: synthetic JPEGs)")
    p.add_argument("--n", type=int, default=512, help="images for the throughput rows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--cache-images", type=int, default=8, help="images for the GS-Bias and cache rows")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of the 64-view forward")
    p.add_argument("--skip-kernels", action="store_true", help="the kernel half ran already")
    p.add_argument("--smoke", action="store_true", help="tiny model, few images: check the script on a CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.n, args.clients, args.views, args.cache_images, args.repeats = str(TINY), 16, 4, 8, 2, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tests: list[tuple[str, int, dict]] = []
    if not args.skip_kernels:
        status = gpu_kernels.main(["--out", str(out / "kernels"), "--tests-timeout", "180", "--bench-timeout", "120"])
        tests.append(("kernel half (bench/gpu_kernels.py: CUDA kernel tests + bench/kernels.py)", status,
                      gpu_kernels.test_counts(out / "kernels" / "cuda-tests.xml")))
    xml = out / "cuda-tests.xml"
    status = gpu_kernels.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rfE",
                              f"--junitxml={xml}", *cuda_test_files()], out / "cuda-tests.log", 200)
    tests.append((f"CUDA service tests ({', '.join(cuda_test_files())})", status, gpu_kernels.test_counts(xml)))
    with tempfile.TemporaryDirectory() as tmp:
        if args.images is None:
            synthetic_images(Path(tmp), args.n)
        images = load_images(args.images or tmp, args.n)
        try:
            rows = speed(args, images)
        except (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError) as exc:
            print(f"speed checks failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows = {}
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() \
        else f"CPU ({args.device}, smoke: numbers mean nothing)" if args.smoke else args.device
    text = table(device, tests, rows, args)
    (out / "summary.txt").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "rows": rows, "args": vars(args)}, indent=1))
    print("\n" + text)
    kernels_ok = args.skip_kernels or args.smoke or tests[0][1] == 0
    return 0 if kernels_ok and tests[-1][1] == 0 and rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
