"""Final answers as cache entries: logits, probabilities, GS-Bias's learned biases and the report."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from adaptclip.adapt.loop import Outcome, Report
from adaptclip.adapt.methods import MethodResult

_REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(Report))


def entry_from_outcome(out: Outcome) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {"zero_shot": out.zero_shot.numpy()}
    if out.result is not None:
        arrays["logits"], arrays["probs"] = out.result.logits.numpy(), out.result.probs.numpy()
        for name in ("global_bias", "spatial_bias"):
            if getattr(out.result, name) is not None:
                arrays[name] = getattr(out.result, name).numpy()
    return arrays, dataclasses.asdict(out.report)


def outcome_from_entry(entry: tuple[dict[str, np.ndarray], dict[str, Any]], n_labels: int) -> Outcome | None:
    """The cached answer, or None when it does not fit this label set (then it is recomputed)."""
    arrays, meta = entry
    if any(a.shape != (n_labels,) for a in arrays.values()) or set(meta) != set(_REPORT_FIELDS):
        return None
    result = None
    if "logits" in arrays:
        t = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
        result = MethodResult(t["logits"], t["probs"], meta["steps_run"], meta["global_only"],
                              t.get("global_bias"), t.get("spatial_bias"))
    return Outcome(torch.from_numpy(arrays["zero_shot"].copy()), result, Report(**meta))
