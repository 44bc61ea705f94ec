"""Several ONNX image towers (bundles' model.onnx) timed against the first, in alternating runs.

Each round runs every model once on the same random batch, in turn, so a slow minute on a shared
machine falls on all of them; the figure per model is its median over the rounds, and the ratio is
the first model's median over each one's. For graph changes that leave the numbers alone (the
export's attention, which ops are requantised): the bundles must share an input size.

    .venv/bin/python bench/onnx_ab.py /tmp/edge17/cifar-w8a8/model.onnx /tmp/edge17/cifar-w8a8-lean/model.onnx \
        --batch 16 --threads 2 --rounds 60 --out bench/results/onnx-ab-cifar-2thread.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from machine import machine_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="ONNX files; the first is the baseline")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out")
    args = p.parse_args()
    load = os.getloadavg()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = args.threads, 3
    sessions = [ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]) for m in args.models]
    size = sessions[0].get_inputs()[0].shape[-1]
    if not isinstance(size, int):
        raise SystemExit(f"{args.models[0]}: the input's spatial size is not fixed ({size!r})")
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    feeds = [({s.get_inputs()[0].name: pixels}, [s.get_outputs()[0].name]) for s in sessions]
    for s, (feed, out) in zip(sessions, feeds):  # warm-up
        s.run(out, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.rounds):
        for i, (s, (feed, out)) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            s.run(out, feed)
            times[i].append(1000 * (time.perf_counter() - start))
    medians = [statistics.median(t) for t in times]
    rows = [{"model": m, "median_ms": round(t, 2), "baseline_over_this": round(medians[0] / t, 3)}
            for m, t in zip(args.models, medians)]
    for row in rows:
        print(f"{row['median_ms']:9.2f} ms  x{row['baseline_over_this']:.3f}  {row['model']}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "machine": machine_info(load_average_at_start=load),
            "command": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
