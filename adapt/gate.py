"""The label-free safety gate: answer zero-shot when an image's views look out of the model's distribution.

Test-time adaptation trusts the augmented views. When the augmentations themselves are foreign to the
model (crops of a blurred 32-px image, a tower trained without crops) the views are less certain than
the original and disagree with it, and adapting to them costs accuracy. Three label-free tests, each
off at its neutral value, decide per image, after the views are encoded and before the answer:

- `gate_entropy_rise`: fall back when the views' mean normalised entropy exceeds view 0's by more than
  this (1 = off: normalised entropies lie in [0, 1]);
- `gate_agreement`: fall back when fewer than this fraction of the augmented views predict view 0's
  class (0 = off);
- `gate_top_k`: keep the adapted answer only when its top-1 is among the zero-shot top-k (0 = off).

The thresholds are per model: `adaptclip tune` picks them on labelled data (adapt/tune.py), and the
untuned defaults in adapt/settings.py are conservative. The server and the accuracy harness both call
`view_signals` and `falls_back` through adapt/loop.py, so what is tuned is what is served.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from adaptclip.adapt.selection import view_entropy
from adaptclip.adapt.settings import AdaptSettings
from torch import Tensor


@dataclass(frozen=True)
class ViewSignals:
    """What the gate looks at for one image (all label-free)."""

    entropy_rise: float  # mean normalised entropy of views 1.. minus view 0's
    agreement: float  # fraction of views 1.. whose top-1 is view 0's


def view_signals(view_logits: Tensor) -> ViewSignals:
    """Signals from the logits [V, C] of view 0 and its augmented views (V >= 2)."""
    logits = view_logits.float()
    if logits.ndim != 2 or logits.shape[0] < 2:
        raise ValueError(f"view_logits must be [V >= 2, C], got {tuple(logits.shape)}")
    norm = math.log(logits.shape[-1]) if logits.shape[-1] > 1 else 1.0
    entropy = view_entropy(logits) / norm
    top = logits.argmax(-1)
    return ViewSignals(float(entropy[1:].mean() - entropy[0]), float((top[1:] == top[0]).float().mean()))


def gate_active(s: AdaptSettings) -> bool:
    """Whether any of the view tests is switched on (the top-k test runs after the method)."""
    return s.gate_entropy_rise < 1.0 or s.gate_agreement > 0.0


def views_out_of_distribution(s: AdaptSettings, signals: ViewSignals) -> str:
    """Why the views look out of distribution under `s`'s thresholds, or "" when they do not."""
    if signals.entropy_rise > s.gate_entropy_rise:
        return f"views' entropy rose {signals.entropy_rise:+.3f} over the original's (> {s.gate_entropy_rise:g})"
    if signals.agreement < s.gate_agreement:
        return f"only {signals.agreement:.2f} of the views agree with the original (< {s.gate_agreement:g})"
    return ""


def outside_top_k(s: AdaptSettings, zero_shot: Tensor, adapted_top1: int) -> str:
    """Why the adapted answer is refused by the top-k test, or "" when it is kept."""
    if s.gate_top_k <= 0 or s.gate_top_k >= zero_shot.shape[-1]:
        return ""
    allowed = torch.topk(zero_shot.float(), s.gate_top_k).indices
    if bool((allowed == adapted_top1).any()):
        return ""
    return f"adapted top-1 is not among the zero-shot top-{s.gate_top_k}"
