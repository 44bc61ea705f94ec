"""Which label-free per-image signal tells GS-Bias's lost flips from its won ones (the safety gate's design).

On labelled images (the train subset: never the test set) under clean + tune-suite shifts, one of them
also at a stronger setting (`--strong`), GS-Bias over the views of one crop setting; per shift: how
many answers it flips, wins and loses, and each adapt.gate signal (entropy rise, agreement, view
similarity) averaged over all images, the won flips and the lost flips, with the similarity's
quantiles. Prints a markdown table and writes the rows as JSON.

    .venv/bin/python bench/gate_signals.py --data /tmp/data/train --model-dir ../shared/models/cifar-clip \
        --per-class 40 --crop 0.56 --out bench/results/gate_signals-crop056.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptclip.adapt.data import load_folder
from adaptclip.adapt.evaluate import EvalPlan, Run
from adaptclip.adapt.gsbias import gs_bias
from adaptclip.adapt.loop import patch_precision, view_precision, view_signals
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.shifts import get_shift
from adaptclip.compression.models import ModelSpec, load_model

SHIFTS = (("clean", None), ("gaussian_blur", None), ("gaussian_blur", 2.5), ("gaussian_noise", None), ("pixelate", None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="class-folder images (the train subset)")
    p.add_argument("--model-dir", required=True, help="folder with the model's .json, .pt, classes.txt, templates.txt")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--crop", type=float, default=0.56, help="smallest crop scale of the views")
    p.add_argument("--views", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = Path(args.model_dir)
    json_cfg = next(d.glob("*.json"))
    model = load_model(ModelSpec(model=str(json_cfg), pretrained=str(json_cfg.with_suffix(".pt")), device="cpu"))
    classes = [c.strip() for c in (d / "classes.txt").read_text().splitlines() if c.strip()]
    templates = tuple(t.strip() for t in (d / "templates.txt").read_text().splitlines() if t.strip())
    data = load_folder(args.data, classes=classes, limit_per_class=args.per_class, seed=7)
    classifier = model.classifier(tuple(c.replace("_", " ") for c in data.classes), templates)
    s = AdaptSettings(method="gs_bias", views=args.views, crop_scale=(args.crop, 1.0), augmix=False, seed=0)
    rows = []
    print("| shift | flips | won | lost | gain | similarity all / won / lost | similarity q10 / q50 / q90 | "
          "entropy rise won / lost | agreement won / lost |\n|---|---:|---:|---:|---:|---|---|---|---|")
    for name, parameter in SHIFTS:
        shift = get_shift(name, parameter)
        run = Run(model, data, classifier, s, EvalPlan(methods=("gs_bias",), shifts=(shift,)))
        feats, patches, labels = [], [], []
        for i, source, _ in run.features(shift):
            feats.append(view_precision(source.feats))
            patches.append(patch_precision(source.patches))
            labels.append(data.labels[i])
        unit = F.normalize(torch.stack(feats).float(), dim=-1)
        y = torch.tensor(labels)
        logits = model.logit_scale * unit @ classifier.T
        adapted = gs_bias(unit, F.normalize(torch.stack(patches).float(), dim=-1), classifier,
                          logit_scale=model.logit_scale, selection_ratio=s.ratio, steps=s.steps, alpha=s.alpha,
                          beta=s.beta, top_k_patches=s.spatial_top_k).logits.argmax(-1)
        zs = logits[:, 0].argmax(-1)
        sig = [view_signals(row, u) for row, u in zip(logits, unit)]
        signal = {k: torch.tensor([getattr(g, k) for g in sig]) for k in ("entropy_rise", "agreement", "similarity")}
        won, lost = (adapted != zs) & (adapted == y), (adapted != zs) & (zs == y)
        mean = lambda x, m: round(float(x[m].mean()), 4) if m.any() else None  # noqa: E731
        q = [round(float(v), 4) for v in signal["similarity"].double().quantile(torch.tensor([0.1, 0.5, 0.9]).double())]
        row = {"shift": shift.name, "parameter": shift.parameter, "images": len(y), "flips": int((adapted != zs).sum()),
               "won": int(won.sum()), "lost": int(lost.sum()),
               "gain": round(100 * float((adapted == y).float().mean() - (zs == y).float().mean()), 2),
               "similarity_quantiles_10_50_90": q,
               **{f"{k}_{part}": mean(v, m) for k, v in signal.items()
                  for part, m in (("all", torch.ones_like(won)), ("won", won), ("lost", lost))}}
        rows.append(row)
        print(f"| {shift.name} {shift.parameter} | {row['flips']} | {row['won']} | {row['lost']} | {row['gain']:+.2f} | "
              f"{row['similarity_all']} / {row['similarity_won']} / {row['similarity_lost']} | {q[0]} / {q[1]} / {q[2]} | "
              f"{row['entropy_rise_won']} / {row['entropy_rise_lost']} | {row['agreement_won']} / {row['agreement_lost']} |",
              flush=True)
    Path(args.out).write_text(json.dumps({"command": vars(args), "settings": str(s), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
