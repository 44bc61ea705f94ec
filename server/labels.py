"""Label sets: validation, content-hash ids, and per-model text classifiers built once."""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import torch

from adaptclip.compression.models import DEFAULT_TEMPLATES
from adaptclip.server.config import Limits
from adaptclip.server.errors import invalid, not_found
from adaptclip.server.hosting import Hosted


@dataclass(frozen=True)
class LabelSetDef:
    id: str
    labels: tuple[str, ...]
    templates: tuple[str, ...]


def label_set_id(labels: tuple[str, ...], templates: tuple[str, ...]) -> str:
    """Stable id: hash of the labels and the resolved templates (so inline and registered sets match)."""
    payload = json.dumps({"labels": labels, "templates": templates}, ensure_ascii=False, separators=(",", ":"))
    return "ls_" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def validate_label_set(labels: list[str], templates: list[str], limits: Limits, field: str) -> LabelSetDef:
    """Check labels and templates; every error names the field (e.g. `label_set.labels[3]`)."""
    if not labels:
        raise invalid(f"{field}.labels", "no labels given")
    if len(labels) > limits.max_labels:
        raise invalid(f"{field}.labels", f"{len(labels)} labels is over the limit of {limits.max_labels}")
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not label.strip():
            raise invalid(f"{field}.labels[{i}]", "empty label")
        if len(label) > limits.max_label_chars:
            raise invalid(f"{field}.labels[{i}]", f"longer than {limits.max_label_chars} characters")
        if label in seen:
            raise invalid(f"{field}.labels[{i}]", f"duplicate of labels[{seen[label]}] ('{label}')")
        seen[label] = i
    if len(templates) > limits.max_templates:
        raise invalid(f"{field}.templates", f"{len(templates)} templates is over the limit of {limits.max_templates}")
    for i, template in enumerate(templates):
        try:
            ok = template.count("{}") == 1 and template.format("x").count("x") >= 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise invalid(f"{field}.templates[{i}]", f"must hold exactly one '{{}}' for the label: {template!r}")
    resolved = tuple(templates) or DEFAULT_TEMPLATES
    return LabelSetDef(label_set_id(tuple(labels), resolved), tuple(labels), resolved)


def fixed_sets_hint(hosted: Hosted) -> str:
    """Why a label set was refused by a model without a text tower, and the ones it can use."""
    sets = "; ".join(f"'{f.name}' ({len(f.labels)} labels, label_set_id {label_set_id(f.labels, f.templates)})"
                     for f in hosted.model.fixed_label_sets)
    return (f"model '{hosted.name}' has no text tower: it classifies only with the label sets it carries, "
            f"sent inline with the same labels and templates or by id: {sets}")


class LabelSetStore:
    """Bounded LRU of label sets and their classifiers; concurrent builds of one classifier run once."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._sets: OrderedDict[str, LabelSetDef] = OrderedDict()
        self._pinned: dict[str, LabelSetDef] = {}  # bundles' own label sets: never evicted
        self._classifiers: dict[tuple[str, str], asyncio.Future[torch.Tensor]] = {}

    def add(self, ls: LabelSetDef) -> LabelSetDef:
        self._sets[ls.id] = ls
        self._sets.move_to_end(ls.id)
        while len(self._sets) > self._capacity:
            old, _ = self._sets.popitem(last=False)
            for key in [k for k in self._classifiers if k[1] == old]:
                del self._classifiers[key]
        return ls

    def pin(self, ls: LabelSetDef) -> None:
        """Keep `ls` findable by id whatever the LRU evicts (a bundle's label sets)."""
        self._pinned[ls.id] = ls

    def get(self, ls_id: str, field: str = "label_set_id") -> LabelSetDef:
        ls = self._sets.get(ls_id) or self._pinned.get(ls_id)
        if ls is not None and ls_id not in self._sets:
            self.add(ls)
        if ls is None:
            raise not_found(field, f"unknown label set '{ls_id}' (register it with RegisterLabelSet, or send it inline)")
        self._sets.move_to_end(ls_id)
        return ls

    async def classifier(self, hosted: Hosted, ls: LabelSetDef) -> torch.Tensor:
        """[C, D] classifier of `ls` for `hosted`, built on first use."""
        key = (hosted.name, ls.id)
        fut = self._classifiers.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = asyncio.ensure_future(hosted.run_text(hosted.model.classifier, ls.labels, ls.templates))
            self._classifiers[key] = fut
        return await asyncio.shield(fut)
