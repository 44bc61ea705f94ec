"""SPDFQ synthesis: attention priors, CLS attention, MSR regions, soft labels, the optimisation, baselines."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptclip.compression.spdfq import (AttentionRecorder, Synthesiser, SynthesisConfig, cls_patch_attention,
                                         crop_regions, gaussian_images, gaussian_mixture_priors, later_half,
                                         real_images, sample_regions, soft_cross_entropy, soft_labels, total_variation)
from adaptclip.compression.models import TorchModel

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ("cat", "dog", "car", "tree", "boat")


@pytest.fixture(scope="module")
def classifier(hosted: TorchModel) -> torch.Tensor:
    return hosted.classifier(LABELS, ("a photo of a {}.",))


def synthesiser(hosted: TorchModel, classifier: torch.Tensor, **kw) -> Synthesiser:
    cfg = SynthesisConfig(**{"n": 4, "iters": 30, "progress": False, **kw})
    return Synthesiser(hosted.module, classifier, hosted.logit_scale, hosted.mean, hosted.std, hosted.image_size, cfg)


def test_priors_are_normalised_mixtures_one_per_head() -> None:
    gen = torch.Generator().manual_seed(0)
    p = gaussian_mixture_priors(3, 4, (6, 6), 5, gen)
    assert p.shape == (3, 4, 36)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 4))
    assert not torch.allclose(p[0, 0], p[0, 1]) and not torch.allclose(p[0, 0], p[1, 0])
    assert (p.max(-1).values > 2.0 / 36).all(), "a mixture of 5 narrow Gaussians is peaked, not uniform"
    one = gaussian_mixture_priors(1, 1, (6, 6), 1, torch.Generator().manual_seed(1))[0, 0].view(6, 6)
    peak = divmod(int(one.argmax()), 6)
    assert one[peak] > one[(peak[0] + 3) % 6, (peak[1] + 3) % 6], "one component: highest at its mean"


def test_cls_attention_matches_torch_attention_weights(hosted: TorchModel) -> None:
    block = hosted.module.visual.transformer.resblocks[-1]
    assert block.attn.batch_first
    x = torch.randn(2, 17, block.attn.embed_dim)
    with torch.no_grad():
        _, w = block.attn(x, x, x, need_weights=True, average_attn_weights=False)
        want = w[:, :, 0, 1:] / w[:, :, 0, 1:].sum(-1, keepdim=True)
        got = cls_patch_attention(block, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_recorder_hooks_the_later_half(hosted: TorchModel) -> None:
    visual = hosted.module.visual
    layers = later_half(len(visual.transformer.resblocks))
    assert layers == [1]  # the tiny model has 2 blocks
    rec = AttentionRecorder(visual, layers)
    try:
        with torch.no_grad():
            visual(torch.randn(3, 3, hosted.image_size, hosted.image_size))
        att = rec.attentions()
    finally:
        rec.close()
    grid = visual.grid_size[0] * visual.grid_size[1]
    assert att[1].shape == (3, visual.transformer.resblocks[1].attn.num_heads, grid)
    torch.testing.assert_close(att[1].sum(-1), torch.ones(3, 2))


def test_soft_labels_in_range() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = torch.tensor([0, 3, 9, 9])
    y = soft_labels(targets, 10, 5.0, 10.0, gen)
    torch.testing.assert_close(y.sum(-1), torch.ones(4))
    assert torch.equal(y.argmax(-1), targets)
    p = y[torch.arange(4), targets]
    lo, hi = math.exp(5) / (math.exp(5) + 9), math.exp(10) / (math.exp(10) + 9)
    assert torch.all((p >= lo - 1e-6) & (p <= hi + 1e-6))
    assert soft_cross_entropy(torch.log(y), y) < soft_cross_entropy(torch.zeros(4, 10), y)


def test_msr_regions_disjoint_and_gradient_isolated() -> None:
    gen = torch.Generator().manual_seed(3)
    image_targets = torch.tensor([0, 1, 2, 3, 4, 0])
    regions = sample_regions(6, 32, 4, 5, image_targets, (5.0, 10.0), gen)
    for i in range(6):
        mine = [r for r in regions if r.image == i]
        assert 1 <= len(mine) <= 4
        mask = torch.zeros(32, 32)
        for r in mine:
            assert 8 <= r.size <= 16 and r.top + r.size <= 32 and r.left + r.size <= 32
            assert int(r.target.argmax()) != int(image_targets[i])
            mask[r.top:r.top + r.size, r.left:r.left + r.size] += 1
        assert mask.max() == 1, "regions of one image overlap"
    images = torch.randn(6, 3, 32, 32, requires_grad=True)
    crops = crop_regions(images, regions[:1], 32)
    assert crops.shape == (1, 3, 32, 32)
    crops.square().sum().backward()
    r = regions[0]
    inside = torch.zeros_like(images, dtype=torch.bool)
    inside[r.image, :, r.top:r.top + r.size, r.left:r.left + r.size] = True
    assert images.grad[inside].abs().sum() > 0
    assert images.grad[~inside].abs().sum() == 0


def test_total_variation_prefers_smooth_images() -> None:
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert total_variation(torch.zeros(2, 3, 16, 16)) == 0
    assert total_variation(noise) > total_variation(noise * 0.1) > 0


def test_synthesis_lowers_every_term(hosted: TorchModel, classifier: torch.Tensor) -> None:
    syn = synthesiser(hosted, classifier)
    images, history = syn.run()
    assert images.shape == (4, 3, hosted.image_size, hosted.image_size)
    assert torch.all(images >= syn.low - 1e-6) and torch.all(images <= syn.high + 1e-6), "outside valid pixels"
    first = history[0]
    for k in first:
        end = float(np.mean([h[k] for h in history[-5:]]))
        assert end < first[k], f"{k} did not decrease: {first[k]:.4f} -> {end:.4f}"
    again, _ = synthesiser(hosted, classifier).run()
    torch.testing.assert_close(images, again)
    other, _ = synthesiser(hosted, classifier, seed=1).run()
    assert not torch.allclose(images, other)


def test_apa_weight_pulls_attention_towards_priors(hosted: TorchModel, classifier: torch.Tensor) -> None:
    with_apa = synthesiser(hosted, classifier, iters=20, apa_weight=5.0).run()[1]
    without = synthesiser(hosted, classifier, iters=20, apa_weight=0.0).run()[1]
    assert with_apa[-1]["apa"] < without[-1]["apa"]


def test_baselines(tmp_path: Path, hosted: TorchModel) -> None:
    g = gaussian_images(5, 32, seed=2)
    assert g.shape == (5, 3, 32, 32) and torch.equal(g, gaussian_images(5, 32, seed=2))
    assert abs(float(g.std()) - 1) < 0.1
    for i in range(4):
        sub = tmp_path / f"c{i % 2}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(np.full((40 + i, 50, 3), 40 * i, np.uint8)).save(sub / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    real = real_images(tmp_path, hosted.preprocess, 3, seed=0)
    assert real.shape == (3, 3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        real_images(tmp_path / "empty", hosted.preprocess, 3)
    with pytest.raises(FileNotFoundError, match="not found"):
        real_images(tmp_path / "missing", hosted.preprocess, 3)
