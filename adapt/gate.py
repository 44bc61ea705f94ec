"""The label-free safety gate: answer zero-shot when an image's views look out of the model's distribution.

Test-time adaptation trusts the augmented views. When the augmentations themselves are foreign to the
model (crops of a blurred 32-px image, a tower trained without crops) the views are less certain than
the original and disagree with it, and adapting to them costs accuracy. Three label-free tests, each
off at its neutral value, decide per image, after the views are encoded and before the answer:

- `gate_entropy_rise`: fall back when the views' mean normalised entropy exceeds view 0's by more than
  this (1 = off: normalised entropies lie in [0, 1]);
- `gate_agreement`: fall back when fewer than this fraction of the augmented views predict view 0's
  class (0 = off);
- `gate_similarity`: fall back when the augmented views' features are on average closer than this
  (cosine) to view 0's (1 = off). Views that barely differ from the original carry no evidence it
  lacks, and the method's flips on them are coin tosses: that is what crops of a blurred image are
  (on the CIFAR model, bench/gate_signals.py: blurred images' views sit at a median cosine of
  0.97-0.99 to the original, clean, noisy and pixelated ones at 0.89-0.96, both higher with milder
  crops). The level is per model and per view setting, so `tune` draws its
  candidates from the similarity of the clean images' views;
- `gate_top_k`: keep the adapted answer only when its top-1 is among the zero-shot top-k (0 = off).

The thresholds are per model: `adaptclip tune` picks them on labelled data (adapt/tune.py), and the
untuned defaults in adapt/settings.py are conservative. The server and the accuracy harness both call
`signals` and the tests through adapt/loop.py (compression/edge_tta.py on the edge), so what is tuned is what is served.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adaptclip.adapt.settings import AdaptSettings


@dataclass(frozen=True)
class ViewSignals:
    """What the gate looks at for one image (all label-free)."""

    entropy_rise: float  # mean normalised entropy of views 1.. minus view 0's
    agreement: float  # fraction of views 1.. whose top-1 is view 0's
    similarity: float  # mean cosine of views 1..'s features to view 0's


def signals(entropies: Sequence[float], tops: Sequence[int], similarities: Sequence[float]) -> ViewSignals:
    """Signals from the normalised entropies and top-1 classes of view 0 and its augmented views (V >= 2)
    and the cosines of views 1.. to view 0. Plain numbers in, so the torch loop (adapt.loop.view_signals)
    and the numpy edge runner share it."""
    if len(entropies) < 2 or len(entropies) != len(tops) or len(similarities) != len(tops) - 1:
        raise ValueError(f"need V >= 2 views' entropies and top-1s and V - 1 cosines, got {len(entropies)}, "
                         f"{len(tops)} and {len(similarities)}")
    rest = len(entropies) - 1
    return ViewSignals(sum(entropies[1:]) / rest - entropies[0], sum(t == tops[0] for t in tops[1:]) / rest,
                       sum(similarities) / rest)


def gate_active(s: AdaptSettings) -> bool:
    """Whether any of the view tests is switched on (the top-k test runs after the method)."""
    return s.gate_entropy_rise < 1.0 or s.gate_agreement > 0.0 or s.gate_similarity < 1.0


def views_out_of_distribution(s: AdaptSettings, sig: ViewSignals) -> str:
    """Why the views look out of distribution under `s`'s thresholds, or "" when they do not."""
    if sig.entropy_rise > s.gate_entropy_rise:
        return f"views' entropy rose {sig.entropy_rise:+.3f} over the original's (> {s.gate_entropy_rise:g})"
    if sig.agreement < s.gate_agreement:
        return f"only {sig.agreement:.2f} of the views agree with the original (< {s.gate_agreement:g})"
    if sig.similarity > s.gate_similarity:
        return f"the views are {sig.similarity:.3f} alike to the original (> {s.gate_similarity:g}): nothing new in them"
    return ""


def outside_top_k(s: AdaptSettings, zero_shot_order: Sequence[int], adapted_top1: int) -> str:
    """Why the adapted answer is refused by the top-k test (zero_shot_order: classes best first), or ""."""
    if s.gate_top_k <= 0 or s.gate_top_k >= len(zero_shot_order) or adapted_top1 in zero_shot_order[:s.gate_top_k]:
        return ""
    return f"adapted top-1 is not among the zero-shot top-{s.gate_top_k}"
