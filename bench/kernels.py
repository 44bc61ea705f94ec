"""Triton kernels against their torch references: time, speed-up, and (views) memory throughput.

On CUDA each op is checked against its reference (max abs difference), then both are timed with
triton.testing.do_bench (median ms) in the same run, and one table is printed with the GPU name:

- views: 64 views at 224 px from one 500 x 375 photo (bicubic, fp16 out), target >= 5x;
  achieved GB/s counts the bytes a perfect kernel moves (the photo once, every view once) and
  is compared with the GPU's memory bandwidth.
- gsbias: 16 images x 64 views x 1,000 classes, D = 512, P = 196, K = 16, official settings,
  fp32 and fp16 features, target >= 10x; and one image (what the server runs per request: compare
  its time with the 16-image row's over 16 to see what batching requests into one launch would save).
- tokens: one ViT-B-16 reduction stage, 64 images x 197 tokens x 768, keep 0.7, fused, target >= 2x.
- scores: the CLS-attention score of one ViT-B-16 block (12 heads) on the same tokens, no target.

Without CUDA it only says so (exit status 1); `--smoke` instead runs each kernel once on tiny
inputs in Triton's CPU interpreter (it sets TRITON_INTERPRET=1 before triton is imported) and
prints its max difference to the reference: a correctness check, not a timing.

    .venv/bin/python bench/kernels.py                    # on a CUDA machine
    .venv/bin/python bench/kernels.py --ops views --peak-gbs 4800 --json /tmp/kernels.json
    .venv/bin/python bench/kernels.py --smoke            # anywhere
    .venv/bin/python bench/kernels.py --compile 90       # anywhere: build every kernel for sm_90

`--compile ARCH` needs no GPU either: it compiles each kernel at the benchmark's tile sizes down
to a cubin for CUDA compute capability ARCH and prints ptxas' register and spill counts, which
catches what the interpreter cannot (type and lowering errors, register pressure).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS = ("views", "gsbias", "tokens", "scores")
TARGETS = {"views": 5.0, "gsbias": 10.0, "tokens": 2.0, "scores": None}
DEFAULT_PEAK_GBS = 4800.0  # H200 HBM3e, when the device properties do not say


@dataclass
class Case:
    """One comparison: both callables, the target speed-up and the bytes a perfect kernel moves."""

    op: str
    shape: str
    kernel: Callable[[], object]
    torch_ref: Callable[[], object]
    target: float | None
    min_bytes: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="GPU memory bandwidth in GB/s (default: from the device properties, "
                             f"else {DEFAULT_PEAK_GBS:g})")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=200, help="do_bench measuring time, ms")
    parser.add_argument("--json", metavar="PATH", help="also write the CUDA results (device, rows) as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny interpreter check on CPU, no timing")
    parser.add_argument("--compile", type=int, metavar="ARCH", help="only compile for sm_ARCH (e.g. 90), no GPU")
    return parser.parse_args(argv)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def crop_boxes(n: int, height: int, width: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """RandomResizedCrop-like boxes (scale 0.08..1, ratio 3/4..4/3), clipped to the image, seeded."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(n):
        area = height * width * (0.08 + 0.92 * float(torch.rand((), generator=g)))
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand((), generator=g)))
        h = min(height, max(1, round(math.sqrt(area / ratio))))
        w = min(width, max(1, round(math.sqrt(area * ratio))))
        top = int(float(torch.rand((), generator=g)) * (height - h + 1))
        left = int(float(torch.rand((), generator=g)) * (width - w + 1))
        boxes.append((top, left, h, w))
    return boxes


def views_case(device: str, n_views: int, size: int, photo: tuple[int, int], out_dtype: torch.dtype) -> Case:
    from adaptclip.kernels.views import render_batch, render_batch_torch

    height, width = photo
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    boxes = [crop_boxes(n_views, height, width)]
    flips = torch.rand(1, n_views, generator=torch.Generator().manual_seed(1)) < 0.5
    args = ([image], boxes, flips, size, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), "bicubic", out_dtype)
    moved = image.numel() * image.element_size() + n_views * 3 * size * size * out_dtype.itemsize
    return Case("views", f"V={n_views} {size}px from {width}x{height} fp32 -> {_name(out_dtype)}",
                lambda: render_batch(*args), lambda: render_batch_torch(*args), TARGETS["views"], moved)


def gsbias_case(device: str, batch: int, views: int, classes: int, dim: int, patches: int, top_k: int,
                dtype: torch.dtype) -> Case:
    from adaptclip.adapt.gsbias import gs_bias as gs_bias_torch
    from adaptclip.kernels.gsbias import gs_bias

    g = torch.Generator().manual_seed(0)
    feats, patch_feats, weights = (F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device, dtype)
                                   for shape in ((batch, views, dim), (batch, patches, dim), (classes, dim)))
    kwargs = dict(top_k_patches=top_k)  # the official ImageNet settings otherwise (the defaults)
    return Case("gsbias", f"B={batch} V={views} C={classes} D={dim} P={patches} K={top_k} {_name(dtype)}",
                lambda: gs_bias(feats, patch_feats, weights, **kwargs).logits,
                lambda: gs_bias_torch(feats, patch_feats, weights, **kwargs).logits, TARGETS["gsbias"])


def tokens_case(device: str, n: int, tokens: int, dim: int, keep: float, dtype: torch.dtype) -> Case:
    from adaptclip.compression.tokens import kept_count, reduce_tokens as reduce_tokens_torch
    from adaptclip.kernels.token_select import reduce_tokens

    g = torch.Generator().manual_seed(0)
    n_patch = tokens - 1
    x = torch.randn(n, tokens, dim, generator=g).to(device, dtype)
    index = torch.arange(n_patch, device=device).expand(n, -1)
    scores = torch.rand(n, n_patch, generator=g).softmax(-1).to(device)
    k = kept_count(n_patch, keep)
    return Case("tokens", f"N={n} L={tokens} D={dim} keep={keep} fused {_name(dtype)}",
                lambda: reduce_tokens(x, index, scores, k, True, False)[0],
                lambda: reduce_tokens_torch(x, index, scores, k, True, False)[0], TARGETS["tokens"])


def scores_case(device: str, n: int, tokens: int, dim: int, heads: int, dtype: torch.dtype) -> Case:
    from open_clip.transformer import ResidualAttentionBlock

    from adaptclip.compression.tokens import cls_attention as cls_attention_torch
    from adaptclip.kernels.token_select import cls_attention

    torch.manual_seed(0)
    block = ResidualAttentionBlock(dim, heads, batch_first=True).eval().requires_grad_(False).to(device, dtype)
    with torch.no_grad():
        y = block.ln_1(torch.randn(n, tokens, dim, device=device, dtype=dtype))
    return Case("scores", f"N={n} L={tokens} D={dim} H={heads} {_name(dtype)}",
                lambda: cls_attention(block, y), lambda: cls_attention_torch(block, y), TARGETS["scores"])


def cases(ops: list[str], device: str, small: bool) -> list[Case]:
    """The benchmark shapes, or tiny ones for the interpreter smoke check."""
    out = []
    if "views" in ops:
        out.append(views_case(device, 3, 8, (15, 20), torch.float32) if small
                   else views_case(device, 64, 224, (375, 500), torch.float16))
    if "gsbias" in ops:
        dtypes = (torch.float32,) if small else (torch.float32, torch.float16)
        shape = (2, 8, 40, 16, 10, 4) if small else (16, 64, 1000, 512, 196, 16)
        out += [gsbias_case(device, *shape, dt) for dt in dtypes]
        if not small:  # one request's GS-Bias, as the server launches it
            out.append(gsbias_case(device, 1, *shape[1:], torch.float32))
    if "tokens" in ops:
        out.append(tokens_case(device, 2, 17, 24, 0.7, torch.float32) if small
                   else tokens_case(device, 64, 197, 768, 0.7, torch.float16))
    if "scores" in ops:
        out.append(scores_case(device, 2, 17, 32, 2, torch.float32) if small
                   else scores_case(device, 64, 197, 768, 12, torch.float16))
    return out


def max_diff(case: Case) -> float:
    return float((case.kernel().float() - case.torch_ref().float()).abs().max())


def peak_bandwidth(requested: float | None) -> tuple[float, str]:
    """GB/s and where the figure came from."""
    if requested is not None:
        return requested, "--peak-gbs"
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties"
    return DEFAULT_PEAK_GBS, "default"


def measure(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Check then time every case on CUDA: (device facts, one row per case)."""
    import triton
    from triton.testing import do_bench

    peak, source = peak_bandwidth(args.peak_gbs)
    props = torch.cuda.get_device_properties(0)
    device = dict(gpu=torch.cuda.get_device_name(0), capability=f"sm_{props.major}{props.minor}",
                  peak_gbs=peak, peak_source=source, torch=torch.__version__, triton=triton.__version__)
    rows = []
    for case in cases(args.ops, "cuda", small=False):
        diff = max_diff(case)
        t_ref = do_bench(case.torch_ref, warmup=args.warmup, rep=args.rep, return_mode="median")
        t_ker = do_bench(case.kernel, warmup=args.warmup, rep=args.rep, return_mode="median")
        gbs = case.min_bytes / (t_ker * 1e-3) / 1e9 if case.min_bytes else None
        rows.append(dict(op=case.op, shape=case.shape, max_diff=diff, torch_ms=t_ref, triton_ms=t_ker,
                         speedup=t_ref / t_ker, target=case.target, gbs=gbs,
                         peak_pct=None if gbs is None else 100 * gbs / peak))
    return device, rows


def table(device: dict, rows: list[dict]) -> str:
    """The results as printed: the GPU line, then one line per case."""
    header = f"{'op':7} {'shape':52} {'max |diff|':>10} {'torch ms':>9} {'triton ms':>9} {'speed-up':>8} " \
             f"{'target':>6} {'GB/s':>7} {'% peak':>6}"
    lines = [f"GPU: {device['gpu']} ({device['capability']}); memory bandwidth {device['peak_gbs']:,.0f} GB/s "
             f"({device['peak_source']}); torch {device['torch']}, triton {device['triton']}", header, "-" * len(header)]
    for r in rows:
        throughput = f"{'-':>7} {'-':>6}" if r["gbs"] is None else f"{r['gbs']:7.0f} {r['peak_pct']:5.1f}%"
        target, verdict = ("-", "") if r["target"] is None else (
            f"{r['target']:.0f}x", "ok" if r["speedup"] >= r["target"] else "MISS")
        lines.append(f"{r['op']:7} {r['shape']:52} {r['max_diff']:10.2e} {r['torch_ms']:9.3f} {r['triton_ms']:9.3f} "
                     f"{r['speedup']:7.1f}x {target:>6} {throughput}  {verdict}")
    return "\n".join(lines)


def run_cuda(args: argparse.Namespace) -> None:
    import json

    device, rows = measure(args)
    print(table(device, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), device=device, rows=rows), f, indent=1)


def run_smoke(args: argparse.Namespace) -> None:
    print("interpreter smoke check (TRITON_INTERPRET=1, CPU): tiny shapes, max |kernel - torch|, no timing")
    for case in cases(args.ops, "cpu", small=True):
        print(f"{case.op:7} {case.shape:52} {max_diff(case):10.2e}")


def run_compile(arch: int) -> None:
    """Every kernel through Triton's full pipeline for sm_<arch>, with ptxas' resource report."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from adaptclip.kernels import gsbias, token_select, views

    f32, f16, i64 = torch.float32, torch.float16, torch.int64
    pointer = {f32: "*fp32", f16: "*fp16", torch.bfloat16: "*bf16", i64: "*i64", torch.uint8: "*u8"}
    kernels = [  # (label, kernel, pointer dtypes by argument name, constexprs, num_warps)
        ("views u8 -> fp16", views._views_kernel, dict(src=torch.uint8, meta=i64, out=f16),
         dict(BICUBIC=True, BLOCK_Y=8, BLOCK_X=32, TAPS_X=16, TAPS_Y=16), 8),
        ("gsbias logits fp16", gsbias._logits_kernel, dict(a=f16, w=f16, out=f32),
         dict(F32_DOT=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 8),
        ("gsbias logits fp32", gsbias._logits_kernel, dict(a=f32, w=f32, out=f32),
         dict(F32_DOT=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 8),
        ("gsbias saliency", gsbias._saliency_kernel, dict(patch_logits=f32, parts=f32), dict(BLOCK_P=64, BLOCK_C=64), 4),
        ("gsbias adapt", gsbias._adapt_kernel, dict.fromkeys(
            ("view_logits", "patch_logits", "parts", "bias_g", "hist_g", "bias_s", "hist_s", "logits_out"), f32)
         | dict(steps_out=i64), dict(HAS_PATCHES=True, BLOCK_C=128, BLOCK_V=64, BLOCK_KV=8, BLOCK_P=256, BLOCK_Q=32,
                                     BLOCK_KP=16), 8),
        ("token select fp16", token_select._select_kernel,
         dict(x=f16, index=i64, scores=f32, out=f16, out_index=i64),
         dict(FUSE=True, FUSED_IN=True, BLOCK_P=32, BLOCK_Q=64, BLOCK_D=128), 4),
        ("cls scores fp16", token_select._cls_scores_kernel, dict(y=f16, folded=f32, out=f32),
         dict(BLOCK_H=16, BLOCK_L=64, BLOCK_D=32), 4),
    ]
    floats = {"scale", "alpha", "beta", "momentum", "keep", "log_kv", "log_kp", "src_scale"} | {
        f"{name}{c}" for name in ("mean", "std") for c in "012"}
    print(f"Triton {triton.__version__}, sm_{arch}: registers and spills per kernel (ptxas -v)")
    for label, kernel, pointers, constexprs, num_warps in kernels:
        signature = {name: "constexpr" if name in constexprs else pointer[pointers[name]] if name in pointers
                     else "fp32" if name in floats else "i32" for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else
                                     f"--gpu-name=sm_{arch}", ptx.name, "-o", os.devnull],
                                    capture_output=True, text=True).stderr
        usage = [line.split("info    :")[-1].strip() for line in report.splitlines() if "Used" in line or "spill" in line]
        print(f"{label:20} {num_warps} warps  " + "; ".join(usage))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile is not None:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("--compile needs TRITON_INTERPRET unset (the kernels must be compiled, not interpreted)",
                  file=sys.stderr)
            return 2
        run_compile(args.compile)
        return 0
    if args.smoke:
        if "triton" in sys.modules:
            print("--smoke must start before triton is imported (it sets TRITON_INTERPRET=1)", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton (see kernels/_common.py)
        run_smoke(args)
        return 0
    if not torch.cuda.is_available():
        print("bench/kernels.py times the Triton kernels on CUDA; no CUDA device here. "
              "Run it on a GPU machine, or --smoke for an interpreter correctness check on CPU.")
        return 1
    run_cuda(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
