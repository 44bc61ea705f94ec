"""Label sets: validation, lookups by id (memory first, then the durable store), and per-model text
classifiers built once (or read from a shared cache another replica filled)."""
from __future__ import annotations

import asyncio
from collections import OrderedDict

import grpc
import torch

from adaptclip.compression.models import DEFAULT_TEMPLATES
from adaptclip.server.cache import Cache, Unreachable
from adaptclip.server.config import Limits
from adaptclip.server.errors import RequestError, invalid, not_found
from adaptclip.server.hosting import Hosted
from adaptclip.server.keys import classifier_key
from adaptclip.server.labelstore import Durable, LabelSetDef, label_set_id

__all__ = ["LabelSetDef", "LabelSetStore", "fixed_sets_hint", "label_set_id", "validate_label_set"]


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
    """Label sets by id: the recently used ones (and their classifiers per model) in a bounded LRU, every one
    ever seen in the durable store behind it, so an id evicted here is read back, never NOT_FOUND.
    Concurrent builds of one classifier run once."""

    def __init__(self, capacity: int, durable: Durable) -> None:
        self._capacity = capacity
        self.durable = durable
        self._sets: OrderedDict[str, LabelSetDef] = OrderedDict()
        self._pinned: dict[str, LabelSetDef] = {}  # bundles' own label sets: never evicted
        self._classifiers: dict[tuple[str, str], asyncio.Future[torch.Tensor]] = {}

    def _remember(self, ls: LabelSetDef) -> LabelSetDef:
        self._sets[ls.id] = ls
        self._sets.move_to_end(ls.id)
        while len(self._sets) > self._capacity:
            old, _ = self._sets.popitem(last=False)
            for key in [k for k in self._classifiers if k[1] == old]:
                del self._classifiers[key]
        return ls

    async def add(self, ls: LabelSetDef) -> LabelSetDef:
        """Use `ls` now; the first time this process sees it, write it through to the store (bounded: when
        the store is down it is pending, and works here meanwhile)."""
        if ls.id not in self._sets and ls.id not in self._pinned:
            await self.durable.put(ls)
        return self._remember(ls)

    def pin(self, ls: LabelSetDef) -> None:
        """Keep `ls` findable by id whatever the LRU evicts (a bundle's label sets)."""
        self._pinned[ls.id] = ls

    async def get(self, ls_id: str, field: str = "label_set_id") -> LabelSetDef:
        ls = self._sets.get(ls_id) or self._pinned.get(ls_id)
        if ls is None:
            try:
                ls = await self.durable.get(ls_id)
            except Unreachable as exc:  # UNAVAILABLE, not NOT_FOUND: a retry (on another replica) may find it
                raise RequestError(grpc.StatusCode.UNAVAILABLE, field, f"label set '{ls_id}' is not on this replica, "
                                   f"and the label-set store ({self.durable.backend.name}) is unreachable ({exc.kind}): "
                                   f"a set registered on another replica cannot be looked up now; retry (another "
                                   f"replica may hold it), or send the labels inline") from None
            if ls is None:
                raise not_found(field, f"unknown label set '{ls_id}' (register it with RegisterLabelSet, or send it inline)")
        return self._remember(ls)

    async def classifier(self, hosted: Hosted, ls: LabelSetDef, shared: Cache | None = None) -> torch.Tensor:
        """[C, D] classifier of `ls` for `hosted`, built on first use (`shared`: a cache other replicas see)."""
        key = (hosted.name, ls.id)
        fut = self._classifiers.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = asyncio.ensure_future(self._build(hosted, ls, shared))
            self._classifiers[key] = fut
        return await asyncio.shield(fut)

    async def _build(self, hosted: Hosted, ls: LabelSetDef, shared: Cache | None) -> torch.Tensor:
        model = hosted.model
        if shared is None or model.text is None:  # a bundle's classifiers are in the bundle
            return await hosted.run_text(model.classifier, ls.labels, ls.templates)
        key = classifier_key(model.fingerprint, ls.id)
        hit = await shared.get("classifier", key)
        if hit is not None and hit[0]["w"].shape == (len(ls.labels), model.embed_dim):
            return torch.from_numpy(hit[0]["w"].copy())
        weights = await hosted.run_text(model.classifier, ls.labels, ls.templates)
        await shared.put("classifier", key, {"w": weights.numpy()}, {})
        return weights

    async def close(self) -> None:
        await self.durable.close()
