"""open_clip run directly, printing the same JSON lines as `adaptclip classify --json`, for parity checks.

    .venv/bin/python bench/openclip_direct.py --model CONFIG.json --pretrained WEIGHTS.pt \
        --labels-file classes.txt --templates-file templates.txt IMAGE...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="open_clip name or JSON model config")
    p.add_argument("--pretrained", required=True)
    p.add_argument("--labels-file", required=True)
    p.add_argument("--templates-file", required=True)
    p.add_argument("--top-k", type=int, default=5)
    args = p.parse_args()
    name = args.model
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=args.pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    labels = [x.strip() for x in Path(args.labels_file).read_text().splitlines() if x.strip()]
    templates = [x.strip() for x in Path(args.templates_file).read_text().splitlines() if x.strip()]
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, labels, templates)
        for path in args.images:
            feats = model.encode_image(preprocess(Image.open(path)).unsqueeze(0), normalize=True)
            logits = (model.logit_scale.exp() * feats @ classifier)[0]
            probs = logits.softmax(-1)
            top = torch.topk(probs, min(args.top_k, len(labels))).indices.tolist()
            print(json.dumps({"image": path, "top": [{"label": labels[i], "probability": probs[i].item(),
                                                      "logit": logits[i].item()} for i in top], "model": name}))


if __name__ == "__main__":
    main()
