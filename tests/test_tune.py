"""The safety gate, per-method view defaults, the tune search and `adaptclip tune`."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
import yaml
from adaptclip.adapt import tune as T
from adaptclip.adapt.evaluate import Precomputed
from adaptclip.adapt.gate import outside_top_k, views_out_of_distribution
from adaptclip.adapt.loop import adapt_image, answer_top1, view_signals
from adaptclip.adapt.methods import adapt_views
from adaptclip.adapt.settings import AdaptSettings, FieldError, settings_from_dict
from adaptclip.client import cli
from adaptclip.server.config import load_config
from conftest import make_image

SCALE = 20.0


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows) * 10.0


def test_signals_from_hand_made_logits() -> None:
    # view 0 confident on class 0; two views agree with it, one is uncertain and picks class 1
    logits = _logits([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0.01, 0]])
    feats = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)  # cosines 1, 0.6, 0
    g = view_signals(logits, feats)
    assert g.agreement == pytest.approx(2 / 3) and g.similarity == pytest.approx(1.6 / 3)
    assert g.entropy_rise > 0.2  # the uniform-ish view lifts the mean entropy
    s = AdaptSettings(method="gs_bias")
    assert views_out_of_distribution(s, g) == ""  # off by default in AdaptSettings()
    assert "entropy rose" in views_out_of_distribution(s.replace(gate_entropy_rise=0.1), g)
    assert "agree" in views_out_of_distribution(s.replace(gate_agreement=0.9), g)
    assert "alike" in views_out_of_distribution(s.replace(gate_similarity=0.5), g)
    assert views_out_of_distribution(s.replace(gate_similarity=0.55), g) == ""
    with pytest.raises(ValueError, match="V >= 2"):
        view_signals(logits[:1], feats[:1])
    import adaptclip.adapt.gate as gate_module  # the edge runner imports it: no torch there
    assert "torch" not in gate_module.__dict__


def test_top_k_test() -> None:
    zs = [0, 1, 2, 3]  # zero-shot classes best first
    s = AdaptSettings(method="zero", gate_top_k=2)
    assert outside_top_k(s, zs, 1) == "" and "top-2" in outside_top_k(s, zs, 2)
    assert outside_top_k(s.replace(gate_top_k=0), zs, 3) == ""


@pytest.mark.parametrize("field,value", [("gate_entropy_rise", 1.5), ("gate_agreement", -0.1), ("gate_top_k", -1),
                                         ("gate_entropy_rise", float("nan")), ("gate_similarity", 1.1)])
def test_gate_settings_validated_with_their_field(field: str, value: float) -> None:
    with pytest.raises(FieldError) as exc:
        settings_from_dict({field: value})
    assert exc.value.field == f"adaptation.{field}"


def test_each_method_has_its_official_views() -> None:
    assert AdaptSettings(method="gs_bias").use_augmix
    assert not AdaptSettings(method="zero").use_augmix  # ZERO: crop + flip
    assert not AdaptSettings(method="tpt").use_augmix  # TPT: AugMix only for fine-grained sets
    assert AdaptSettings(method="zero", augmix=True).use_augmix  # asked for, it is used


def _features(seed: int, views: int = 16, dim: int = 8, classes: int = 4, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    clf = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    base = torch.randn(dim, generator=g)
    feats = base + spread * torch.randn(views, dim, generator=g)
    return feats, torch.randn(6, dim, generator=g), clf


async def _served(s: AdaptSettings, feats: torch.Tensor, patches: torch.Tensor, clf: torch.Tensor):
    async def run_method(st, f, p):
        return adapt_views(st, f, p, clf, SCALE)
    return await adapt_image(Precomputed(feats, patches), s, clf, SCALE, None, run_method)


def test_loop_falls_back_when_views_look_out_of_distribution() -> None:
    feats, patches, clf = _features(0, spread=3.0)  # views scattered far from the original
    s = AdaptSettings(method="gs_bias", views=16)
    adapted = asyncio.run(_served(s, feats, patches, clf))
    assert adapted.result is not None and not adapted.report.fell_back
    gated = asyncio.run(_served(s.replace(gate_agreement=1.0), feats, patches, clf))
    assert gated.result is None and gated.report.fell_back and gated.report.views_encoded == 16
    assert "safety gate" in gated.report.note
    assert torch.equal(gated.zero_shot, adapted.zero_shot)


def test_tune_scoring_decides_as_the_served_loop() -> None:
    """gated() (the vectorised grid) and adapt_image (the server's loop) give the same answer per image."""
    images, clf = [], None
    for i in range(12):
        feats, patches, clf = _features(100 + i, spread=0.5 + 0.3 * (i % 4))
        images.append(T.ImageFeatures(i % 4, Precomputed(feats, patches)))  # fp32: scoring rounds as served
    _, _, clf = _features(100)
    cands = [AdaptSettings(method=m, views=v, selection_ratio=0.3) for m in ("gs_bias", "zero") for v in (8, 16)]
    sc = T.score(images, cands, clf, SCALE)
    plan = T.TunePlan(view_configs=(), similarity_quantiles=(0.5,))
    for c in cands:
        off, median = T.similarity_levels(sc, c.views, plan)  # half the images' views are more alike
        assert off == 1.0 and (sc.signals[c.views][2] > median).sum() == 6
        for gate in [(1.0, 0.0, 0, 0.0, 1.0), (0.05, 0.0, 0, 0.0, 1.0), (1.0, 0.6, 0, 0.0, 1.0), (1.0, 0.0, 2, 0.0, 1.0),
                     (1.0, 0.0, 0, 0.5, 1.0), (1.0, 0.0, 0, 0.0, median)]:
            final, views = T.gated(sc, c, gate)
            s = T.with_gate(c, gate)
            for j, img in enumerate(images):
                out = asyncio.run(_served(s, img.source.feats, img.source.patches, clf))
                served = int(out.zero_shot.argmax()) if out.result is None else answer_top1(out.result)
                assert served == int(final[j]), (c, gate, j)
                assert out.report.views_encoded == int(views[j])


def test_rule_prefers_mean_gain_within_bounds_then_fewer_views() -> None:
    n = 20
    labels = torch.zeros(n, dtype=torch.long)
    zs = torch.tensor([0] * 10 + [1] * 10)  # 50 % right
    rank = torch.tensor([[0, 1, 2]] * 10 + [[1, 0, 2]] * 10)
    calm = (torch.zeros(n), torch.ones(n), torch.zeros(n))
    a = AdaptSettings(method="gs_bias", views=16, crop_scale=(0.5, 1.0), augmix=False)  # big gain, one shift -5
    b = a.replace(method="zero")  # small gain everywhere
    c = a.replace(method="zero", views=8)  # the same answers as b at fewer views

    def part(right_a: int, right_b: int) -> T.Scores:
        ans = lambda k: torch.tensor([0] * k + [1] * (n - k))
        return T.Scores(labels, zs, rank, torch.ones(n), {16: calm, 8: calm},
                        {a: ans(right_a), b: ans(right_b), c: ans(right_b)})

    config = ((0.5, 1.0), False)
    parts = {(config, "clean"): part(9, 11), (config, "blur"): part(18, 12)}
    plan = T.TunePlan(view_configs=(config,), entropy_rises=(1.0,), agreements=(0.0,), top_ks=(0,), skip_entropies=(0.0,), similarity_quantiles=(),
                      shift_se=0.0, mean_se=0.0)
    ranked = T.pick(parts, plan, ("clean", "blur"))
    assert ranked[0].settings.method == "zero" and ranked[0].settings.views == 8  # a breaks the -1 bound
    assert ranked[0].gains == {"clean": pytest.approx(5.0), "blur": pytest.approx(10.0)}
    assert all(p.settings.method != "gs_bias" for p in ranked)
    assert not T.pick(parts, T.TunePlan(view_configs=(config,), max_views=4, entropy_rises=(1.0,), agreements=(0.0,),
                                        top_ks=(0,), skip_entropies=(0.0,), similarity_quantiles=(), shift_se=0.0, mean_se=0.0), ("clean", "blur"))


def test_similarity_gate_is_picked_at_a_clean_quantile_when_alike_views_lose() -> None:
    """On "blur" the views are nearly the original (similarity 0.99) and the method loses; on clean they
    differ (0.80-0.89) and it gains. The gate at a quantile of the clean similarity keeps the clean gain
    and falls back on blur, so the rule picks it over the ungated candidate, which breaks the bound."""
    n = 10
    labels = torch.zeros(n, dtype=torch.long)
    zs = torch.tensor([0] * 5 + [1] * 5)
    rank = torch.tensor([[0, 1, 2]] * 5 + [[1, 0, 2]] * 5)
    a = AdaptSettings(method="gs_bias", views=16, crop_scale=(0.5, 1.0), augmix=False)
    clean_sim = torch.linspace(0.80, 0.89, n)

    def part(sim: Tensor, adapted: Tensor) -> T.Scores:
        return T.Scores(labels, zs, rank, torch.ones(n), {16: (torch.zeros(n), torch.ones(n), sim)}, {a: adapted})

    config = ((0.5, 1.0), False)
    parts = {(config, "clean"): part(clean_sim, torch.tensor([0] * 8 + [1] * 2)),  # +3 right
             (config, "blur"): part(torch.full((n,), 0.99), torch.tensor([0] * 3 + [1] * 7))}  # -2 right
    plan = T.TunePlan(view_configs=(config,), entropy_rises=(1.0,), agreements=(0.0,), top_ks=(0,),
                      skip_entropies=(0.0,), similarity_quantiles=(0.97,), shift_se=0.0, mean_se=0.0)
    ranked = T.pick(parts, plan, ("clean", "blur"))
    assert len(ranked) == 1 and ranked[0].settings.gate_similarity == pytest.approx(0.8873, abs=1e-4)
    assert ranked[0].gains == {"clean": pytest.approx(30.0), "blur": pytest.approx(0.0)}


def test_rule_bounds_each_shift_by_its_standard_error() -> None:
    """A candidate that flips many answers both ways on one shift passes the point bound (-0 points) but
    not the bound less one standard error; one that changes a single answer for the better passes both."""
    n = 40
    labels = torch.zeros(n, dtype=torch.long)
    zs = torch.tensor([0] * 20 + [1] * 20)
    rank = torch.tensor([[0, 1, 2]] * 20 + [[1, 0, 2]] * 20)
    calm = (torch.zeros(n), torch.ones(n), torch.zeros(n))
    wild = AdaptSettings(method="gs_bias", views=16, crop_scale=(0.5, 1.0), augmix=False)
    mild = wild.replace(method="zero")
    churn = torch.tensor([1] * 10 + [0] * 10 + [0] * 10 + [1] * 10)  # 10 right answers lost, 10 won: gain 0
    better = zs.clone()
    better[20] = 0  # one more right

    def part(a: Tensor) -> T.Scores:
        return T.Scores(labels, zs, rank, torch.ones(n), {16: calm}, {wild: a, mild: better})

    config = ((0.5, 1.0), False)
    parts = {(config, "clean"): part(torch.zeros(n, dtype=torch.long)), (config, "blur"): part(churn)}
    grid = dict(view_configs=(config,), entropy_rises=(1.0,), agreements=(0.0,), top_ks=(0,), skip_entropies=(0.0,), similarity_quantiles=())
    point = T.pick(parts, T.TunePlan(**grid, shift_se=0.0, mean_se=0.0), ("clean", "blur"))
    assert point[0].settings.method == "gs_bias" and point[0].gains["blur"] == pytest.approx(0.0)
    assert point[0].errors["blur"] == pytest.approx(100.0 * (20 / 39) ** 0.5 / 40 ** 0.5)
    bounded = T.pick(parts, T.TunePlan(**grid, mean_se=0.0), ("clean", "blur"))
    assert [p.settings.method for p in bounded] == ["zero"]
    assert bounded[0].gains == {"clean": pytest.approx(2.5), "blur": pytest.approx(2.5)}


def test_rounds_take_one_image_per_class_seeded(tmp_path: Path) -> None:
    from adaptclip.adapt.data import load_folder
    for c, n in (("a", 5), ("b", 3)):
        (tmp_path / c).mkdir()
        for i in range(n):
            (tmp_path / c / f"{i}.png").write_bytes(make_image(i, size=(8, 8)))
    data = load_folder(tmp_path)
    order = T.rounds(data, seed=3)
    assert [len(r) for r in order] == [2, 2, 2, 1, 1]  # class b runs out after three rounds
    assert sorted(i for r in order for i in r) == list(range(8))
    assert all(sorted(data.labels[i] for i in r) == sorted(set(data.labels[i] for i in r)) for r in order)
    assert order == T.rounds(data, seed=3) and order != T.rounds(data, seed=4)
    assert [T.is_held_out(r) for r in range(6)] == [False, False, True, False, False, True]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tune-data")
    for c, name in enumerate(("cat", "dog", "car")):
        (root / name).mkdir()
        for i in range(4):
            (root / name / f"{i}.png").write_bytes(make_image(10 * c + i, size=(36, 32)))
    return root


def test_tune_is_deterministic_and_checks_its_pick(folder: Path, hosted, one_thread) -> None:
    from adaptclip.adapt.data import load_folder
    data = load_folder(folder)
    clf = hosted.classifier(data.classes, ("a photo of a {}.",))
    plan = T.TunePlan(view_configs=(((0.5, 1.0), False),), views=(4, 8), entropy_rises=(1.0, 0.1),
                      agreements=(0.0, 0.5), top_ks=(0, 2), skip_entropies=(0.0,), similarity_quantiles=())
    first = T.tune(hosted, data, clf, plan, minutes=1e-4, seed=1)
    assert first.images == (6, 3)  # the budget allows the minimum, 3 rounds: the third is held out
    assert first.candidates == len(plan.method_settings(hosted.adapt_defaults)) * 8
    if first.pick is not None:  # the held-out check ran the served loop on the same settings
        assert first.check is not None and set(first.check.gains) == set(T.TUNE_SHIFTS)
        assert first.accepted == T.passes(first.check, plan)
    assert first.chosen.method == "none" or first.accepted
    second = T.tune(hosted, data, clf, plan, minutes=1e-4, seed=1)
    assert second.chosen == first.chosen and second.images == first.images
    fixed = T.tune(hosted, data, clf, plan, minutes=1e-4, seed=1, per_class=4)  # all 4 rounds, whatever the speed
    assert fixed.images == (9, 3)


def test_cli_writes_a_config_the_server_serves(folder: Path, tiny_spec, tmp_path: Path, capsys, one_thread) -> None:
    out = tmp_path / "tuned.yaml"
    argv = ["tune", str(folder), "--model", tiny_spec.model, "--pretrained", tiny_spec.pretrained, "--device", "cpu",
            "--minutes", "0.0001", "--seed", "1", "--views", "4", "-o", str(out)]
    assert cli.main(argv) == 0
    doc = yaml.safe_load(out.read_text())
    rec = doc["tuned"]
    assert rec["images"] == {"tune": 6, "held_out": 3}  # the budget allows the minimum: 3 rounds
    assert rec["candidates_scored"] > 100 and rec["accepted"] in (True, False)
    assert set(rec["tune_part"] or {}) <= {"gain_per_shift", "standard_error", "mean_gain", "mean_gain_standard_error",
                                           "views_per_image"}
    if rec["accepted"]:  # the record names the pick; the served block is it exactly when it was accepted
        assert rec["pick"] == doc["models"][0]["adaptation"]
    cfg = load_config(out)  # the record does not upset the server's config reader
    block = cfg.models[0].adaptation
    settings = settings_from_dict(dict(block))  # every setting written, valid
    assert settings.method in ("none", "gs_bias", "zero") and block["gate_entropy_rise"] == settings.gate_entropy_rise
    assert "wrote" in capsys.readouterr().err
    assert cli.main(argv[:-2] + ["-o", str(tmp_path / "missing" / "x.yaml")]) == 2


def test_rule_takes_the_most_robust_of_the_candidates_tied_with_the_best_mean() -> None:
    """Within one standard error of the best mean gain is a tie, and of the tied the better worst shift
    wins; a candidate clearly below the best mean is not preferred, however safe."""
    n = 200
    labels = torch.zeros(n, dtype=torch.long)
    zs = torch.tensor([0] * 100 + [1] * 100)  # 50 % right
    rank = torch.tensor([[0, 1, 2]] * 100 + [[1, 0, 2]] * 100)
    calm = (torch.zeros(n), torch.ones(n), torch.zeros(n))
    bold = AdaptSettings(method="gs_bias", views=16, crop_scale=(0.5, 1.0), augmix=False)
    safe, timid = bold.replace(method="zero"), bold.replace(method="zero", views=8)

    def answers(lost: int, won: int) -> Tensor:  # zero-shot's answers, `lost` right ones lost, `won` wrong ones won
        out = zs.clone()
        out[:lost] = 1
        out[100:100 + won] = 0
        return out

    def part(b: Tensor, s: Tensor, t: Tensor) -> T.Scores:
        return T.Scores(labels, zs, rank, torch.ones(n), {16: calm, 8: calm}, {bold: b, safe: s, timid: t})

    config = ((0.5, 1.0), False)
    parts = {(config, "clean"): part(answers(0, 18), answers(0, 12), answers(0, 6)),  # +9, +6, +3 points
             (config, "blur"): part(answers(1, 1), answers(0, 4), answers(0, 6))}  # +0, +2, +3
    grid = dict(view_configs=(config,), entropy_rises=(1.0,), agreements=(0.0,), top_ks=(0,), skip_entropies=(0.0,), similarity_quantiles=())
    by_mean = T.pick(parts, T.TunePlan(**grid, mean_se=0.0), ("clean", "blur"))
    assert [p.settings for p in by_mean] == [bold, safe, timid]
    assert [p.mean_gain for p in by_mean] == pytest.approx([4.5, 4.0, 3.0])
    assert 0.5 < by_mean[0].mean_error < 1.5  # safe is within one standard error of bold, timid is not
    robust = T.pick(parts, T.TunePlan(**grid), ("clean", "blur"))
    assert [p.settings for p in robust] == [safe, bold, timid]


def test_held_out_check_fails_only_on_evidence_against_the_bound() -> None:
    plan = T.TunePlan(view_configs=())
    s = AdaptSettings(method="gs_bias")
    noisy = T.Pick(s, {"clean": 3.0, "blur": -1.5}, 30.0, {"clean": 2.0, "blur": 1.9})  # -1.5 + 1.9 >= -1
    assert T.passes(noisy, plan)
    assert not T.passes(T.Pick(s, {"clean": 3.0, "blur": -2.5}, 30.0, {"clean": 2.0, "blur": 1.0}), plan)
    assert not T.passes(T.Pick(s, {"clean": -1.0, "blur": 0.5}, 30.0, {"clean": 3.0, "blur": 3.0}), plan)  # mean < 0
    assert not T.passes(T.Pick(s, {"clean": 3.0}, 65.0, {"clean": 1.0}), plan)  # over max_views
    assert not T.passes(noisy, T.TunePlan(view_configs=(), shift_se=0.0))  # the point estimate alone
