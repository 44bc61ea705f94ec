"""`adaptclip tune`: pick a model's adaptation defaults on labelled data, by a rule fixed in advance.

The views of every image are encoded once per view setting (crop scale x AugMix) and shift of the
tune suite (`adapt.shifts.SUITE` plus clean; the held-out families are never used here); every
candidate (method, views, selection ratio, GS-Bias step sizes) then runs on those features through
`adapt.methods.adapt_views`, and every safety-gate threshold is scored from the same per-image
results, since the gate only chooses between an image's adapted and zero-shot answers. The rule:

    among candidates whose gain over zero-shot, less `shift_se` standard errors, is >= `min_shift_gain`
    on every shift and whose mean views encoded per image are <= `max_views`, the largest mean gain over
    the shifts; ties go to fewer views encoded, then to the earlier candidate in the grid. Candidates
    within `mean_se` standard errors of the best mean gain count as tied with it, and of those the one
    whose worst shift (less its margin) is best wins: the one-standard-error rule of model selection,
    with "most robust" for "simplest".

The standard error is the paired one (per image: adapted right minus zero-shot right), so the bound
holds for the shift's population, not only its sample: a candidate that flips many answers either way
needs a margin, one that changes little (milder views, a gate that falls back) does not. Without it
the best of thousands of candidates passes the bound on a small sample by chance, and a shift the
suite does not show (strong blur) is where that luck runs out. For the same reason a mean gain a
standard error below the best is no evidence of a worse candidate, while a better worst shift is the
one guard left for shifts no suite shows.

The images are split per class into a tune part, where the rule picks, and a held-out part, where
the pick is checked through `adapt.loop.adapt_image`, the loop the server runs (`passes`). When no
candidate passes, or the pick fails the check, the model's default method is none.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptclip.adapt.data import Dataset
from adaptclip.adapt.encoder import EncoderModel
from adaptclip.adapt.evaluate import EvalPlan, Precomputed, Run
from adaptclip.adapt.gsbias import gs_bias
from adaptclip.adapt.loop import adapt_image, answer_top1, patch_precision, view_precision, view_signals
from adaptclip.adapt.methods import adapt_views
from adaptclip.adapt.selection import normalized_entropy
from adaptclip.adapt.settings import SMALL_INPUT, AdaptSettings, untuned_defaults
from adaptclip.adapt.shifts import SUITE, get_shift

TUNE_SHIFTS = ("clean", *SUITE)
ViewConfig = tuple[tuple[float, float], bool]  # (crop scale, AugMix)


@dataclass(frozen=True)
class TunePlan:
    """The search space and the rule's bounds."""

    view_configs: tuple[ViewConfig, ...]
    views: tuple[int, ...] = (8, 16, 32)
    methods: tuple[str, ...] = ("gs_bias", "zero")
    ratios: tuple[float, ...] = (0.1, 0.3)
    step_sizes: tuple[tuple[float, float], ...] = ((10.0, 1.0), (10.0, 0.0))  # GS-Bias (alpha, beta): official, global only
    entropy_rises: tuple[float, ...] = (1.0, 0.2, 0.1, 0.05, 0.0)
    agreements: tuple[float, ...] = (0.0, 0.25, 0.5)
    top_ks: tuple[int, ...] = (0, 2, 3)
    # gate_similarity candidates: these quantiles of the clean tune images' view similarity (per view
    # setting and view count: its level is the model's own), and 1 (off)
    similarity_quantiles: tuple[float, ...] = (0.75, 0.9, 0.97)
    skip_entropies: tuple[float, ...] = (0.0, 0.2, 0.4)
    min_shift_gain: float = -1.0  # points
    shift_se: float = 1.0  # standard errors of a shift's gain subtracted before the bound (0: the point estimate)
    mean_se: float = 1.0  # standard errors below the best mean gain that still tie with it (0: the best mean wins)
    max_views: float = 64.0  # mean views encoded per image
    held_out: float = 1 / 3  # of each class

    def method_settings(self, base: AdaptSettings) -> list[AdaptSettings]:
        """Every (view setting, method, views, ratio, step sizes) with the gate off."""
        out = []
        for (crop, augmix), method, views, ratio in itertools.product(self.view_configs, self.methods,
                                                                      self.views, self.ratios):
            steps = self.step_sizes if method == "gs_bias" else self.step_sizes[:1]
            out += [base.replace(method=method, views=views, selection_ratio=ratio, alpha=a, beta=b,
                                 crop_scale=crop, augmix=augmix, skip_entropy=0.0, view_chunk=0)
                    for a, b in steps]
        return out


@dataclass
class ImageFeatures:
    label: int
    source: Precomputed


@dataclass
class Scores:
    """Per image of one (view setting, shift) part: what each candidate and the gate see."""

    labels: Tensor  # [N]
    zero_shot: Tensor  # [N] zero-shot top-1
    zs_rank: Tensor  # [N, C] zero-shot classes best first
    entropy0: Tensor  # [N] view 0's normalised entropy
    signals: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # views -> (rise, agreement, similarity)
    adapted: dict[AdaptSettings, Tensor] = field(default_factory=dict)  # candidate -> [N] top-1


@dataclass
class Pick:
    settings: AdaptSettings
    gains: dict[str, float]  # shift -> points over zero-shot
    views_per_image: float
    errors: dict[str, float] = field(default_factory=dict)  # shift -> the gain's paired standard error, points
    mean_error: float = 0.0  # the mean gain's standard error (per image: its gain averaged over the shifts)

    @property
    def mean_gain(self) -> float:
        return sum(self.gains.values()) / len(self.gains)

    def bounds(self, se: float) -> dict[str, float]:
        """Each shift's gain less `se` standard errors: what the rule's per-shift bound is checked on."""
        return {k: g - se * self.errors.get(k, 0.0) for k, g in self.gains.items()}


def gain(right: Tensor, right_zero_shot: Tensor) -> tuple[float, float]:
    """(points over zero-shot, its paired standard error) from per-image correctness [N] (bool)."""
    d = right.float() - right_zero_shot.float()
    return 100.0 * float(d.mean()), _se(d)


def _se(d: Tensor) -> float:
    """Standard error of the mean of per-image differences [N], in points."""
    return 100.0 * float(d.std(correction=1)) / len(d) ** 0.5 if len(d) > 1 else 0.0


def rounds(data: Dataset, seed: int) -> list[list[int]]:
    """Image indices in rounds of one image per class (seeded order within each class), so that a run
    stopped after any round has used every class equally; every third round is held out."""
    per_class = []
    for label in sorted(set(data.labels)):
        idx = [i for i, y in enumerate(data.labels) if y == label]
        random.Random(f"{seed}:tune:{label}").shuffle(idx)
        per_class.append(idx)
    return [[idx[r] for idx in per_class if r < len(idx)] for r in range(max(map(len, per_class)))]


def is_held_out(round_index: int) -> bool:
    return round_index % 3 == 2


def encode(model: EncoderModel, data: Dataset, classifier: Tensor, base: AdaptSettings, config: ViewConfig,
           shift: str, progress: Callable[[int], None]) -> list[ImageFeatures]:
    """All 64 (max) views of every image under one view setting and shift, encoded once."""
    crop, augmix = config
    s = base.replace(method="gs_bias", crop_scale=crop, augmix=augmix)
    run = Run(model, data, classifier, s, EvalPlan(methods=("gs_bias",), shifts=(get_shift(shift),)))
    out = []
    for i, source, _ in run.features(get_shift(shift)):
        out.append(ImageFeatures(data.labels[i], source))
        progress(s.views)
    return out


def score(images: list[ImageFeatures], candidates: list[AdaptSettings], classifier: Tensor, logit_scale: float,
          gs_backend: str = "torch") -> Scores:
    """Zero-shot, gate signals and each candidate's adapted top-1 for every image of one part. GS-Bias runs
    on all images in one batch (gs_bias decides per image, so a batch equals its images one by one)."""
    feats = torch.stack([view_precision(img.source.feats) for img in images]).float()  # [N, V, D], as served
    unit = F.normalize(feats, dim=-1)
    logits = logit_scale * unit @ classifier.T  # [N, V, C]
    t = torch.tensor
    sc = Scores(t([img.label for img in images]), logits[:, 0].argmax(-1),
                torch.argsort(logits[:, 0], dim=-1, descending=True, stable=True),
                t([normalized_entropy(row) for row in logits[:, 0]]))
    for v in {c.views for c in candidates}:
        sig = [view_signals(row[:v], u[:v]) for row, u in zip(logits, unit)]
        sc.signals[v] = (t([g.entropy_rise for g in sig]), t([g.agreement for g in sig]), t([g.similarity for g in sig]))
    patches = None if images[0].source.patches is None else F.normalize(torch.stack(
        [patch_precision(img.source.patches) for img in images]).float(), dim=-1)
    for c in candidates:
        if c.method == "gs_bias":
            res = gs_bias(unit[:, :c.views], patches, classifier,
                          logit_scale=logit_scale, selection_ratio=c.ratio, steps=c.steps, alpha=c.alpha,
                          beta=c.beta, top_k_patches=c.spatial_top_k, backend=gs_backend)
            sc.adapted[c] = res.logits.argmax(-1)
        else:
            sc.adapted[c] = t([answer_top1(adapt_views(c, row[:c.views], None, classifier, logit_scale))
                               for row in feats])
    return sc


Gate = tuple[float, float, int, float, float]  # entropy rise, agreement, top-k, skip entropy, similarity


def similarity_levels(clean: Scores, views: int, plan: TunePlan) -> tuple[float, ...]:
    """gate_similarity candidates for one view setting and view count: off, then the plan's quantiles of
    the clean images' view similarity (rounded to 1e-4, as written to the config)."""
    sim = clean.signals[views][2].double()
    levels = [round(float(sim.quantile(q)), 4) for q in plan.similarity_quantiles] if len(sim) else []
    return (1.0, *sorted(set(levels) - {1.0}, reverse=True))


def gate_grid(plan: TunePlan, similarities: tuple[float, ...] = (1.0,)) -> list[Gate]:
    return list(itertools.product(plan.entropy_rises, plan.agreements, plan.top_ks, plan.skip_entropies,
                                  similarities))


def gated(sc: Scores, c: AdaptSettings, gate: Gate) -> tuple[Tensor, Tensor]:
    """(final top-1 [N], views encoded [N]) under one gate, as adapt.loop decides them."""
    rise_max, agree_min, top_k, skip, sim_max = gate
    rise, agree, sim = sc.signals[c.views]
    skipped = sc.entropy0 < skip
    keep = ~skipped & (rise <= rise_max) & (agree >= agree_min) & (sim <= sim_max)
    if 0 < top_k < sc.zs_rank.shape[1]:
        keep &= (sc.zs_rank[:, :top_k] == sc.adapted[c][:, None]).any(1)
    final = torch.where(keep, sc.adapted[c], sc.zero_shot)
    return final, torch.where(skipped, torch.ones_like(rise), torch.full_like(rise, float(c.views)))


def with_gate(c: AdaptSettings, gate: Gate) -> AdaptSettings:
    rise, agree, top_k, skip, sim = gate
    return c.replace(gate_entropy_rise=rise, gate_agreement=agree, gate_top_k=top_k, skip_entropy=skip,
                     gate_similarity=sim)


def pick(parts: dict[tuple[ViewConfig, str], Scores], plan: TunePlan, shifts: tuple[str, ...]) -> list[Pick]:
    """Every (candidate, gate) that passes the rule's bounds, best first (shifts[0]: the clean images,
    whose view similarity sets the similarity gate's candidate levels)."""
    passing: list[tuple[float, float, int, Pick]] = []
    order = 0
    for config in plan.view_configs:
        first = parts[(config, shifts[0])]
        for c in first.adapted:
            if (c.crop_scale, c.augmix) != config:
                continue
            for gate in gate_grid(plan, similarity_levels(first, c.views, plan)):
                gains, errors, views, per_image = {}, {}, 0.0, 0.0
                for shift in shifts:
                    sc = parts[(config, shift)]
                    final, n = gated(sc, c, gate)
                    gains[shift], errors[shift] = gain(final == sc.labels, sc.zero_shot == sc.labels)
                    per_image = per_image + ((final == sc.labels).float() - (sc.zero_shot == sc.labels).float()) / len(shifts)
                    views += float(n.mean()) / len(shifts)
                order += 1
                p = Pick(with_gate(c, gate), gains, views, errors, _se(per_image))
                if min(p.bounds(plan.shift_se).values()) >= plan.min_shift_gain and views <= plan.max_views:
                    passing.append((-p.mean_gain, views, order, p))
    ranked = [p for *_, p in sorted(passing, key=lambda t: t[:3])]
    if not ranked:
        return ranked
    floor = ranked[0].mean_gain - plan.mean_se * ranked[0].mean_error
    tied = sorted((p for p in ranked if p.mean_gain >= floor), key=lambda p: -min(p.bounds(plan.shift_se).values()))
    return tied + [p for p in ranked if p.mean_gain < floor]  # sorted() is stable: mean, views, grid order next


def check(model: EncoderModel, parts: dict[str, list[ImageFeatures]], classifier: Tensor, s: AdaptSettings) -> Pick:
    """The pick on held-out images through the served loop: gain per shift and views per image."""
    gains, views = {}, 0.0

    async def run_method(st: AdaptSettings, feats: Tensor, patches: Tensor | None):
        return adapt_views(st, feats, patches, classifier, model.logit_scale, gs_backend=model.kernels.gs_bias)

    async def one(img: ImageFeatures) -> tuple[int, int, int]:
        out = await adapt_image(img.source, s, classifier, model.logit_scale, model.logit_bias, run_method)
        zs = int(out.zero_shot.argmax())
        return zs, zs if out.result is None else answer_top1(out.result), out.report.views_encoded

    errors = {}
    for shift, images in parts.items():
        res = torch.tensor([asyncio.run(one(img)) for img in images])  # [N, (zero-shot, answer, views)]
        labels = torch.tensor([img.label for img in images])
        gains[shift], errors[shift] = gain(res[:, 1] == labels, res[:, 0] == labels)
        views += float(res[:, 2].float().mean()) / len(parts)
    return Pick(s, gains, views, errors)


def passes(p: Pick, plan: TunePlan) -> bool:
    """The held-out check: mean gain >= 0, no shift's gain *significantly* below the bound (gain plus
    `shift_se` standard errors >= min_shift_gain) and the views bound. The pick was made conservatively
    (less the margin) on twice the images; the check looks for evidence that it fails, since on a third
    of the images a true gain of 0 lands below -1 by chance alone."""
    bounded = min(p.bounds(-plan.shift_se).values()) >= plan.min_shift_gain
    return p.mean_gain >= 0.0 and bounded and p.views_per_image <= plan.max_views


def default_view_configs(image_size: int) -> tuple[ViewConfig, ...]:
    """The view settings searched: the input-scaled mild crops of the untuned defaults and near-whole
    crops (0.9-1, for towers that never saw crops), without AugMix; inputs of SMALL_INPUT px and more
    also try the official ImageNet views (crop 0.08-1 + AugMix), which erase a small input."""
    mild = untuned_defaults(image_size).crop_scale
    configs: tuple[ViewConfig, ...] = ((mild, False), ((0.9, 1.0), False))
    return configs + ((((0.08, 1.0), True),) if image_size >= SMALL_INPUT else ())


@dataclass
class TuneResult:
    chosen: AdaptSettings  # what the written config serves (method none when nothing passed)
    pick: Pick | None  # the rule's pick on the tune part (None: no candidate passed)
    check: Pick | None  # the same settings on the held-out part, through the served loop
    accepted: bool
    images: tuple[int, int]  # tune, held-out
    ms_per_view: float
    seconds: float
    candidates: int


def tune(model: EncoderModel, data: Dataset, classifier: Tensor, plan: TunePlan, *, minutes: float, seed: int = 0,
         per_class: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> TuneResult:
    """Encode, score and pick within `minutes`: images are encoded in rounds of one per class, every view
    setting and shift each, until 60 % of the budget is spent (at least 3 rounds, so both parts have
    images) or `per_class` rounds are done (a fixed count makes the result independent of the machine's
    speed). progress(stage, done, total)."""
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    base = model.adapt_defaults.replace(views=max(plan.views), seed=seed)
    order = rounds(data, seed)[:per_class]
    features: dict[tuple[ViewConfig, str], list[ImageFeatures]] = {k: [] for k in itertools.product(
        plan.view_configs, TUNE_SHIFTS)}
    tune_idx: list[int] = []
    check_idx: list[int] = []
    for r, index in enumerate(order):
        if per_class is None and r >= 3 and time.perf_counter() - started > 0.6 * minutes * 60.0:
            break
        part = Dataset(data.name, data.classes, tuple(data.paths[i] for i in index), tuple(data.labels[i] for i in index))
        first = len(features[next(iter(features))])
        for key in features:
            features[key] += encode(model, part, classifier, base, key[0], key[1], lambda n: None)
        (check_idx if is_held_out(r) else tune_idx).extend(range(first, first + len(index)))
        report("encode", r + 1, len(order))
    encode_s = time.perf_counter() - started
    views = sum(len(v) for v in features.values()) * max(plan.views)
    candidates = plan.method_settings(base)
    scores = {}
    for i, (key, feats) in enumerate(features.items()):
        mine = [c for c in candidates if (c.crop_scale, c.augmix) == key[0]]
        scores[key] = score([feats[j] for j in tune_idx], mine, classifier, model.logit_scale, model.kernels.gs_bias)
        report("score", i + 1, len(features))
    ranked = pick(scores, plan, TUNE_SHIFTS)
    best = ranked[0] if ranked else None
    checked = None
    if best is not None and check_idx:
        config = (best.settings.crop_scale, best.settings.augmix)
        held = {shift: [features[(config, shift)][j] for j in check_idx] for shift in TUNE_SHIFTS}
        checked = check(model, held, classifier, best.settings)
    accepted = best is not None and (checked is None or passes(checked, plan))
    chosen = best.settings if accepted else model.adapt_defaults.replace(method="none")
    return TuneResult(chosen, best, checked, accepted, (len(tune_idx), len(check_idx)), 1000.0 * encode_s / max(1, views),
                      time.perf_counter() - started, len(candidates) * len(gate_grid(plan)) * (1 + len(plan.similarity_quantiles)))
