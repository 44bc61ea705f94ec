"""Accuracy harness: Kornia shifts, metrics, the evaluation engine and `adaptclip eval`."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
import torch

from adaptclip.adapt.data import load_folder
from adaptclip.adapt.evaluate import EvalPlan, Precomputed, Run, evaluate
from adaptclip.adapt.loop import adapt_image, skips_views, views_agree
from adaptclip.adapt.pieces import view_chunks
from adaptclip.adapt.methods import MethodResult
from adaptclip.adapt.metrics import classification_metrics, ranked_classes
from adaptclip.adapt.settings import AdaptSettings
from adaptclip.adapt.shifts import HELD_OUT, SHIFT_NAMES, SUITE, get_shift
from adaptclip.client import cli_eval
from adaptclip.compression.models import load_model
from conftest import make_image

CLASSES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(make_image(10 * c + i, size=(36, 32)))
    return root


@pytest.fixture(scope="module")
def hosted(tiny_spec):
    return load_model(tiny_spec)


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_shift_deterministic_shape_preserving_in_range(name: str) -> None:
    image = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(0))
    shift = get_shift(name)
    out = shift(image, seed=7)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.equal(out, shift(image, seed=7))
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    if name == "clean":
        assert torch.equal(out, image)
    else:
        assert (out - image).abs().mean() > 0.01


def test_noise_depends_on_seed_only() -> None:
    image = torch.full((3, 16, 16), 0.5)
    noise = get_shift("gaussian_noise")
    first = noise(image, seed=1)
    torch.rand(100)  # global RNG use in between must not matter
    assert torch.equal(first, noise(image, seed=1))
    assert not torch.equal(first, noise(image, seed=2))


def test_shift_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown shift"):
        get_shift("snow")
    with pytest.raises(ValueError, match="float"):
        get_shift("jpeg")(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)
    assert set(SUITE) | set(HELD_OUT) == set(SHIFT_NAMES) - {"clean"}
    assert not set(SUITE) & set(HELD_OUT)  # what tune sees is kept apart from what is reported


def test_metrics_hand_made() -> None:
    # Three classes, 5 samples: top-1 hits on samples 0, 2, 3; every label within the top 3 except sample 4.
    top = [[0, 1, 2], [2, 0, 1], [1, 2, 0], [1, 0, 2], [0, 2, 1]]
    labels = [0, 1, 1, 1, 1]
    m = classification_metrics(top, labels, n_classes=3)
    assert m["acc1"] == pytest.approx(3 / 5)
    assert m["acc5"] == pytest.approx(5 / 5)  # top-min(5, C) = top-3
    # recall: class 0 -> 1/1, class 1 -> 2/4; mean over the present classes.
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)
    top7 = [[0, 1, 2, 3, 4, 5, 6]] * 2
    assert classification_metrics(top7, [5, 4], n_classes=7)["acc5"] == pytest.approx(0.5)


def test_ranked_classes_tie_break() -> None:
    votes = torch.tensor([0.5, 0.0, 0.5, 0.0])
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert ranked_classes(votes, k=4, tie_break=logits) == [2, 0, 1, 3]
    assert ranked_classes(votes, k=2) == [0, 2]


def _views_used(s: AdaptSettings, view_logits: torch.Tensor) -> int:
    """Views the served loop encodes before its chunked early stop, for views with these logits."""
    async def run_method(settings, feats, patches):
        return MethodResult(feats[0], feats[0], 0, True)

    feats = view_logits / view_logits.norm(dim=-1, keepdim=True)  # unit rows: logits = 5 * feats @ I
    out = asyncio.run(adapt_image(Precomputed(feats, None), s, torch.eye(2), 5.0, None, run_method))
    return out.report.views_encoded


def test_chunk_helpers_follow_the_server_loop() -> None:
    s = AdaptSettings(method="gs_bias", views=64, view_chunk=16)
    assert view_chunks(s) == [(1, 17), (17, 33), (33, 49), (49, 64)]
    assert view_chunks(s.replace(view_chunk=0)) == [(1, 64)]
    assert view_chunks(s.replace(views=1)) == []
    assert skips_views(s.replace(skip_entropy=0.5), 0.4) and not skips_views(s.replace(skip_entropy=0.5), 0.5)
    assert not skips_views(s.replace(method="none", skip_entropy=1.0), 0.1)
    # All views predict class 0. At ratio 0.1, 17 views select one view, which cannot "agree" on its
    # own; 33 views select three, which agree.
    agreeing = torch.tensor([[5.0, 0.0]]).repeat(64, 1)
    assert _views_used(s, agreeing) == 33
    assert _views_used(s.replace(selection_ratio=0.2), agreeing) == 17
    assert _views_used(s.replace(view_chunk=0), agreeing) == 64
    # Views alternate their argmax and equal entropy: the selection never agrees, all views are used.
    split = torch.tensor([[5.0, 0.0], [0.0, 5.0]]).repeat(32, 1)
    assert _views_used(s.replace(selection_ratio=0.5), split) == 64


def test_one_selected_view_never_counts_as_agreement() -> None:
    one = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert not views_agree(one, 0.1) and not views_agree(one[:1], 1.0)
    assert views_agree(one, 0.7) is False  # two selected, different classes
    assert views_agree(torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 1.0]]), 0.7)


def _plan(**kw) -> EvalPlan:
    return EvalPlan(shifts=(get_shift("clean"), get_shift("gaussian_noise")), batch_images=4, **kw)


def test_evaluate_end_to_end(hosted, folder: Path) -> None:
    data = load_folder(folder)
    assert data.classes == tuple(sorted(CLASSES)) and len(data.paths) == 6
    clf = hosted.classifier(data.classes, ("a photo of a {}.",))
    records = evaluate(hosted, data, clf, AdaptSettings(views=4, crop_scale=(0.5, 1.0), augmix=False), _plan(),
                       model_name="tiny", pretrained="ckpt")
    assert len(records) == 2 * 4
    for r in records:
        assert r["task"] == "zeroshot_classification" and r["dataset"] == folder.name
        assert set(r["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
        assert r["method"] in {"none", "gs_bias", "zero", "tpt"} and r["shift"] in {"clean", "gaussian_noise"}
        assert r["images"] == 6 and r["cost"]["per_image_ms"] > 0
        assert r["cost"]["views_encoded"] == (1 if r["method"] == "none" else 4)
    again = evaluate(hosted, data, clf, AdaptSettings(views=4, crop_scale=(0.5, 1.0), augmix=False), _plan(),
                     model_name="tiny", pretrained="ckpt")
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]  # seeded views and shifts


def test_skip_gate_extremes(hosted, folder: Path) -> None:
    data = load_folder(folder, limit_per_class=1)
    clf = hosted.classifier(data.classes, ("a photo of a {}.",))
    records = evaluate(hosted, data, clf, AdaptSettings(views=3), _plan(methods=("none", "gs_bias"),
                       skip_entropies=(0.0, 1.0)), model_name="tiny", pretrained="ckpt")
    by = {(r["shift"], r["method"], r["adaptation"]["skip_entropy"]): r for r in records}
    for shift in ("clean", "gaussian_noise"):
        assert by[(shift, "gs_bias", 0.0)]["cost"]["skipped_fraction"] == 0.0
        assert by[(shift, "gs_bias", 0.0)]["cost"]["views_encoded"] == 3
        gated = by[(shift, "gs_bias", 1.0)]
        assert gated["cost"]["skipped_fraction"] == 1.0 and gated["cost"]["views_encoded"] == 1
        assert gated["metrics"] == by[(shift, "none", 0.0)]["metrics"]


def test_cli_eval_writes_json(tiny_spec, folder: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli_eval.add_parser(parser.add_subparsers(dest="command"))
    (tmp_path / "classes.txt").write_text("dog\ncat\ncar\n")
    out = tmp_path / "results.json"
    args = parser.parse_args(["eval", str(folder), "--model", tiny_spec.model, "--pretrained", tiny_spec.pretrained,
                              "--device", "cpu", "--labels-file", str(tmp_path / "classes.txt"), "--tta", "none,zero",
                              "--views", "3", "--shifts", "clean,jpeg", "--view-chunk", "0,1", "-o", str(out)])
    assert cli_eval.run(args) == 0
    records = json.loads(out.read_text())
    assert {(r["method"], r["shift"], r["adaptation"]["view_chunk"]) for r in records} == {
        ("none", "clean", 0), ("none", "jpeg", 0), ("zero", "clean", 0), ("zero", "clean", 1),
        ("zero", "jpeg", 0), ("zero", "jpeg", 1)}
    assert all(r["adaptation"]["views"] == 3 for r in records)
    bad = parser.parse_args(["eval", str(tmp_path / "missing"), "--model", tiny_spec.model, "--pretrained",
                             tiny_spec.pretrained, "-o", str(out)])
    assert cli_eval.run(bad) == 2


@pytest.mark.parametrize(("method", "chunk"), [("zero", 3), ("gs_bias", 0), ("gs_bias", 3), ("tpt", 3)])
def test_measured_is_served(server, client, folder: Path, method: str, chunk: int) -> None:
    """The engine's per-image answer and views encoded equal the gRPC service's for the same seed."""
    from adaptclip.v1 import classifier_pb2 as pb

    hosted = server.models[0]
    data = load_folder(folder)
    templates = ("a photo of a {}.",)
    clf = hosted.classifier(data.classes, templates)
    base = hosted.adapt_defaults.replace(views=8, seed=40, selection_ratio=0.5)  # as served; 2 views kept a chunk
    run = Run(hosted, data, clf, base, EvalPlan(methods=(method,), shifts=(get_shift("clean"),),
                                                 view_chunks=(chunk,), batch_images=4), None)
    for i, img in enumerate(run.shift(get_shift("clean"))):
        msg = pb.Adaptation(method=pb.Adaptation.Method.Value(method.upper()), views=8, seed=40 + i, view_chunk=chunk,
                           selection_ratio=0.5)
        resp = client.classify(data.paths[i], labels=list(data.classes), templates=list(templates),
                               adaptation=msg, top_k=3)
        out = img.scored[run.settings[0]]
        assert resp.adaptation.views_encoded == out.views
        assert resp.zero_shot_top[0].label == data.classes[img.zero_shot[0]]
        assert resp.top[0].label == data.classes[out.top[0]]
