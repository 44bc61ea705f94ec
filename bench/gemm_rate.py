"""The matrix-product rate of this CPU: onnxruntime's u8 x s8 int8 product against fp32 (its own and torch's).

An INT8 bundle is faster than fp32 torch only as far as the int8 products are. With VNNI, one
vpdpbusd does four int8 multiply-adds per 32-bit lane where an FMA does one fp32; without it,
onnxruntime's kernels multiply bytes with vpmaddubsw and add pairs with vpmaddwd, which on AMD Zen 2
measured at fp32's rate (BENCHMARKS.md, issue 17), so INT8 buys no time there. One product of a
ViT-B-32 MLP's shape (8 views' 50 tokens x 768 -> 3,072), the least of --rounds runs, at each thread
count; the JSON records the CPU and its int8-relevant flags.

    .venv/bin/python bench/gemm_rate.py --threads 1,2 --out bench/results/gemm-rate.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine import machine_info
from onnx import TensorProto, helper, numpy_helper

M, K, N = 400, 768, 3072


def _session(int8: bool, threads: int, rng: np.random.Generator) -> ort.InferenceSession:
    """One MatMulInteger (uint8 activations, int8 weights; 7-bit values, as the export stores them) or MatMul."""
    if int8:
        weight, a_type, y_type, op = rng.integers(-64, 64, (K, N), dtype=np.int8), TensorProto.UINT8, TensorProto.INT32, "MatMulInteger"
    else:
        weight, a_type, y_type, op = rng.standard_normal((K, N)).astype(np.float32), TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", a_type, [M, K])],
                              [helper.make_tensor_value_info("y", y_type, [M, N])], [numpy_helper.from_array(weight, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _least(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(threads: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    torch.set_num_threads(threads)
    int8, fp32 = _session(True, threads, rng), _session(False, threads, rng)
    a8 = rng.integers(0, 256, (M, K), dtype=np.uint8)
    a32 = rng.standard_normal((M, K)).astype(np.float32)
    ta, tb = torch.from_numpy(a32), torch.randn(K, N)
    secs = {"onnxruntime_u8s8": _least(lambda: int8.run(None, {"a": a8}), rounds),
            "onnxruntime_fp32": _least(lambda: fp32.run(None, {"a": a32}), rounds),
            "torch_fp32": _least(lambda: torch.mm(ta, tb), rounds)}
    gmac = M * K * N / 1e9
    return {"ms": {k: round(1000 * v, 3) for k, v in secs.items()},
            "gmac_per_s": {k: round(gmac / v, 1) for k, v in secs.items()},
            "u8s8_over_torch_fp32": round(secs["torch_fp32"] / secs["onnxruntime_u8s8"], 3),
            "u8s8_over_onnxruntime_fp32": round(secs["onnxruntime_fp32"] / secs["onnxruntime_u8s8"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out")
    args = p.parse_args()
    result = {"machine": machine_info(), "shape": [M, K, N], "threads": {}}
    for t in (int(x) for x in args.threads.split(",")):
        result["threads"][str(t)] = measure(t, args.rounds)
        print(t, "threads:", json.dumps(result["threads"][str(t)]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
