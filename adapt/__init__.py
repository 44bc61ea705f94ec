"""Test-time adaptation of CLIP-family zero-shot classifiers: views, GS-Bias, the ZERO / TPT peers,
the one adaptive loop, and the accuracy harness. Pure compute: tensors, a model, an encode callable.

Names are exported lazily, so `adaptclip.adapt.settings` (pure Python) imports without torch, as the
torch-free edge runner needs.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GSBiasResult": "gsbias", "gs_bias": "gsbias", "gs_bias_logits": "gsbias",
    "marginal_entropy_and_grad": "selection", "tpt_logits": "peers", "zero_logits": "peers",
    "ViewGenerator": "views",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
