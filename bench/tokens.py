"""Token compression: encoder speed-up (ViT-B-16) against accuracy (the CIFAR model), one script.

speed: images/s of the image encoder at 224 px, random init, for open_clip's own encode_image
    (the baseline, measured in the same run) and compression/tokens.py at each keep rate, fused
    and not. Configurations are timed in interleaved rounds and the median is kept, so a load
    change hits all of them alike.
accuracy: top-1 of zero-shot and GS-Bias on a per-class subsample of CIFAR-10 test, clean and
    under the shift suite of adaptclip.adapt.shifts (when importable), at the same keep rates.
    Every keep rate sees the same images, shifts and views, so differences are paired.

The accuracy model has 64 patches and 6 blocks, the speed model 196 patches and 12: the speed-up
is ViT-B-16's, the accuracy the CIFAR model's. Results merge into bench/results/tokens.json
(a part not run keeps its previous numbers), then tokens.md and the plot tokens.png are redrawn
(--name changes the stem; the defaults' calibration on the train subset is tokens-calibration).

    .venv/bin/python bench/tokens.py                      # both parts
    .venv/bin/python bench/tokens.py --parts speed        # speed only, keeps the accuracy numbers
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar-clip"
Config = tuple[float, bool]  # (keep rate, fuse)


def label(cfg: Config) -> str:
    rate, fuse = cfg
    return "keep 1.0" if rate == 1.0 else f"keep {rate:g}{' fused' if fuse else ''}"


def configs(rates: list[float], fuse_options: list[bool]) -> list[Config]:
    """keep 1.0 first and once (fusion changes nothing there), every other rate with each fuse option."""
    return [(1.0, fuse_options[0])] + [(r, f) for r in rates if r != 1.0 for f in fuse_options]


def compressor_options(args: argparse.Namespace) -> dict:
    return {"reduce_at": args.reduce_at, "score_layers": args.score_layers}


def machine_info(name: str) -> dict:
    return {"machine": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


# ---------------------------------------------------------------- speed
def run_speed(args: argparse.Namespace) -> dict:
    import open_clip

    from adaptclip.compression.tokens import TokenCompressor

    name = args.speed_model
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    model = open_clip.create_model(name, pretrained=None).eval()
    size = model.visual.image_size[0]
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    cfgs = configs(args.rates, args.fuse)
    encoders: dict[str, Callable[[], object]] = {"open_clip": lambda: model.encode_image(images)}
    compressors = {f: TokenCompressor(model, fuse=f, **compressor_options(args)) for f in args.fuse}
    for rate, fuse in cfgs:
        if rate != 1.0:  # keep 1.0 is open_clip's own forward: the baseline row
            encoders[label((rate, fuse))] = (lambda c, r: lambda: c.features(images, False, r))(compressors[fuse], rate)
    times: dict[str, list[float]] = {k: [] for k in encoders}
    with torch.inference_mode():
        for fn in encoders.values():
            for _ in range(args.warmup):
                fn()
        for _ in range(args.rounds):
            for key, fn in encoders.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    base = args.batch / statistics.median(times["open_clip"])
    rows = []
    for rate, fuse in cfgs:
        ips = base if rate == 1.0 else args.batch / statistics.median(times[label((rate, fuse))])
        rows.append({"keep_rate": rate, "fuse": fuse, "images_per_s": round(ips, 3),
                     "speedup": round(ips / base, 3),
                     "kept": list(compressors[fuse].schedule(rate))})
    print(f"speed ({name}, {size} px, batch {args.batch}): open_clip {base:.2f} images/s", flush=True)
    for row in rows:
        print(f"  {label((row['keep_rate'], row['fuse'])):>16}: {row['images_per_s']:.2f} images/s, "
              f"x{row['speedup']:.2f}, patches per stage {row['kept']}", flush=True)
    return {"model": name, "image_size": size, "batch": args.batch, "rounds": args.rounds,
            "baseline_images_per_s": round(base, 3), "reduce_at": list(compressors[args.fuse[0]].reduce_at),
            "score_layers": args.score_layers,
            "rows": rows}


# ---------------------------------------------------------------- accuracy
def shift_suite(names: list[str] | None) -> list[tuple[str, Callable | None]]:
    """(name, shift) pairs: clean first, then adaptclip.adapt.shifts' suite at its default severity."""
    try:
        from adaptclip.adapt.shifts import DEFAULT_SEVERITY, SHIFT_NAMES, get_shift
    except ImportError:
        print("adaptclip.adapt.shifts not importable: clean images only", file=sys.stderr)
        return [("clean", None)]
    chosen = [n for n in SHIFT_NAMES if names is None or n in names]
    return [(n, None if n == "clean" else get_shift(n, DEFAULT_SEVERITY)) for n in chosen]


def load_subset(root: Path, classes: list[str], per_class: int) -> list[tuple[Path, int]]:
    """The first `per_class` files of each class (sorted names), class by class."""
    items = []
    for index, name in enumerate(classes):
        files = sorted((root / name).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            raise SystemExit(f"{root / name}: only {len(files)} images, {per_class} asked")
        items += [(f, index) for f in files]
    return items


def prepare(hosted, items: list[tuple[Path, int]], shift: Callable | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Shifted originals (float [3, H, W], re-quantised to 8 bit as a received file would be) and their view 0."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    originals, view0 = [], []
    for seed, (path, _) in enumerate(items):
        img = Image.open(path).convert("RGB")
        if shift is not None:
            img = TF.to_pil_image(shift(TF.to_tensor(img), seed))
        originals.append(TF.to_tensor(img))
        view0.append(hosted.preprocess(img))
    return originals, torch.stack(view0)


def paired(correct: torch.Tensor, base: torch.Tensor) -> dict:
    """Accuracy (%) and its paired difference to the baseline with the difference's standard error."""
    diff = correct.float() - base.float()
    n = correct.numel()
    se = float(diff.std(unbiased=True) / math.sqrt(n)) * 100 if n > 1 else float("nan")
    return {"acc": round(float(correct.float().mean()) * 100, 2), "delta": round(float(diff.mean()) * 100, 2),
            "delta_se": round(se, 2)}


def run_accuracy(args: argparse.Namespace) -> dict:
    from adaptclip.adapt.methods import adapt_views
    from adaptclip.adapt.settings import AdaptSettings
    from adaptclip.adapt.views import ViewGenerator
    from adaptclip.compression.tokens import TokenCompressor
    from adaptclip.compression.models import ModelSpec
    from adaptclip.compression.models import load_model

    model_dir = Path(args.cifar_model)
    config = next(model_dir.glob("*.json"))
    hosted = load_model(ModelSpec(model=str(config), pretrained=str(config.with_suffix(".pt")), device="cpu"))
    classes = [c for c in (model_dir / "classes.txt").read_text().splitlines() if c]
    templates = [t for t in (model_dir / "templates.txt").read_text().splitlines() if t]
    classifier = hosted.classifier(tuple(classes), tuple(templates))
    scale = hosted.logit_scale
    settings = AdaptSettings(method="gs_bias", views=args.views, crop_scale=(0.35, 1.0), augmix=False).validate()
    generator = ViewGenerator(hosted.image_size, hosted.mean, hosted.std, crop_scale=settings.crop_scale,
                              augmix=settings.augmix)
    compressors = {f: TokenCompressor(hosted.module, fuse=f, **compressor_options(args)) for f in args.fuse}
    cfgs = configs(args.rates, args.fuse)
    gs_cfgs = [c for c in cfgs if c[0] == 1.0 or c[1] == args.gs_fuse] if args.gs_per_class else []
    zs_items = load_subset(Path(args.data), classes, args.per_class)
    gs_items = load_subset(Path(args.data), classes, args.gs_per_class)
    zs_labels = torch.tensor([y for _, y in zs_items])
    gs_labels = torch.tensor([y for _, y in gs_items])

    def features(cfg: Config, images: torch.Tensor, with_patches: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats, patches = [], []
        for i in range(0, len(images), args.chunk):
            f, p = compressors[cfg[1]].features(images[i:i + args.chunk], with_patches, cfg[0])
            feats.append(f)
            patches.append(p)
        return torch.cat(feats), torch.cat(patches) if with_patches else None

    results: dict[str, dict] = {}
    for shift_name, shift in shift_suite(args.shifts):
        start = time.perf_counter()
        _, zs_view0 = prepare(hosted, zs_items, shift)
        zs_correct = {}
        for cfg in cfgs:
            feats, _ = features(cfg, zs_view0, False)
            zs_correct[cfg] = (feats @ classifier.T).argmax(-1) == zs_labels
        gs_correct = {}
        if gs_cfgs:
            gs_originals, gs_view0 = prepare(hosted, gs_items, shift)
            views = generator(gs_originals, gs_view0, settings.views, seed=0)  # [B, V, 3, S, S], image i seed i
            flat = views.flatten(0, 1)
        for cfg in gs_cfgs:
            feats, patches = features(cfg, flat, True)
            feats = feats.view(len(gs_items), settings.views, -1)
            patches = patches.view(len(gs_items), settings.views, *patches.shape[1:])[:, 0]
            preds = torch.tensor([int(adapt_views(settings, feats[i], patches[i], classifier, scale).logits.argmax())
                                  for i in range(len(gs_items))])
            gs_correct[cfg] = preds == gs_labels
        base = cfgs[0]
        results[shift_name] = {
            label(cfg): {"keep_rate": cfg[0], "fuse": cfg[1],
                         "zero_shot": paired(zs_correct[cfg], zs_correct[base]),
                         **({"gs_bias": paired(gs_correct[cfg], gs_correct[base])} if cfg in gs_correct else {})}
            for cfg in cfgs}
        print(f"{shift_name} ({time.perf_counter() - start:.0f} s): " + "; ".join(
            f"{k} zs {v['zero_shot']['acc']}" + (f" gs {v['gs_bias']['acc']}" if "gs_bias" in v else "")
            for k, v in results[shift_name].items()), flush=True)
    return {"model": config.stem, "data": args.data, "per_class": args.per_class, "gs_per_class": args.gs_per_class,
            "views": settings.views, "gs_fuse": args.gs_fuse, "crop_scale": list(settings.crop_scale),
            "augmix": settings.augmix, "spatial_top_k": settings.spatial_top_k,
            "reduce_at": list(compressors[args.fuse[0]].reduce_at), "score_layers": args.score_layers,
            "kept": {label(c): list(compressors[c[1]].schedule(c[0])) for c in cfgs}, "shifts": results}


# ---------------------------------------------------------------- report
def shift_mean(acc: dict, key: str, method: str) -> float | None:
    """Mean accuracy of one configuration over the shifts (clean excluded); None without shifts."""
    values = [s[key][method]["acc"] for name, s in acc["shifts"].items()
              if name != "clean" and method in s.get(key, {})]
    return round(sum(values) / len(values), 2) if values else None


def write_plot(data: dict, path: Path) -> bool:
    """Accuracy (CIFAR model) against encoder speed-up (ViT-B-16), one line per method/condition/fusion."""
    if "speed" not in data or "accuracy" not in data:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {label((r["keep_rate"], r["fuse"])): r for r in data["speed"]["rows"]}
    acc = data["accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("zero_shot", "o"), ("gs_bias", "s")):
        for fuse, style in ((False, "-"), (True, "--")):
            for cond in ("clean", "shifts"):
                keys = [k for k in speed if k in acc["shifts"].get("clean", {})
                        and (speed[k]["keep_rate"] == 1.0 or speed[k]["fuse"] == fuse)]
                pts = []
                for k in keys:
                    y = (acc["shifts"]["clean"][k].get(method, {}).get("acc") if cond == "clean"
                         else shift_mean(acc, k, method))
                    if y is not None:
                        pts.append((speed[k]["speedup"], y, speed[k]["keep_rate"]))
                if len(pts) < 2:
                    continue
                pts.sort(key=lambda p: -p[2])
                name = f"{method.replace('_', '-')} {cond}{' fused' if fuse else ''}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, label=name)
                for x, y, r in pts:
                    ax.annotate(f"{r:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel(f"encoder speed-up, {data['speed']['model']} {data['speed']['image_size']} px "
                  f"({data['speed']['machine']['machine']})")
    ax.set_ylabel(f"top-1 %, {acc['model']} on {acc['data']} (subset)")
    ax.set_title("CLS-guided token compression (labels: keep rate per stage)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_markdown(data: dict, path: Path, plot: str | None) -> None:
    lines = ["# Token compression: speed against accuracy", "",
             f"Written by bench/tokens.py from {path.stem}.json. keep rate = fraction of the patch tokens kept at each "
             "reduction stage (EViT, inside the blocks listed under reduce_at, 0-based; the dropped tokens fused "
             "into one where it says fused). The speed-up is the speed model's (ViT-B-16: 196 patches, 12 blocks), "
             "the accuracy the CIFAR model's (64 patches, 6 blocks).", ""]
    if "speed" in data:
        s = data["speed"]
        lines += ["## Encoder speed", "", f"`{s['command']}`  ", f"machine: {s['machine']['machine']} "
                  f"({s['machine']['cpu_count']} CPUs, {s['machine']['torch_threads']} torch threads, torch "
                  f"{s['machine']['torch']}), {s['when']}; {s['model']} random init, {s['image_size']} px, batch "
                  f"{s['batch']}, median of {s['rounds']} interleaved rounds; reduce_at {s['reduce_at']}, score_layers "
                  f"{s['score_layers']}", "",
                  "| config | patches per stage | images/s | speed-up |", "|---|---|---|---|",
                  f"| open_clip encode_image (baseline) | - | {s['baseline_images_per_s']:.2f} | 1.00 |"]
        lines += [f"| {label((r['keep_rate'], r['fuse']))} | {r['kept']} | {r['images_per_s']:.2f} | "
                  f"{r['speedup']:.2f} |" for r in s["rows"]]
        lines.append("")
    if "accuracy" in data:
        a = data["accuracy"]
        shifts = list(a["shifts"])
        lines += ["## Accuracy", "", f"`{a['command']}`  ", f"machine: {a['machine']['machine']}, {a['when']}; "
                  f"{a['model']}, {a['data']}: zero-shot on the first {a['per_class']} images per class, "
                  + (f"GS-Bias on the first {a['gs_per_class']} per class ({a['views']} views, crop scale "
                     f"{a['crop_scale']}, AugMix {a['augmix']}, spatial top-{a['spatial_top_k']} of the kept patches, "
                     f"{'fused' if a['gs_fuse'] else 'unfused'} compression)" if a['gs_per_class'] else "GS-Bias not run")
                  + f"; reduce_at {a['reduce_at']}, score_layers "
                  f"{a['score_layers']}; shifts: {', '.join(shifts[1:]) or 'none'} "
                  f"(adaptclip.adapt.shifts, default severity). Cells: top-1 % (paired change vs keep 1.0 +- its "
                  f"standard error, points).", "",
                  "| config | patches per stage | zero-shot clean | zero-shot shift mean | GS-Bias clean | "
                  "GS-Bias shift mean |", "|---|---|---|---|---|---|"]
        base = "keep 1.0"
        for key, row in a["shifts"]["clean"].items():
            cells = []
            for method in ("zero_shot", "gs_bias"):
                c = row.get(method)
                cells.append("-" if c is None else f"{c['acc']:.2f}" + ("" if key == base else
                                                                       f" ({c['delta']:+.2f} +- {c['delta_se']:.2f})"))
                mean, mean_base = shift_mean(a, key, method), shift_mean(a, base, method)
                cells.append("-" if mean is None else f"{mean:.2f}" + ("" if key == base else f" ({mean - mean_base:+.2f})"))
            lines.append(f"| {key} | {a['kept'][key]} | " + " | ".join(cells) + " |")
        lines += ["", "Per shift (zero-shot / GS-Bias top-1 %):", "",
                  "| config | " + " | ".join(shifts) + " |", "|---|" + "---|" * len(shifts)]
        for key in a["shifts"]["clean"]:
            cells = [f"{a['shifts'][s][key]['zero_shot']['acc']:.2f} / "
                     + (f"{a['shifts'][s][key]['gs_bias']['acc']:.2f}" if "gs_bias" in a["shifts"][s][key] else "-")
                     for s in shifts]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("")
    if "speed" in data and "accuracy" in data:
        lines += ["## Target: keep 0.5 >= 1.7x encoder speed at <= 1 point accuracy loss", ""]
        for row in data["speed"]["rows"]:
            key = label((row["keep_rate"], row["fuse"]))
            clean = data["accuracy"]["shifts"].get("clean", {}).get(key)
            if row["keep_rate"] != 0.5 or clean is None:
                continue
            losses = {m: -clean[m]["delta"] for m in ("zero_shot", "gs_bias") if m in clean}
            met = row["speedup"] >= 1.7 and all(v <= 1.0 for v in losses.values())
            lines.append(f"- {key}: x{row['speedup']:.2f}, clean loss " + ", ".join(
                f"{m.replace('_', '-')} {v:.2f} points" for m, v in losses.items()) + f": {'met' if met else 'NOT met'}")
        lines.append("")
    if plot:
        lines += [f"![accuracy against speed-up]({plot})", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=("speed", "accuracy"), default=["speed", "accuracy"])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3])
    p.add_argument("--fuse", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+", default=[False, True],
                   help="fusion options to measure (true/false)")
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU dev machine")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the results")
    p.add_argument("--name", default="tokens", help="file stem of the results: NAME.json, NAME.md, NAME.png")
    p.add_argument("--reduce-at", type=int, nargs="+", default=None,
                   help="0-based blocks that reduce tokens (default: 1/4, 1/2, 3/4 of the depth)")
    p.add_argument("--score-layers", type=int, default=1, help="blocks of CLS attention summed per score (VTC-CLS)")
    g = p.add_argument_group("speed")
    g.add_argument("--speed-model", default="ViT-B-16", help="open_clip name or JSON config (random init)")
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--rounds", type=int, default=7)
    g = p.add_argument_group("accuracy")
    g.add_argument("--cifar-model", default=str(CIFAR_DIR), help="folder with the JSON config, .pt, classes, templates")
    g.add_argument("--data", default="/tmp/data/test", help="CIFAR-10 test images as <class>/*.jpg")
    g.add_argument("--per-class", type=int, default=100, help="zero-shot images per class")
    g.add_argument("--gs-per-class", type=int, default=20, help="GS-Bias images per class (0: zero-shot only)")
    g.add_argument("--views", type=int, default=32)
    g.add_argument("--gs-fuse", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="fusion setting of the GS-Bias runs")
    g.add_argument("--shifts", nargs="+", default=None, help="subset of the shift suite (default: all)")
    g.add_argument("--chunk", type=int, default=512, help="images per encoder call")
    args = p.parse_args(argv)
    if 1.0 not in args.rates or not all(0.0 < r <= 1.0 for r in args.rates):
        p.error(f"--rates: keep rates in (0, 1], 1.0 among them (the baseline), got {args.rates}")
    if args.gs_fuse not in args.fuse:
        p.error(f"--gs-fuse {args.gs_fuse} must be one of the --fuse options {args.fuse}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"{args.name}.json"
    data = json.loads(store.read_text()) if store.exists() else {}
    command = " ".join([".venv/bin/python", "bench/tokens.py", *(argv if argv is not None else sys.argv[1:])])
    for part, fn in (("speed", run_speed), ("accuracy", run_accuracy)):
        if part in args.parts:
            start = time.perf_counter()
            data[part] = fn(args) | {"command": command, "machine": machine_info(args.machine),
                                     "when": time.strftime("%Y-%m-%d %H:%M"),
                                     "seconds": round(time.perf_counter() - start)}
            store.write_text(json.dumps(data, indent=1))
    plot = out / f"{args.name}.png"
    plotted = write_plot(data, plot)
    write_markdown(data, out / f"{args.name}.md", plot.name if plotted else None)
    print(f"wrote {store}, {out / args.name}.md" + (f", {plot}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
