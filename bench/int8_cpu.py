"""INT8 on this CPU: do onnxruntime's int8 kernels keep the quantised model's accuracy, and where
does the INT8 graph's time go. One run, for the CPU it runs on (recorded in the JSON).

accuracy: the CIFAR model, W8A8 with gaussian and real calibration, int8 weights on 8 bits and on
    7 (reduce_range, the export's default), each run through onnxruntime's kernels and as simulated
    QDQ (graph optimisations off: the same quantised values computed in fp32, so no kernel can
    overflow). Cosine of the embeddings to fp32 torch, and top-1 on CIFAR-10 test.
speed: ViT-B-32 at 224 px (random init): onnxruntime's profile of the W8A8 graph by op type, and
    images/s of quantiser variants against fp32 torch, timed in interleaved rounds in one run.

    .venv/bin/python bench/int8_cpu.py --threads 2 --out bench/results/int8-cpu.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from adaptclip.client.client import load_lines
from adaptclip.compression.export import QuantConfig, agreement, export_image_tower, quantize, run_onnx, session
from adaptclip.compression.spdfq import gaussian_images, real_images
from adaptclip.compression.models import ModelSpec
from adaptclip.compression.models import load_model
from quantize import SHARED, interleaved, load_test_set, onnx_runner, run_info, top1, write_results

SPEED_VARIANTS = {  # name -> QuantConfig overrides (W8A8 static QDQ, gaussian calibration)
    "w8a8 (export default: 7-bit weights)": {},
    "w8a8, 8-bit weights": {"reduce_range": False},
    "w8a8, per-tensor weights": {"per_channel": False},
    "w8a8, every op quantised": {"ops": "all"},
}


def accuracy(args: argparse.Namespace, work: Path) -> list[dict]:
    model_dir = Path(args.model_dir)
    hosted = load_model(ModelSpec(model=str(model_dir / "cifar-vit-w192-l6-rrc.json"),
                                  pretrained=str(model_dir / "cifar-vit-w192-l6-rrc.pt"), device="cpu"))
    classes, templates = load_lines(model_dir / "classes.txt"), load_lines(model_dir / "templates.txt")
    classifier = hosted.classifier(tuple(classes), tuple(templates)).numpy()
    x, y = load_test_set(hosted, Path(args.test_dir), classes, args.n_test)
    with torch.inference_mode():
        ref = torch.cat([hosted.module.encode_image(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
    rows = [{"model": "fp32 torch", "top1": top1(ref, classifier, y), "cosine": 1.0}]
    fp32 = export_image_tower(hosted.module, work / "cifar-fp32.onnx", hosted.image_size)
    calib = {"gaussian": gaussian_images(args.n_calib, hosted.image_size),
             "real": real_images(args.train_dir, hosted.preprocess, args.n_calib)}
    for source, images in calib.items():
        for reduce_range in (False, True):
            path = quantize(fp32, work / f"cifar-{source}-{reduce_range}.onnx", images.numpy(),
                            QuantConfig(bits="w8a8", reduce_range=reduce_range))
            for kernels in (True, False):
                emb = run_onnx(session(path, optimize=kernels, threads=args.threads), x.numpy())
                rows.append({"model": f"W8A8, {7 if reduce_range else 8}-bit weights, "
                                      f"{'int8 kernels' if kernels else 'simulated QDQ'}", "calib": source,
                             "top1": top1(emb, classifier, y), "cosine": agreement(ref, emb, {}).cosine_mean})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def op_profile(path: Path, pixels: np.ndarray, threads: int, runs: int = 3) -> dict[str, float]:
    """Share of the graph's kernel time per op type (onnxruntime's own profiler)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    opts.enable_profiling, opts.profile_file_prefix = True, str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, {"pixels": pixels})
    per_op: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(sess.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {op: round(us / total, 4) for op, us in per_op.most_common()}


def speed(args: argparse.Namespace, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    hosted = load_model(ModelSpec(model="ViT-B-32", random_init=True, device="cpu"))
    size = hosted.image_size
    fp32 = export_image_tower(hosted.module, work / "b32-fp32.onnx", size)
    calib = gaussian_images(8, size).numpy()
    paths = {name: quantize(fp32, work / f"b32-{i}.onnx", calib, QuantConfig(bits="w8a8", **kw))
             for i, (name, kw) in enumerate(SPEED_VARIANTS.items())}
    dynamic = work / "b32-dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    paths["dynamic int8 MatMul/Gemm (no calibration)"] = dynamic
    batch = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    runners = {"fp32 torch": lambda: hosted.module.encode_image(batch),
               "fp32 ONNX": onnx_runner(session(fp32, threads=args.threads), batch.numpy())}
    runners.update({name: onnx_runner(session(p, threads=args.threads), batch.numpy()) for name, p in paths.items()})
    timed = interleaved(runners, len(batch), args.rounds)
    base = timed["fp32 torch_ips"]
    return {"model": "ViT-B-32", "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
            "images_per_s": {name: timed[f"{name}_ips"] for name in runners},
            "range": {name: timed[f"{name}_ips_range"] for name in runners},
            "vs_fp32_torch": {name: timed[f"{name}_ips"] / base for name in runners},
            "w8a8_profile": op_profile(paths[next(iter(SPEED_VARIANTS))], batch.numpy(), args.threads)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=("accuracy", "speed"), default=["accuracy", "speed"])
    p.add_argument("--model-dir", default=str(SHARED))
    p.add_argument("--test-dir", default="/tmp/data/test")
    p.add_argument("--train-dir", default="/tmp/data/train")
    p.add_argument("--n-test", type=int, default=2000, help="stratified subsample of the test set")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--batch", type=int, default=8, help="speed: images per run")
    p.add_argument("--rounds", type=int, default=8, help="speed: interleaved rounds")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run_info()
    with tempfile.TemporaryDirectory() as tmp:
        if "accuracy" in args.parts:
            out["accuracy"] = accuracy(args, Path(tmp))
        if "speed" in args.parts:
            out["speed"] = speed(args, Path(tmp))
            print(json.dumps(out["speed"], indent=1))
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
