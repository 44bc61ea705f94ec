"""Quantisation benchmark: accuracy of INT8/INT4 ONNX per calibration source, CPU speed, size.

Accuracy (the CIFAR-10 CLIP kept in ../shared/models/cifar-clip, over CIFAR-10 test images):
top-1 of fp32 torch, fp32 ONNX, and W8A8 / W4A8 static QDQ with each calibration source (SPDFQ
synthetic, Gaussian noise, real train images), each with the default recipe (linear ops only,
attention probabilities fp32) and with plain PTQ (every op, attention uniform INT8) for the
before/after; W4A4 simulated (onnxruntime has no int4-activation kernels: QDQ run unfused), where
the paper's data-free results live; plus onnxruntime's calibration-free MatMulNBits int4
(accuracy_level 4).

Speed: images/s of fp32 torch vs fp32 ONNX vs W8A8 ONNX on ViT-B-32 at 224 px (random init: speed
does not depend on the weights), same thread count for both runtimes, timed in interleaved rounds
(median kept).

    .venv/bin/python bench/quantize.py --n-test 2000 --iters 200 --out bench/results/quantize.json
    .venv/bin/python bench/quantize.py --skip-accuracy --speed-model ViT-B-32 --threads 2   # speed only
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import machine_info
from PIL import Image

from adaptclip.client.client import load_lines
from adaptclip.compression.export import (SIMULATED_ONLY, QuantConfig, agreement, export_image_tower, quantize,
                                          quantize_weight_only_int4, run_onnx, session, torch_embeddings)
from adaptclip.compression.spdfq import SynthesisConfig, gaussian_images, real_images, synthesize
from adaptclip.compression.models import ModelSpec
from adaptclip.compression.models import TorchModel, load_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar-clip"


def load_test_set(hosted: TorchModel, root: Path, classes: list[str], n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first n/C images (sorted by name) of each class folder: a stratified, reproducible subsample."""
    per = max(1, n // len(classes))
    xs, ys = [], []
    for ci, name in enumerate(classes):
        for path in sorted((root / name).iterdir())[:per]:
            with Image.open(path) as im:
                xs.append(hosted.preprocess(im.convert("RGB")))
            ys.append(ci)
    return torch.stack(xs), np.array(ys)


def top1(emb: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> float:
    return float(((emb @ classifier.T).argmax(-1) == labels).mean())


def accuracy(args: argparse.Namespace, work: Path) -> dict:
    model_dir = Path(args.model_dir)
    hosted = load_model(ModelSpec(model=str(model_dir / "cifar-vit-w192-l6-rrc.json"),
                                  pretrained=str(model_dir / "cifar-vit-w192-l6-rrc.pt"), device="cpu"))
    classes, templates = load_lines(model_dir / "classes.txt"), load_lines(model_dir / "templates.txt")
    classifier_t = hosted.classifier(tuple(classes), tuple(templates))
    classifier = classifier_t.numpy()
    x, y = load_test_set(hosted, Path(args.test_dir), classes, args.n_test)
    print(f"test images: {len(x)} ({len(x) // len(classes)} per class)", flush=True)
    ref = torch_embeddings(hosted.module, x)
    fp32 = export_image_tower(hosted.module, work / "fp32.onnx", hosted.image_size)
    onnx_fp32 = run_onnx(session(fp32, threads=args.threads), x.numpy())
    rows: list[dict] = [
        {"model": "fp32 torch", "calib": "-", "top1": top1(ref, classifier, y), "cosine": 1.0, "agree": 1.0,
         "bytes": None},
        {"model": "fp32 ONNX", "calib": "-", "top1": top1(onnx_fp32, classifier, y),
         **_vs(ref, onnx_fp32, classifier), "bytes": fp32.stat().st_size}]
    started = time.perf_counter()
    synth = SynthesisConfig(n=args.n_calib, iters=args.iters, seed=args.seed, progress=not args.quiet)
    calib = {"spdfq": synthesize(hosted.module, classifier_t, hosted.logit_scale, hosted.mean, hosted.std,
                                 hosted.image_size, synth)}
    spdfq_s = time.perf_counter() - started
    calib["gaussian"] = gaussian_images(args.n_calib, hosted.image_size, args.seed)
    calib["real"] = real_images(args.train_dir, hosted.preprocess, args.n_calib, args.seed)
    recipes = {"default": {}, "plain": {"ops": "all", "attention": "int8"}}
    runs = [(bits, recipe) for bits in ("w8a8", "w4a8") for recipe in recipes] + [("w4a4", "default")]
    for bits, recipe in runs:
        for source, images in calib.items():
            path = quantize(fp32, work / f"{bits}-{recipe}-{source}.onnx", images.numpy(),
                            QuantConfig(bits=bits, **recipes[recipe]))
            emb = run_onnx(session(path, threads=args.threads, optimize=bits not in SIMULATED_ONLY), x.numpy())
            label = f"{recipe}, simulated" if bits in SIMULATED_ONLY else recipe
            rows.append({"model": f"{bits.upper()} QDQ ({label})", "calib": source, "top1": top1(emb, classifier, y),
                         **_vs(ref, emb, classifier), "bytes": path.stat().st_size})
            print(_row_md(rows[-1]), flush=True)
    nbits = quantize_weight_only_int4(fp32, work / "nbits.onnx")
    emb = run_onnx(session(nbits, threads=args.threads), x.numpy())
    rows.append({"model": "W4 MatMulNBits (int8 compute)", "calib": "none", "top1": top1(emb, classifier, y),
                 **_vs(ref, emb, classifier), "bytes": nbits.stat().st_size})
    return {"n_test": len(x), "n_calib": args.n_calib, "spdfq_iters": args.iters, "spdfq_seconds": round(spdfq_s, 1),
            "rows": rows}


def _vs(ref: np.ndarray, emb: np.ndarray, classifier: np.ndarray) -> dict:
    a = agreement(ref, emb, {"cifar10": classifier})
    return {"cosine": a.cosine_mean, "agree": a.top1_agreement["cifar10"]}


def _row_md(r: dict) -> str:
    size = f"{r['bytes'] / 1e6:.2f} MB" if r["bytes"] else "-"
    return f"| {r['model']} | {r['calib']} | {100 * r['top1']:.2f} | {r['cosine']:.4f} | {100 * r['agree']:.2f} | {size} |"


def interleaved(runners: dict[str, Callable[[], object]], batch: int, rounds: int) -> dict[str, float | list[float]]:
    """images/s per runner, timed in interleaved rounds: per round each runs one untimed batch (it
    absorbs the previous runtime's idle threads, which spin for a while), then one timed batch, in
    turn. The median is kept, so a change of load on the machine hits all runners alike; with it
    the slowest and fastest round ({name}_ips_range)."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for run in runners.values():
            run()  # warm-up
        for _ in range(rounds):
            for name, run in runners.items():
                run()
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    out: dict[str, float | list[float]] = {}
    for name, times in seconds.items():
        out[f"{name}_ips"] = batch / statistics.median(times)
        out[f"{name}_ips_range"] = [batch / max(times), batch / min(times)]
    return out


def speed(args: argparse.Namespace, work: Path) -> dict:
    """images/s at a fixed batch: fp32 torch vs fp32 ONNX vs W8A8 QDQ ONNX, same threads, interleaved."""
    torch.set_num_threads(args.threads)
    hosted = load_model(ModelSpec(model=args.speed_model, random_init=True, device="cpu"))
    size = hosted.image_size
    fp32 = export_image_tower(hosted.module, work / "speed-fp32.onnx", size)
    int8 = quantize(fp32, work / "speed-w8a8.onnx", gaussian_images(8, size).numpy(), QuantConfig(bits="w8a8"))
    batch = torch.randn(args.speed_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    runners = {"fp32_torch": lambda: hosted.module.encode_image(batch)}
    for name, path in (("fp32_onnx", fp32), ("w8a8_onnx", int8)):
        runners[name] = onnx_runner(session(path, threads=args.threads), batch.numpy())
    results = {"model": args.speed_model, "image_size": size, "batch": args.speed_batch, "threads": args.threads,
               "rounds": args.speed_rounds, "timing": "interleaved rounds, median",
               **interleaved(runners, len(batch), args.speed_rounds)}
    results["w8a8_vs_torch"] = results["w8a8_onnx_ips"] / results["fp32_torch_ips"]
    results["fp32_onnx_bytes"], results["w8a8_onnx_bytes"] = fp32.stat().st_size, int8.stat().st_size
    return results


def onnx_runner(sess: ort.InferenceSession, pixels: np.ndarray) -> Callable[[], object]:
    feed = {"pixels": pixels}
    return lambda: sess.run(None, feed)


def run_info() -> dict:
    """The command, the machine and the versions, recorded with every result."""
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__}}


def write_results(path: str | None, out: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(SHARED))
    p.add_argument("--test-dir", default="/tmp/data/test")
    p.add_argument("--train-dir", default="/tmp/data/train")
    p.add_argument("--n-test", type=int, default=2000, help="stratified subsample of the test set")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--iters", type=int, default=200, help="SPDFQ synthesis iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (1 is fastest on a busy box)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--speed-model", default="ViT-B-32")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--speed-rounds", type=int, default=8, help="interleaved rounds; each times one batch per runtime after an untimed one")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run_info()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_accuracy:
            out["accuracy"] = accuracy(args, Path(tmp))
            print("\n| model | calibration | top-1 % | cosine vs fp32 | top-1 agreement % | model size |\n|---|---|---|---|---|---|")
            for r in out["accuracy"]["rows"]:
                print(_row_md(r))
        if not args.skip_speed:
            out["speed"] = speed(args, Path(tmp))
            s = out["speed"]
            print(f"\nspeed ({s['model']} @ {s['image_size']} px, batch {s['batch']}, {s['threads']} threads, "
                  f"median of {s['rounds']} interleaved rounds): "
                  f"fp32 torch {s['fp32_torch_ips']:.1f} img/s, fp32 ONNX {s['fp32_onnx_ips']:.1f}, "
                  f"W8A8 ONNX {s['w8a8_onnx_ips']:.1f} ({s['w8a8_vs_torch']:.2f}x torch); "
                  f"size {s['fp32_onnx_bytes'] / 1e6:.1f} MB -> {s['w8a8_onnx_bytes'] / 1e6:.1f} MB")
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
