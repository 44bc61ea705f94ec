"""Classify through gRPC must answer exactly as open_clip's own pipeline does."""
from __future__ import annotations

import io

import open_clip
import pytest
import torch
from PIL import Image

from conftest import LABELS, TINY_NAME, make_image

TEMPLATES = ["a photo of a {}.", "a picture of the {}.", "art of a {}."]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """open_clip used directly, as its README does."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, pretrained=str(tiny_checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    with torch.no_grad():
        weights = []
        for label in LABELS:
            emb = model.encode_text(tokenizer([t.format(label) for t in TEMPLATES]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            weights.append(mean / mean.norm())
        classifier = torch.stack(weights)

    def logits(data: bytes) -> torch.Tensor:
        with torch.no_grad():
            feats = model.encode_image(preprocess(Image.open(io.BytesIO(data))).unsqueeze(0))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            return (model.logit_scale.exp() * feats @ classifier.T)[0]

    return logits


@pytest.mark.parametrize("seed,size,fmt", [(1, (48, 40), "PNG"), (2, (32, 32), "JPEG"), (3, (100, 37), "WEBP"),
                                            (4, (20, 64), "BMP"), (5, (300, 200), "JPEG")])
def test_classify_matches_open_clip(client, reference, seed, size, fmt):
    data = make_image(seed, size, fmt)
    resp = client.classify(data, labels=LABELS, templates=TEMPLATES, top_k=len(LABELS))
    expected = reference(data)
    got = torch.tensor([s.logit for s in resp.top])
    order = [s.index for s in resp.top]
    assert [s.label for s in resp.top] == [LABELS[i] for i in order]
    assert order == torch.argsort(expected, descending=True).tolist()
    assert (got - expected[order]).abs().max().item() <= 1e-4
    probs = torch.tensor([s.probability for s in resp.top])
    assert torch.allclose(probs, expected.softmax(-1)[order], atol=1e-5)


def test_default_templates_are_open_clips(client):
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    ref = client.register_label_set(LABELS)
    assert ref.num_templates == len(SIMPLE_IMAGENET_TEMPLATES)
    resp = client.classify(make_image(9), labels=LABELS, top_k=3)
    assert resp.label_set_id == ref.label_set_id


def test_embed_matches_open_clip(client, tiny_checkpoint):
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, pretrained=str(tiny_checkpoint))
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    data = [make_image(11), make_image(12, (64, 64), "JPEG")]
    resp = client.embed(images=data, texts=["a cat", "a dog"], normalize=True)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(d))) for d in data]), normalize=True)
        txt = model.encode_text(tokenizer(["a cat", "a dog"]), normalize=True)
    assert resp.dim == 32
    assert torch.allclose(torch.tensor([list(e.values) for e in resp.image_embeddings]), img, atol=1e-5)
    assert torch.allclose(torch.tensor([list(e.values) for e in resp.text_embeddings]), txt, atol=1e-5)
    raw = client.embed(texts=["a cat"], normalize=False)
    assert abs(torch.tensor(raw.text_embeddings[0].values).norm().item() - 1.0) > 1e-3
