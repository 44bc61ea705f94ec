"""GS-Bias against an autograd re-implementation of the official loop (hzhxmu/GS-Bias run_gsbias.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptclip.adapt import gs_bias, gs_bias_logits, marginal_entropy_and_grad


def _avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """The official `avg_entropy` (utils.py), verbatim in behaviour."""
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def _official(view_feats, patch_feats, weights, *, logit_scale, selection_ratio, steps, alpha, beta,
              top_k_patches, momentum):
    """The official per-image loop with autograd, in float64 (the original runs in fp16).

    Only two adjustments, matching the documented deviations: at least one view is kept, and K is
    clamped to P. Returns (logits [C], global bias, spatial bias, gradient steps taken).
    """
    n_classes = weights.shape[0]
    bias_g = torch.zeros(1, n_classes, dtype=torch.float64, requires_grad=True)
    bias_s = torch.zeros(1, n_classes, dtype=torch.float64, requires_grad=True)
    hist_g, hist_s = bias_g, bias_s
    losses, taken = [], 0
    for _ in range(steps):
        cur_g = momentum * bias_g + (1 - momentum) * hist_g
        cur_s = momentum * bias_s + (1 - momentum) * hist_s
        logits = logit_scale * view_feats @ weights.T + cur_g
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        keep = max(1, int(entropy.shape[0] * selection_ratio))
        logits = logits[torch.argsort(entropy, descending=False)[:keep]]
        loss_g = _avg_entropy(logits)
        if patch_feats is not None:
            spatial = logit_scale * patch_feats @ weights.T + cur_s
            score = F.softmax(spatial, dim=0).sum(dim=1, keepdim=True).t()
            index = torch.topk(score, k=min(top_k_patches, spatial.shape[0]), dim=1)[1]
            index = index.squeeze(0).unsqueeze(1).expand(-1, spatial.size(1))
            loss_s = _avg_entropy(torch.gather(spatial, dim=0, index=index))
        losses.append(loss_g.item())
        if len(losses) >= 2 and abs((losses[-1] - losses[0]) / losses[0]) * 100 > 25:
            break
        hist_g, hist_s = cur_g, cur_s
        grad_g = torch.autograd.grad(loss_g, [bias_g], retain_graph=True)[0]
        bias_g = bias_g - alpha * grad_g
        if patch_feats is not None:
            grad_s = torch.autograd.grad(loss_s, [bias_s], retain_graph=True)[0]
            bias_s = bias_s - beta * grad_s
        taken += 1
    hist_g = momentum * bias_g + (1 - momentum) * hist_g
    hist_s = momentum * bias_s + (1 - momentum) * hist_s
    logits = logit_scale * view_feats[0] @ weights.T + hist_g[0] + hist_s[0]
    return logits.detach(), hist_g[0].detach(), hist_s[0].detach(), taken


def _inputs(seed: int, batch: int | None, views: int = 16, patches: int = 20, classes: int = 10, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    v = F.normalize(torch.randn(*lead, views, dim, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(*lead, patches, dim, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(classes, dim, generator=g, dtype=torch.float64), dim=-1)
    return v, p, w


SETTINGS = [
    dict(logit_scale=100.0, selection_ratio=0.1, steps=1, alpha=10.0, beta=1.0, top_k_patches=16, momentum=0.9),
    dict(logit_scale=10.0, selection_ratio=0.5, steps=5, alpha=10.0, beta=1.5, top_k_patches=4, momentum=0.9),
    dict(logit_scale=20.0, selection_ratio=0.25, steps=5, alpha=50.0, beta=1.0, top_k_patches=3, momentum=0.5),
    dict(logit_scale=5.0, selection_ratio=0.3, steps=3, alpha=1.0, beta=1.0, top_k_patches=8, momentum=0.0),
    dict(logit_scale=10.0, selection_ratio=1.0, steps=4, alpha=10.0, beta=2.0, top_k_patches=20, momentum=1.0),
]


@pytest.mark.parametrize("shape", [(1, 5), (7, 3), (2, 6, 4), (3, 2, 8, 10)])
def test_closed_form_gradient_matches_autograd(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    bias = torch.zeros(*shape[:-2], shape[-1], dtype=torch.float64, requires_grad=True)
    shifted = logits + bias.unsqueeze(-2)
    expected = torch.stack([_avg_entropy(row) for row in shifted.reshape(-1, *shape[-2:])])
    expected_grad = torch.autograd.grad(expected.sum(), [bias])[0]
    entropy, grad = marginal_entropy_and_grad(logits)
    torch.testing.assert_close(entropy.reshape(-1), expected.detach(), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_loop(settings, seed):
    v, p, w = _inputs(seed, batch=None)
    result = gs_bias(v, p, w, **settings)
    logits, bias_g, bias_s, taken = _official(v, p, w, **settings)
    torch.testing.assert_close(result.logits, logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.global_bias, bias_g, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.spatial_bias, bias_s, atol=1e-4, rtol=0)
    assert int(result.steps_run) == taken


def test_early_stop_triggers_per_image_and_matches_official():
    settings = SETTINGS[2]
    v, p, w = _inputs(0, batch=6)
    result = gs_bias(v, p, w, **settings)
    runs = result.steps_run.tolist()
    assert min(runs) < settings["steps"] and max(runs) == settings["steps"], runs  # mixed batch
    for i in range(6):
        logits, _, _, taken = _official(v[i], p[i], w, **settings)
        assert runs[i] == taken
        torch.testing.assert_close(result.logits[i], logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("settings", SETTINGS[1:3])
def test_batched_equals_unbatched(settings):
    v, p, w = _inputs(3, batch=5)
    batched = gs_bias(v.float(), p.float(), w.float(), **settings)
    for i in range(5):
        single = gs_bias(v[i].float(), p[i].float(), w.float(), **settings)
        torch.testing.assert_close(batched.logits[i], single.logits, atol=1e-5, rtol=1e-5)
        assert int(batched.steps_run[i]) == int(single.steps_run)
    assert batched.logits.shape == (5, 10) and batched.steps_run.shape == (5,)


def test_single_view():
    v, p, w = _inputs(4, batch=None, views=1)
    settings = dict(SETTINGS[1], selection_ratio=0.1)
    result = gs_bias(v, p, w, **settings)
    torch.testing.assert_close(result.logits, _official(v, p, w, **settings)[0], atol=1e-4, rtol=0)
    assert torch.isfinite(result.logits).all()


def test_zero_selected_views_clamps_to_one():
    v, p, w = _inputs(5, batch=None, views=4)
    settings = dict(SETTINGS[1])
    clamped = gs_bias_logits(v, p, w, **dict(settings, selection_ratio=0.1))  # int(0.4) == 0
    one = gs_bias_logits(v, p, w, **dict(settings, selection_ratio=0.25))  # int(1.0) == 1
    torch.testing.assert_close(clamped, one)
    assert torch.isfinite(clamped).all()


def test_top_k_larger_than_patches_clamps():
    v, p, w = _inputs(6, batch=None, patches=5)
    settings = dict(SETTINGS[1])
    torch.testing.assert_close(gs_bias_logits(v, p, w, **dict(settings, top_k_patches=50)),
                               gs_bias_logits(v, p, w, **dict(settings, top_k_patches=5)))


def test_without_patches_spatial_bias_stays_zero():
    v, _, w = _inputs(7, batch=None)
    settings = dict(SETTINGS[1])
    result = gs_bias(v, None, w, **settings)
    assert torch.count_nonzero(result.spatial_bias) == 0
    torch.testing.assert_close(result.logits, _official(v, None, w, **settings)[0], atol=1e-4, rtol=0)


def test_zero_steps_is_zero_shot():
    v, p, w = _inputs(8, batch=None)
    result = gs_bias(v, p, w, steps=0)
    torch.testing.assert_close(result.logits, 100.0 * v[0] @ w.T)
    assert int(result.steps_run) == 0


def test_float32_and_no_autograd():
    v, p, w = (t.float().requires_grad_() for t in _inputs(9, batch=None))
    out = gs_bias_logits(v, p, w, steps=2)
    assert out.dtype == torch.float32 and not out.requires_grad


@pytest.mark.parametrize("name, value", [
    ("selection_ratio", 0.0), ("selection_ratio", 1.5), ("selection_ratio", math.nan),
    ("steps", -1), ("steps", 1.5), ("steps", True),
    ("alpha", math.inf), ("beta", math.nan),
    ("top_k_patches", 0), ("momentum", 1.5), ("logit_scale", 0.0),
])
def test_invalid_arguments_name_the_argument(name, value):
    v, p, w = _inputs(10, batch=None)
    with pytest.raises(ValueError, match=name):
        gs_bias_logits(v, p, w, **{name: value})


@pytest.mark.parametrize("args, name", [
    ((torch.zeros(4), None, torch.zeros(3, 4)), "view_feats"),
    ((torch.zeros(2, 4), None, torch.zeros(3, 5)), "text_classifier"),
    ((torch.zeros(2, 4), torch.zeros(2, 3, 4), torch.zeros(3, 4)), "patch_feats"),
    ((torch.zeros(2, 2, 4), torch.zeros(3, 3, 4), torch.zeros(3, 4)), "patch_feats"),
])
def test_bad_shapes_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        gs_bias_logits(*args)
