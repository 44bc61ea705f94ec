"""Test-time adaptation on the edge (INT8 bundle, numpy + onnxruntime) against the fp32 torch service path.

One run, two parts:

  accuracy  CIFAR-10 test, `--per-class` images per class, clean and under the eval suite
            (adapt.shifts SUITE; `--held-out` adds the HELD_OUT families, averaged apart): edge
            zero-shot, edge GS-Bias (the W8A8 bundle, compression/edge_tta.py) and torch GS-Bias
            (fp32, the served loop), all with the bundle's recorded adaptation block
            (examples/cifar-clip.yaml's: gate, chunks, crops). Image i is corrupted and its views
            drawn with seed + i on both paths: the same draws (adapt/draws.py), so the same views up
            to each renderer's arithmetic, and the gap is the INT8 bundle against the fp32 model.
  cost      per image at --views V (default 32 and 64), GS-Bias over all V views (no gate, no early
            stop): render, encode, adapt and the wall time of the whole path (rendering overlapped
            with encoding on both), against "the encoder over its views" (view 0 with patches + the
            V - 1 views in even pieces of RENDER_CHUNK, encoded alone; the paths cut AugMix views
            into a ramp of pieces, adapt/pieces.py). Each timed run starts after QUIET_S idle.
            Torch = the server's ImageViews + classify_image with a real batcher; edge =
            EdgeAdapter.classify, on the bundle opened as the edge CLI opens it for the settings
            (onnxruntime's workers spinning unless AugMix renders beside them,
            edge_tta.spin_while_adapting); the edge encoder alone always spins, its quickest.
            Models: the CIFAR model (its bundle) and ViT-B-32 random init (its bundle), with the
            bundle's crops / AugMix; `--b32-model` swaps in another random-init config for the
            second (a shallower ViT-B/32 stands in for a CPU that encodes faster, where rendering
            weighs more beside the encoder).

    .venv/bin/python bench/edge_tta.py --cifar-bundle B --cifar-model JSON --cifar-pretrained PT \\
        --b32-bundle B32 --per-class 40 --out bench/results/edge_tta.json
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info

from adaptclip.adapt.data import decode_shifted, load_folder
from adaptclip.adapt.methods import adapt_views
from adaptclip.adapt.pieces import RENDER_CHUNK
from adaptclip.adapt.shifts import HELD_OUT, SHIFT_NAMES, SUITE, get_shift
from adaptclip.adapt.views import render_views
from adaptclip.compression.edge_model import EdgeModel
from adaptclip.compression.edge_tta import EdgeAdapter, edge_settings, spin_while_adapting
from adaptclip.compression.models import ModelSpec, load_model
from adaptclip.server.config import BatchingConfig
from adaptclip.server.hosting import Hosted
from adaptclip.server.pipeline import ImageViews, classify_image


def accuracy(args: argparse.Namespace, edge: EdgeModel, hosted, log) -> dict:
    labels, weights = edge.label_set()
    base, ignored = edge_settings(edge.adaptation)
    data = load_folder(args.data, classes=labels, limit_per_class=args.per_class, seed=0)
    classifier = torch.from_numpy(weights.copy())
    names = SHIFT_NAMES if args.held_out else ("clean", *SUITE)
    shifts = tuple(get_shift(name) for name in names)
    log(f"accuracy: {len(data.paths)} images x {len(shifts)} shifts, settings {base}")
    out: dict = {"images_per_shift": len(data.paths), "settings": str(base), "ignored": ignored, "shifts": {}}
    pool = concurrent.futures.ThreadPoolExecutor(2)
    torch_path = TorchPath(hosted, classifier, pool)
    seconds = {"torch": 0.0, "edge": 0.0}
    with EdgeAdapter(edge, base) as adapter:
        for shift in shifts:
            hits = dict.fromkeys(("edge_zero_shot", "edge_gs_bias", "torch_zero_shot", "torch_gs_bias"), 0)
            views = {"edge": 0, "torch": 0}
            paired = {"edge_only": 0, "torch_only": 0, "same_answer": 0}  # GS-Bias: right on one path alone
            for i, (path, label) in enumerate(zip(data.paths, data.labels)):
                img = decode_shifted(path, shift, base.seed + i)
                start = time.perf_counter()
                answer = adapter.classify(img, seed=base.seed + i)
                seconds["edge"] += time.perf_counter() - start
                edge_top1 = int(np.argmax(answer.logits))
                hits["edge_gs_bias"] += int(edge_top1 == label)
                hits["edge_zero_shot"] += int(np.argmax(answer.zero_shot) == label)
                views["edge"] += answer.report["views_encoded"]
                start = time.perf_counter()
                row = torch_path(img, base.replace(seed=base.seed + i), timed=False)
                seconds["torch"] += time.perf_counter() - start
                hits["torch_gs_bias"] += int(row["top1"] == label)
                hits["torch_zero_shot"] += int(row["zero_shot_top1"] == label)
                views["torch"] += row["views_encoded"]
                edge_right, torch_right = edge_top1 == label, row["top1"] == label
                paired["edge_only"] += int(edge_right and not torch_right)
                paired["torch_only"] += int(torch_right and not edge_right)
                paired["same_answer"] += int(edge_top1 == row["top1"])
                if args.reseed:  # the same torch path with other views: how much the view draws alone move it
                    other = torch_path(img, base.replace(seed=base.seed + i + args.reseed), timed=False)
                    hits["torch_gs_bias_reseeded"] = hits.get("torch_gs_bias_reseeded", 0) + int(other["top1"] == label)
            n = len(data.paths)
            out["shifts"][shift.name] = {**{k: 100 * v / n for k, v in hits.items()},
                                         **{f"{k}_views_mean": v / n for k, v in views.items()}, **paired}
            log(f"  {shift.name}: {json.dumps(out['shifts'][shift.name])}")
    torch_path.close()
    pool.shutdown()
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    suite = [out["shifts"][name] for name in ("clean", *SUITE)]  # the target's mean: clean + the eval suite
    out["mean"] = {k: statistics.mean(r[k] for r in suite) for k in hits}
    if args.held_out:
        held = [out["shifts"][name] for name in HELD_OUT]
        out["mean_held_out"] = {k: statistics.mean(r[k] for r in held) for k in hits}
        out["edge_minus_torch_gs_bias_95_held_out"] = _paired_interval(held, len(data.paths))
    out["edge_minus_torch_gs_bias"] = out["mean"]["edge_gs_bias"] - out["mean"]["torch_gs_bias"]
    out["edge_minus_torch_gs_bias_95"] = _paired_interval(suite, len(data.paths))
    return out


QUIET_S = 0.1  # idle before each timed run: onnxruntime's intra-op workers spin ~30-40 ms after a Run


def _quiet() -> None:
    """Let the other library's spinning worker threads go idle, so an interleaved measurement does not
    time one path against the other's leftover spin (one core busy for ~30-40 ms after an onnxruntime
    Run here, ~10 ms after torch's OpenMP ops); production runs one of them, not both in turn."""
    time.sleep(QUIET_S)


def _paired_interval(rows: list[dict], n: int) -> list[float]:
    """95 % interval (points) of the edge - torch GS-Bias gap over all rows' images, from the per-image
    paired differences (+1 edge alone right, -1 torch alone right, 0 else): the two paths see the same
    images and views, so their discordant answers alone carry the gap's noise."""
    total = n * len(rows)
    plus, minus = sum(r["edge_only"] for r in rows), sum(r["torch_only"] for r in rows)
    mean = (plus - minus) / total
    se = math.sqrt(max((plus + minus) / total - mean**2, 0.0) / (total - 1))
    return [round(100 * (mean - 1.96 * se), 3), round(100 * (mean + 1.96 * se), 3)]


class TorchPath:
    """The server's view path for one model, kept across images as a server keeps it (one event loop,
    one Hosted: its batcher and encoder thread; a fresh one per image timed thread start-up too):
    ImageViews (rendering overlapped with the batcher) + the loop (gate, chunks, early stop as set)."""

    def __init__(self, model, classifier, pool) -> None:
        self.model, self.classifier, self.pool = model, classifier, pool
        self.loop = asyncio.new_event_loop()
        self.hosted = Hosted(model)
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        self.hosted.start(BatchingConfig(max_batch_size=64))

    def close(self) -> None:
        self.loop.run_until_complete(self.hosted.close())  # a torch model holds nothing to free: it lives on
        self.loop.close()

    def __call__(self, img, s, timed: bool = True) -> dict:
        """One image; `timed` adds the stage times and the encoder alone."""
        return self.loop.run_until_complete(self._one(img, s, timed))

    async def _one(self, img, s, timed: bool) -> dict:
        view0 = self.model.preprocess(img)

        async def decode():
            return img, view0

        views = ImageViews(self.hosted, s, decode, None, self.pool)
        if timed:
            _quiet()
        start = time.perf_counter()
        out = await classify_image(self.hosted, views, self.classifier, (), s, self.pool)
        wall = time.perf_counter() - start
        logits = out.zero_shot if out.result is None else out.result.logits
        if not timed:
            return {"top1": int(logits.argmax()), "zero_shot_top1": int(out.zero_shot.argmax()),
                    "views_encoded": out.report.views_encoded}
        t0 = time.perf_counter()
        adapt_views(s, views.feats, views.patches, self.classifier, self.model.logit_scale)
        adapt = time.perf_counter() - t0
        assert out.report.views_encoded == s.views
        return {"wall_ms": 1000 * wall, "render_ms": views.render_us / 1000, "encode_ms": views.encode_us / 1000,
                "adapt_ms": 1000 * adapt, "encoder_only_ms": _torch_encoder_ms(self.model, img, view0, s)}


@torch.inference_mode()
def _torch_encoder_ms(model, img, view0, s) -> float:
    """The encoder over the image's views alone, in the pieces the pipeline sends."""
    views = render_views(model, img, view0, s)
    _quiet()
    start = time.perf_counter()
    model.encode_images(views[:1], with_patches=True)
    for lo in range(1, s.views, RENDER_CHUNK):  # even pieces: the encoder as it batches best, not the ramp
        model.encode_images(views[lo:lo + RENDER_CHUNK])
    return 1000 * (time.perf_counter() - start)


def _edge_path(adapter: EdgeAdapter, img, edge: EdgeModel) -> dict:
    """One image through the adapter (kept across images, as an edge runner keeps it), and the encoder
    alone (`edge`: the bundle with onnxruntime's workers spinning, its quickest, whatever the adapter's do)."""
    s = adapter.s
    _quiet()
    answer = adapter.classify(img)
    assert answer.report["views_encoded"] == s.views and not answer.report["global_only"]
    views = adapter.renderer(img, s.views, seed=s.seed)
    _quiet()
    start = time.perf_counter()
    edge.encode(views[:1], with_patches=True)
    for lo in range(1, s.views, adapter.render_chunk):
        edge.encode(views[lo:lo + adapter.render_chunk])
    t = answer.timings_ms
    return {"wall_ms": t["total_ms"], "render_ms": t["render_ms"], "encode_ms": t["encode_ms"],
            "adapt_ms": t["adapt_ms"], "encoder_only_ms": 1000 * (time.perf_counter() - start)}


def _summary(rows: list[dict]) -> dict:
    """Medians per stage, and the median of each image's wall / encoder (the two measured back to back)."""
    out = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    out["wall_over_encoder"] = round(statistics.median(r["wall_ms"] / r["encoder_only_ms"] for r in rows), 3)
    return out


def _best(rows: list[dict]) -> dict:
    """One image's repeats: the least of each time. Interference on a shared machine only ever adds
    time, so the minimum of a few back-to-back repeats is the undisturbed figure (ratios of medians
    of single shots moved by 0.1 between identical runs here)."""
    return {k: min(r[k] for r in rows) for k in rows[0]}


def cost(name: str, bundle: str, threads: int, hosted, images, views_list, log, repeats: int = 1) -> dict:
    edge = EdgeModel(bundle, ["CPUExecutionProvider"], threads)  # spinning: the encoder-only baseline
    base, _ = edge_settings(edge.adaptation)
    _, weights = edge.label_set()
    classifier = torch.from_numpy(weights.copy())
    pool = concurrent.futures.ThreadPoolExecutor(2)
    out = {}
    for n_views in views_list:
        s = base.replace(method="gs_bias", views=n_views, skip_entropy=0.0, view_chunk=0)
        torch_path = TorchPath(hosted, classifier, pool)
        spin = spin_while_adapting(s)  # as the edge CLI opens the bundle for these settings
        path_model = edge if spin else EdgeModel(bundle, ["CPUExecutionProvider"], threads, spin=False)
        with EdgeAdapter(path_model, s) as adapter:
            _edge_path(adapter, images[0], edge), torch_path(images[0], s)  # warm-up
            edge_rows, torch_rows = [], []
            for img in images:  # interleaved, so both paths see the same machine load
                edge_reps, torch_reps = [], []
                for _ in range(repeats):
                    edge_reps.append(_edge_path(adapter, img, edge))
                    torch_reps.append(torch_path(img, s))
                edge_rows.append(_best(edge_reps))
                torch_rows.append(_best(torch_reps))
        torch_path.close()
        e, t = _summary(edge_rows), _summary(torch_rows)
        speedup = statistics.median(tr["wall_ms"] / er["wall_ms"] for tr, er in zip(torch_rows, edge_rows))
        out[str(n_views)] = {"edge_int8": e, "torch_fp32": t, "torch_over_edge_wall": round(speedup, 3),
                             "settings": {"crop_scale": s.crop_scale, "augmix": s.augmix, "edge_spins": spin}}
        log(f"cost {name} V={n_views}: {json.dumps(out[str(n_views)])}")
    pool.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar-bundle", required=True)
    p.add_argument("--cifar-model", required=True)
    p.add_argument("--cifar-pretrained", required=True)
    p.add_argument("--b32-bundle", required=True, help="ViT-B-32 random-init bundle (cost only: its weights need not be the torch ones)")
    p.add_argument("--b32-model", default="ViT-B-32",
                   help="the torch model beside --b32-bundle (random init): the config the bundle was exported from")
    p.add_argument("--data", default="/tmp/data/test")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--held-out", action="store_true",
                   help="accuracy: also the nine held-out shift families (their own mean; the target's is clean + SUITE)")
    p.add_argument("--cost-images", type=int, default=8)
    p.add_argument("--views", default="32,64")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--reseed", type=int, default=0,
                   help="also run torch GS-Bias with views drawn from seed + i + RESEED (a noise control)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads, both")
    p.add_argument("--repeats", type=int, default=1,
                   help="cost: each image's paths this many times, interleaved; each time is the least of its repeats")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    result: dict = {"machine": machine_info(threads=torch.get_num_threads()), "command": vars(args)}
    cifar_edge = EdgeModel(args.cifar_bundle, ["CPUExecutionProvider"], args.threads)
    cifar = load_model(ModelSpec(model=args.cifar_model, pretrained=args.cifar_pretrained, device="cpu"))
    if not args.skip_accuracy:
        result["accuracy"] = accuracy(args, cifar_edge, cifar, log)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))  # kept if the cost part dies
    if args.skip_cost:
        return
    data = load_folder(args.data, classes=cifar_edge.label_set()[0], limit_per_class=1, seed=1)
    images = [decode_shifted(path, get_shift("clean"), 0) for path in data.paths[:args.cost_images]]
    views_list = [int(v) for v in args.views.split(",")]
    result["cost"] = {"cifar": cost("cifar", args.cifar_bundle, args.threads, cifar, images, views_list, log,
                                    args.repeats)}
    torch.manual_seed(0)
    b32 = load_model(ModelSpec(model=args.b32_model, device="cpu", random_init=True))
    big = [img.resize((256, 256)) for img in images]  # CIFAR's 32 px upscaled: 224-px views need that much
    result["cost"]["vit_b_32"] = cost("vit_b_32", args.b32_bundle, args.threads, b32, big, views_list, log,
                                      args.repeats)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
