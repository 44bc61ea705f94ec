"""The numpy GS-Bias / ZERO of the edge runner against the torch path: same features in, logits within 1e-4."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptclip.adapt import marginal_entropy_and_grad as torch_marginal
from adaptclip.adapt.gsbias import gs_bias as torch_gs_bias
from adaptclip.adapt.peers import zero_logits as torch_zero
from adaptclip.compression import edge_adapt

TOL = 1e-4  # the bar: numpy logits and biases within 1e-4 of the torch float32 path

SETTINGS = [  # the torch suite's settings (tests/test_gsbias.py): scales, ratios, momenta, K
    dict(logit_scale=100.0, selection_ratio=0.1, steps=1, alpha=10.0, beta=1.0, top_k_patches=16, momentum=0.9),
    dict(logit_scale=10.0, selection_ratio=0.5, steps=5, alpha=10.0, beta=1.5, top_k_patches=4, momentum=0.9),
    dict(logit_scale=20.0, selection_ratio=0.25, steps=5, alpha=50.0, beta=1.0, top_k_patches=3, momentum=0.5),
    dict(logit_scale=5.0, selection_ratio=0.3, steps=3, alpha=1.0, beta=1.0, top_k_patches=8, momentum=0.0),
    dict(logit_scale=10.0, selection_ratio=1.0, steps=4, alpha=10.0, beta=2.0, top_k_patches=20, momentum=1.0),
]


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed: int, batch: int | None, views: int = 16, patches: int = 20, classes: int = 10,
            dim: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    return _unit(rng, *lead, views, dim), _unit(rng, *lead, patches, dim), _unit(rng, classes, dim)


def _both(v: np.ndarray, p: np.ndarray | None, w: np.ndarray, **settings: float):
    ref = torch_gs_bias(torch.from_numpy(v), None if p is None else torch.from_numpy(p), torch.from_numpy(w),
                        **settings)
    return ref, edge_adapt.gs_bias(v, p, w, **settings)


def _assert_same(ref, got) -> float:
    """Logits and both biases within TOL, the same steps; returns the largest difference."""
    worst = 0.0
    for name in ("logits", "global_bias", "spatial_bias"):
        want, have = getattr(ref, name).numpy(), getattr(got, name)
        assert have.shape == want.shape, name
        worst = max(worst, float(np.abs(have - want).max()))
    assert worst <= TOL, worst
    np.testing.assert_array_equal(np.asarray(got.steps_run), ref.steps_run.numpy())
    return worst


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("batch", [None, 4])
def test_gs_bias_matches_torch(settings: dict, batch: int | None) -> None:
    for seed in range(3):
        _assert_same(*_both(*_inputs(seed, batch), **settings))


@pytest.mark.parametrize("case", [
    dict(views=1),  # only the original view
    dict(views=4, ratio=0.1),  # int(0.4) == 0 views: clamped to one
    dict(patches=5, top_k=50),  # K > P: clamped to P
    dict(classes=1),  # one class: every softmax is 1, gradients 0
    dict(steps=0), dict(steps=1), dict(steps=3),
    dict(views=64, patches=49, classes=100, dim=64),  # official V at a larger C
])
@pytest.mark.parametrize("global_only", [False, True])
def test_gs_bias_edge_shapes_match_torch(case: dict, global_only: bool) -> None:
    settings = dict(SETTINGS[1], selection_ratio=case.get("ratio", 0.5), top_k_patches=case.get("top_k", 4),
                    steps=case.get("steps", 5))
    shape = {k: case[k] for k in ("views", "patches", "classes", "dim") if k in case}
    for batch in (None, 3):
        v, p, w = _inputs(11, batch, **shape)
        ref, got = _both(v, None if global_only else p, w, **settings)
        _assert_same(ref, got)
        if global_only:
            assert not np.any(got.spatial_bias)


def test_early_stop_fires_for_some_rows_as_in_torch() -> None:
    settings = SETTINGS[2]
    v, p, w = _inputs(0, batch=8)
    ref, got = _both(v, p, w, **settings)
    _assert_same(ref, got)
    runs = got.steps_run.tolist()
    assert min(runs) < settings["steps"] and max(runs) == settings["steps"], runs  # a mixed batch
    for i in range(8):  # per-image early stop: a batch equals its images one by one
        single = edge_adapt.gs_bias(v[i], p[i], w, **settings)
        assert single.steps_run == runs[i]
        np.testing.assert_allclose(single.logits, got.logits[i], rtol=0, atol=1e-9)


def test_zero_steps_is_zero_shot_and_inputs_untouched() -> None:
    v, p, w = _inputs(8, batch=None)
    before = (v.copy(), p.copy(), w.copy())
    got = edge_adapt.gs_bias(v, p, w, steps=0)
    np.testing.assert_allclose(got.logits, 100.0 * v[0].astype(np.float64) @ w.T.astype(np.float64), atol=1e-9)
    assert got.steps_run == 0 and got.logits.dtype == np.float64
    for a, b in zip(before, (v, p, w)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(1, 5), (7, 3), (2, 6, 4), (3, 2, 8, 1)])
def test_marginal_entropy_and_grad_matches_torch(shape: tuple[int, ...]) -> None:
    logits = np.random.default_rng(1).standard_normal(shape) * 3
    want_h, want_g = torch_marginal(torch.from_numpy(logits))
    got_h, got_g = edge_adapt.marginal_entropy_and_grad(logits)
    np.testing.assert_allclose(got_h, want_h.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_g, want_g.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [
    dict(selection_ratio=0.0), dict(selection_ratio=1.5), dict(steps=-1), dict(top_k_patches=0),
    dict(momentum=1.5), dict(logit_scale=0.0), dict(alpha=float("nan")), dict(steps=1.0),
])
def test_bad_settings_are_refused_like_torch(bad: dict) -> None:
    v, p, w = _inputs(2, batch=None)
    with pytest.raises(ValueError) as want:
        torch_gs_bias(torch.from_numpy(v), torch.from_numpy(p), torch.from_numpy(w), **bad)
    with pytest.raises(ValueError) as got:
        edge_adapt.gs_bias(v, p, w, **bad)
    assert str(got.value) == str(want.value)


def test_bad_shapes_are_refused() -> None:
    v, p, w = _inputs(2, batch=2)
    for args in [(v[0, 0], None, w), (v, p[0], w), (v, None, w[:, :5]), (v, p[:1], w), (v[:, :0], None, w)]:
        with pytest.raises(ValueError):
            edge_adapt.gs_bias(*args)


def _zero_both(logits: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    want = torch_zero(torch.from_numpy(logits), ratio).numpy()
    got = edge_adapt.zero_logits(logits, ratio)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.astype(want.dtype), want)
    return want, got


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 5), (16, 10), (64, 100), (3, 16, 10), (2, 64, 1)])
def test_zero_matches_torch(shape: tuple[int, ...], ratio: float) -> None:
    logits = (np.random.default_rng(sum(shape)).standard_normal(shape) * 5).astype(np.float32)
    _zero_both(logits, ratio)


def test_zero_ties_match_torch() -> None:
    """Vote ties broken by the walk, identical views (entropy ties, lower index first), logit ties."""
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((6, 5)) * 4).astype(np.float32)
    tied_votes = rows.copy()
    tied_votes[:2] = np.eye(5, dtype=np.float32)[[1, 3]] * 9  # the two kept views vote 1 and 3
    tied_votes[4] = np.eye(5, dtype=np.float32)[3] * 2  # the first discarded view to hit a tied class
    identical = np.repeat(rows[:1], 6, axis=0)
    identical[3] = rows[2]
    logit_ties = np.zeros((4, 3), np.float32)  # every view uniform: argmax 0 and equal entropies
    batch = np.stack([tied_votes, identical, rows])
    for logits, ratio in [(tied_votes, 2 / 6), (identical, 0.5), (logit_ties, 0.5), (batch, 2 / 6)]:
        _zero_both(logits, ratio)
    want, _ = _zero_both(tied_votes, 2 / 6)
    assert want.argmax() in (1, 3) and sorted(np.round(want * 3)) == [0, 0, 0, 1, 2]  # 1 + 1 votes, one extra


def test_zero_refuses_bad_input() -> None:
    for logits, ratio in [(np.zeros((0, 3)), 0.3), (np.zeros(4), 0.3), (np.zeros((2, 3)), 0.0)]:
        with pytest.raises(ValueError):
            edge_adapt.zero_logits(logits, ratio)


def test_selection_helpers_match_torch() -> None:
    logits = (np.random.default_rng(4).standard_normal((3, 16, 10)) * 5).astype(np.float32)
    t = torch.from_numpy(logits)
    entropy = -(torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1)
    np.testing.assert_allclose(edge_adapt.view_entropy(logits), entropy.numpy(), atol=1e-5)
    np.testing.assert_array_equal(edge_adapt.confident_views(logits, 0.25),
                                  torch.argsort(entropy, dim=-1, stable=True)[..., :4].numpy())
    assert edge_adapt.kept_count(4, 0.1) == 1 and edge_adapt.kept_count(64, 0.1) == 6
    row = logits[0, 0]
    want = float(entropy[0, 0] / math.log(10))  # adaptclip's normalized_entropy: entropy / log C
    assert edge_adapt.normalized_entropy(row) == pytest.approx(want, abs=1e-6)
    assert edge_adapt.normalized_entropy(np.zeros(7)) == pytest.approx(1.0)
    assert edge_adapt.normalized_entropy(np.zeros(1)) == 0.0
