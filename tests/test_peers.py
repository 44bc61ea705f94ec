"""ZERO voting semantics and TPT on a tiny random-init open_clip model."""
from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from adaptclip.adapt import tpt_logits, zero_logits

CLASSES = ["cat", "dog", "red car", "golden_retriever"]


def _views(preds: list[int], confidence: list[float], classes: int = 5) -> torch.Tensor:
    """One row per view: argmax `pred`, sharper (lower entropy) for larger `confidence`."""
    logits = torch.zeros(len(preds), classes)
    for row, (pred, conf) in enumerate(zip(preds, confidence)):
        logits[row, pred] = conf
    return logits


def test_zero_votes_of_the_most_confident_views():
    # V = 10, ratio 0.3 -> the 3 sharpest views vote: classes 2, 2, 4.
    logits = _views([2, 2, 4, 0, 0, 0, 0, 1, 1, 1], [9, 8, 7, 1, 1, 1, 1, 1, 1, 1])
    torch.testing.assert_close(zero_logits(logits), torch.tensor([0, 0, 2 / 3, 0, 1 / 3]))


def test_zero_tie_broken_by_next_most_confident_view():
    # Kept (int(6 * 0.4) = 2 views): classes 1 and 3 tie. Among the discarded views, by decreasing
    # confidence, the first predicts 0 (not tied) and the next 3, which wins.
    logits = _views([1, 3, 0, 3, 1, 0], [9, 8, 7, 6, 5, 4])
    torch.testing.assert_close(zero_logits(logits, selection_ratio=0.4), torch.tensor([0, 1 / 3, 0, 2 / 3, 0]))


def test_zero_tie_without_a_discarded_vote_goes_to_the_most_confident_kept_view():
    logits = _views([1, 3, 0, 0], [5, 9, 2, 1])
    torch.testing.assert_close(zero_logits(logits, selection_ratio=0.5), torch.tensor([0, 1 / 3, 0, 2 / 3, 0]))


def test_zero_clamps_to_one_view_and_batches():
    logits = _views([1, 3], [2, 9])  # int(2 * 0.3) == 0 -> the single sharpest view decides
    torch.testing.assert_close(zero_logits(logits), torch.tensor([0, 0, 0, 1.0, 0]))
    batch = torch.randn(4, 12, 7, generator=torch.Generator().manual_seed(0)) * 3
    stacked = torch.stack([zero_logits(b) for b in batch])
    torch.testing.assert_close(zero_logits(batch), stacked)
    assert torch.allclose(stacked.sum(-1), torch.ones(4))


@pytest.mark.parametrize("bad, name", [
    (dict(selection_ratio=0.0), "selection_ratio"), (dict(view_logits=torch.zeros(5)), "view_logits")])
def test_zero_invalid_arguments(bad, name):
    args = dict(view_logits=torch.zeros(4, 3))
    args.update(bad)
    with pytest.raises(ValueError, match=name):
        zero_logits(**args)


@pytest.fixture(scope="module", params=[False, True], ids=["CLIP", "CustomTextCLIP"])
def tiny_model(request, tmp_path_factory):
    """A random-init open_clip model small enough for CPU tests, registered from a JSON config."""
    name = "tiny-tpt-custom" if request.param else "tiny-tpt"
    config = {
        "embed_dim": 32,
        "custom_text": request.param,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    path = tmp_path_factory.mktemp("models") / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(name)
    model.eval()
    assert hasattr(model, "text") == request.param
    return model, open_clip.get_tokenizer(name)


def _image_feats(views: int = 10) -> torch.Tensor:
    return F.normalize(torch.randn(views, 32, generator=torch.Generator().manual_seed(1)), dim=-1)


def test_tpt_without_steps_is_plain_zero_shot(tiny_model):
    model, tokenizer = tiny_model
    feats = _image_feats()
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]),
                                 normalize=True)
    expected = 50.0 * feats[0] @ text.T
    got = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=50.0, steps=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tpt_step_changes_logits_but_not_the_model(tiny_model):
    model, tokenizer = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    feats = _image_feats()
    plain = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=50.0, steps=0)
    tuned = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=50.0, steps=1)
    assert tuned.shape == (len(CLASSES),) and torch.isfinite(tuned).all()
    assert (tuned - plain).abs().max() > 1e-4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_tpt_under_inference_mode(tiny_model):
    model, tokenizer = tiny_model
    with torch.inference_mode():
        feats = _image_feats()
        got = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=50.0, steps=2)
    expected = tpt_logits(model, tokenizer, CLASSES, _image_feats(), logit_scale=50.0, steps=2)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("class_chunk", [1, 2, 3])
def test_tpt_chunked_over_classes_equals_all_at_once(tiny_model, class_chunk):
    """Chunking the text tower bounds memory but must not change the gradient or the answer.

    Compared in float64: in float32 the two summation orders differ by ~1e-5 relative, by an
    amount that depends on the CPU, while the adaptation itself moves the logits by ~18."""
    model, tokenizer = tiny_model
    model, feats = copy.deepcopy(model).double(), _image_feats().double()
    assert len(CLASSES) > class_chunk
    whole = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=50.0, steps=2, class_chunk=None)
    chunked = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=50.0, steps=2, class_chunk=class_chunk)
    plain = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=50.0, steps=0)
    assert whole.dtype == torch.float64 and (whole - plain).abs().max() > 1.0
    torch.testing.assert_close(chunked, whole, atol=1e-9, rtol=1e-9)


def test_tpt_rejects_unsupported_text_towers():
    with pytest.raises(ValueError, match="text towers"):
        tpt_logits(torch.nn.Linear(2, 2), lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
                   CLASSES, _image_feats(), logit_scale=50.0)


@pytest.mark.parametrize("bad, name", [
    (dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(selection_ratio=2.0), "selection_ratio"),
    (dict(n_ctx=3), "n_ctx"), (dict(logit_scale=float("nan")), "logit_scale"),
    (dict(class_chunk=0), "class_chunk"),
])
def test_tpt_invalid_arguments(tiny_model, bad, name):
    model, tokenizer = tiny_model
    args = dict(logit_scale=50.0)
    args.update(bad)
    with pytest.raises(ValueError, match=name):
        tpt_logits(model, tokenizer, CLASSES, _image_feats(), **args)


def test_tpt_one_step_equals_a_plain_autograd_reference(tiny_model):
    """TPT as the paper writes it, spelled out here with autograd: the context of "a photo of a" tuned by one
    AdamW step on the marginal entropy of the LOWEST-entropy views (selected by a plain numpy sort), then
    view 0 scored under the tuned prompts. Selecting other views, or another optimiser, changes the answer."""
    import numpy as np

    from adaptclip.adapt.peers import _TextTower

    model, tokenizer = tiny_model
    feats = _image_feats(12)
    scale, lr, ratio = 50.0, 5e-2, 0.25
    got = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=scale, steps=1, lr=lr, selection_ratio=ratio)

    tower = _TextTower(model)
    ids = tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    with torch.no_grad():
        emb = tower.token_embeddings(ids)
    ctx = emb[0, 1:5].clone().requires_grad_(True)
    opt = torch.optim.AdamW([ctx], lr=lr)

    def class_weights() -> torch.Tensor:
        prompts = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(CLASSES), -1, -1), emb[:, 5:]], dim=1)
        return F.normalize(tower.encode(prompts, ids), dim=-1)

    logits = scale * feats @ class_weights().T
    p = logits.detach().softmax(-1).numpy().astype(np.float64)
    entropy = -(p * np.log(p)).sum(-1)
    keep = np.argsort(entropy, kind="stable")[:int(12 * ratio)]
    assert len(set(keep.tolist()) & set(np.argsort(-entropy, kind="stable")[:3].tolist())) == 0  # not the top ones
    mean_p = logits[torch.from_numpy(keep)].softmax(-1).mean(0)
    loss = -(mean_p * mean_p.log()).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        expected = scale * feats[0] @ class_weights().T
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    plain = tpt_logits(model, tokenizer, CLASSES, feats, logit_scale=scale, steps=0)
    assert (got - plain).abs().max() > 1e-3  # the step moved something measurable
