"""Zero-shot classification metrics as clip_benchmark reports them: acc1, acc5, mean per-class recall."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def ranked_classes(scores: Tensor, k: int = 5, tie_break: Tensor | None = None) -> list[int]:
    """Indices of the k best classes of `scores` [C], best first; equal scores are ordered by
    `tie_break` [C] (e.g. ZERO's vote shares broken by its mean logits), then by class index."""
    order = torch.arange(scores.shape[-1])
    if tie_break is not None:
        order = torch.argsort(tie_break, descending=True, stable=True)
    order = order[torch.argsort(scores[order], descending=True, stable=True)]
    return [int(i) for i in order[:k]]


def classification_metrics(top: Sequence[Sequence[int]], labels: Sequence[int], n_classes: int) -> dict[str, float]:
    """acc1, acc5 (top-min(5, C)) and mean per-class recall (over the classes present, as
    sklearn's balanced_accuracy_score in clip_benchmark), from each sample's ranked classes."""
    if len(top) != len(labels) or not labels:
        raise ValueError(f"need one ranking per label and at least one sample, got {len(top)} and {len(labels)}")
    k5 = min(5, n_classes)
    if any(len(t) < k5 for t in top):
        raise ValueError(f"every ranking needs at least {k5} classes")
    hit1 = [t[0] == y for t, y in zip(top, labels)]
    hit5 = [y in t[:k5] for t, y in zip(top, labels)]
    per_class: dict[int, list[bool]] = {}
    for hit, y in zip(hit1, labels):
        per_class.setdefault(y, []).append(hit)
    recalls = [sum(h) / len(h) for h in per_class.values()]
    return {"acc1": sum(hit1) / len(hit1), "acc5": sum(hit5) / len(hit5),
            "mean_per_class_recall": sum(recalls) / len(recalls)}
