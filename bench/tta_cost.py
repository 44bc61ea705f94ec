"""Per-image cost of each test-time adaptation method: latency and peak memory, side by side.

ViT-B-32 at 224 px (random init: cost does not depend on the weights), V = 64 views, with 10 and
with 1,000 labels. Every (method, labels) pair runs in a fresh subprocess, so its peak resident
memory is its own; the parent samples the child's RSS and stops it past --mem-limit-gb (reported
as such). Rows:
  floor    the bare encoder forward of the 64 views (no patch tokens, no adaptation)
  none     zero-shot: the original view only
  gs_bias  encoder over the views (+ view 0's patch tokens) + GS-Bias
  zero     encoder over the views + ZERO
  tpt      encoder over the views + TPT as served: one AdamW step through the text tower for every
           class, the tower run over at most 128 prompts at a time with autograd (exact gradient)
  tpt_all  the same TPT with all prompts through the tower at once, as the paper's code
Rendering the augmented views is the same for every method and is reported on its own line.

    .venv/bin/python bench/tta_cost.py --model ViT-B-32 --views 64 --labels 10,1000
    .venv/bin/python bench/tta_cost.py --labels 1000 --tpt-repeats 1 --no-tpt-warmup   # TPT takes minutes here
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("floor", "none", "gs_bias", "zero", "tpt", "tpt_all")


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process; prints a JSON line."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from adaptclip.compression.models import image_features
    from adaptclip.adapt.methods import TextSide, adapt_views
    from adaptclip.adapt.settings import AdaptSettings
    from adaptclip.adapt.views import ViewGenerator

    torch.manual_seed(0)
    model = open_clip.create_model(args.model)
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    labels = [f"object number {i}" for i in range(args.n_labels)]
    dim = model.text_projection.shape[1]
    classifier = F.normalize(torch.randn(args.n_labels, dim), dim=-1)  # cost does not depend on its values
    image = torch.rand(3, 300, 400)
    view0 = torch.rand(1, 3, size, size)
    gen = ViewGenerator(size, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    if args.method == "render":
        fn = lambda: gen([image], view0, args.views, seed=0)  # noqa: E731
    else:
        views = gen([image], view0, args.views, seed=0)[0]
        method = "tpt" if args.method.startswith("tpt") else args.method
        settings = AdaptSettings(method=method if method in ("gs_bias", "zero", "tpt") else "none", views=args.views)
        text = TextSide(model, tokenizer, labels, **({"class_chunk": None} if args.method == "tpt_all" else {}))
        scale = float(model.logit_scale.exp())

        def fn():
            with torch.inference_mode():
                if args.method == "floor":
                    return model.encode_image(views)
                if args.method == "none":
                    return image_features(model, views[:1], False)[0] @ classifier.T
                feats, patches = image_features(model, views, args.method == "gs_bias")
            if args.method == "gs_bias":
                return adapt_views(settings, feats, patches[0], classifier, scale)
            return adapt_views(settings, feats, None, classifier, scale, text)

    base_rss = rss_mb()
    times = []
    tpt = args.method.startswith("tpt")
    warmup = 0 if tpt and args.no_tpt_warmup else 1
    for i in range((args.tpt_repeats if tpt else args.repeats) + warmup):  # a warm-up run is not timed
        t = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": args.method, "labels": args.n_labels, "ms": statistics.median(times) * 1000,
                      "peak_rss_mb": peak, "setup_rss_mb": base_rss}), flush=True)


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_one(args: argparse.Namespace, method: str, n_labels: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--n-labels", str(n_labels), "--model",
           args.model, "--views", str(args.views), "--repeats", str(args.repeats), "--tpt-repeats",
           str(args.tpt_repeats)] + (["--no-tpt-warmup"] if args.no_tpt_warmup else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    start, peak = time.monotonic(), 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, rss_mb(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        if peak > args.mem_limit_gb * 1024 or time.monotonic() - start > args.timeout:
            proc.kill()
            proc.wait()
            why = f"over {args.mem_limit_gb:g} GB" if peak > args.mem_limit_gb * 1024 else f"over {args.timeout:.0f} s"
            return {"method": method, "labels": n_labels, "stopped": why, "peak_rss_mb": peak}
        time.sleep(0.02)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        return {"method": method, "labels": n_labels, "stopped": f"exit {proc.returncode}", "peak_rss_mb": peak}
    return json.loads(out[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--labels", default="10,1000")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tpt-repeats", type=int, default=3, help="timed runs for the TPT rows")
    p.add_argument("--no-tpt-warmup", action="store_true", help="time TPT's first call (minutes at 1,000 labels)")
    p.add_argument("--mem-limit-gb", type=float, default=18.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per (method, labels) subprocess")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--n-labels", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = [run_one(args, "render", 10)]
    for n in (int(x) for x in args.labels.split(",")):
        rows += [run_one(args, m, n) for m in args.methods.split(",")]
    tpt_runs = f"{args.tpt_repeats} run(s)" + (", no warm-up" if args.no_tpt_warmup else " after a warm-up")
    print(f"\n{args.model}, {args.views} views, medians of {args.repeats} runs after a warm-up (TPT rows: "
          f"{tpt_runs}); peak = the "
          f"process's peak RSS (model and inputs included), extra = peak minus RSS after set-up\n")
    print("| labels | method | ms / image | vs floor | peak RSS MB | extra MB |")
    print("|---:|---|---:|---:|---:|---:|")
    floors = {r["labels"]: r["ms"] for r in rows if r["method"] == "floor" and "ms" in r}
    for r in rows:
        if "stopped" in r:
            print(f"| {r['labels']} | {r['method']} | stopped: {r['stopped']} | | >= {r['peak_rss_mb']:.0f} | |")
            continue
        floor = floors.get(r["labels"])
        ratio = f"{r['ms'] / floor:.2f}x" if floor and r["method"] != "render" else ""
        label = "render views (all methods)" if r["method"] == "render" else r["method"]
        print(f"| {r['labels'] if r['method'] != 'render' else ''} | {label} | {r['ms']:.0f} | {ratio} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['setup_rss_mb']:.0f} |")
    for n in sorted({r["labels"] for r in rows if r["method"] != "render"}):
        by = {r["method"]: r for r in rows if r["labels"] == n and r["method"] != "render"}
        gs = by.get("gs_bias", {})
        for name in ("tpt", "tpt_all"):
            other = by.get(name)
            if "ms" not in gs or other is None:
                continue
            speed = f"{other['ms'] / gs['ms']:.1f}x faster" if "ms" in other else \
                f"not timed (TPT {other['stopped']})"
            bound = "<= " if "stopped" in other else ""
            print(f"- {n} labels, GS-Bias vs {name}: {speed}; peak RSS {bound}"
                  f"{100 * gs['peak_rss_mb'] / other['peak_rss_mb']:.1f} % of TPT's")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
