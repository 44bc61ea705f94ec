"""Calibration images for post-training quantisation: SPDFQ synthesis, and two baselines.

SPDFQ (SARDFQ, arXiv 2412.16553) synthesises calibration images from the full-precision model
itself, so no user data is needed. Starting from Gaussian noise, Adam optimises the pixels against
three terms plus 0.05 total variation:

- APA: the CLS-to-patch attention of the later half of the blocks is pulled (MSE, weighted by
  depth l/L) towards random Gaussian-mixture priors over the patch grid, one per image and head;
- MSR: 1..4 non-overlapping regions of each image are cropped, resized to the input size and pushed
  towards their own target class (the crop means gradients reach only that region); one region
  per image is optimised at each iteration, drawn afresh, to keep a step at twice a plain one;
- SL: targets are soft labels, softmax of logits whose chosen class is drawn from U(5, 10).

A CLIP image tower has no classifier head: the zero-shot text classifier of a label set plays it.
Images live in the model's normalised pixel space (what the encoder sees after preprocessing).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from adaptclip.adapt.data import IMAGE_SUFFIXES
from adaptclip.adapt.images import to_rgb
from adaptclip.compression.tokens import cls_attention_heads


@dataclass
class SynthesisConfig:
    """Knobs of the synthesis; defaults follow the paper (and PSAQ-ViT's optimiser)."""

    n: int = 32
    iters: int = 500
    seed: int = 0
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    apa_weight: float = 1.0  # a1 in the paper
    prior_components: int = 5
    tv_weight: float = 0.05
    max_regions: int = 4
    soft_range: tuple[float, float] = (5.0, 10.0)
    batch_size: int = 32
    progress: bool = True


def _blocks(visual: nn.Module) -> list[nn.Module]:
    blocks = list(getattr(getattr(visual, "transformer", None), "resblocks", []))
    if not blocks or not all(hasattr(b, "ln_1") and hasattr(b.attn, "in_proj_weight")
                             and not getattr(b.attn, "scaled_cosine", False) for b in blocks):
        raise ValueError(f"{type(visual).__name__} is not an open_clip ViT tower with in-projection attention; "
                         f"SPDFQ's attention priors need one")
    return blocks


def _heads(block: nn.Module) -> int:
    return int(block.attn.num_heads)


def cls_patch_attention(block: nn.Module, x: Tensor) -> Tensor:
    """CLS-to-patch attention [N, H, P] of one block from its ln_1 output x [N, L, D] (batch first).

    open_clip's fused attention returns no weights, so the CLS row is recomputed (the token
    compressor's explicit form); the CLS self-weight is dropped and the rest renormalised.
    """
    probs = cls_attention_heads(block, x)[..., 1:]
    return probs / probs.sum(-1, keepdim=True)


class AttentionRecorder:
    """Hooks ln_1 of the chosen blocks and recomputes their CLS attention after each forward."""

    def __init__(self, visual: nn.Module, layers: Sequence[int]) -> None:
        self.blocks = _blocks(visual)
        self.layers = list(layers)
        self._inputs: dict[int, Tensor] = {}
        self._handles = [self.blocks[i].ln_1.register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, index: int):
        def hook(_module: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
            batch_first = getattr(self.blocks[index].attn, "batch_first", True)
            self._inputs[index] = out if batch_first else out.transpose(0, 1)
        return hook

    def attentions(self) -> dict[int, Tensor]:
        """{layer: [N, H, P]} for the last forward."""
        return {i: cls_patch_attention(self.blocks[i], self._inputs[i]) for i in self.layers}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def later_half(num_layers: int) -> list[int]:
    """Indices (0-based) of the later half of the blocks, where APA applies."""
    return list(range(num_layers // 2, num_layers))


def gaussian_mixture_priors(n: int, heads: int, grid: tuple[int, int], components: int,
                            generator: torch.Generator) -> Tensor:
    """[n, heads, P] random attention priors: a K-component Gaussian mixture over the patch grid.

    Means are uniform over the grid, standard deviations 5..25 % of its side, mixture weights
    uniform then normalised; each prior is normalised to sum 1 over the P patches.
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1)  # [P, 2]
    shape = (n, heads, components)
    mu = torch.rand(*shape, 2, generator=generator) * torch.tensor([gh - 1, gw - 1], dtype=torch.float32)
    sigma = (0.05 + 0.2 * torch.rand(*shape, 1, generator=generator)) * max(gh, gw)
    weight = torch.rand(*shape, generator=generator) + 0.1
    d2 = ((pos[None, None, None] - mu[..., None, :]) ** 2).sum(-1)  # [n, heads, K, P]
    dens = (weight / weight.sum(-1, keepdim=True))[..., None] * torch.exp(-0.5 * d2 / sigma ** 2)
    prior = dens.sum(2)
    return prior / prior.sum(-1, keepdim=True)


def apa_loss(attn: dict[int, Tensor], priors: dict[int, Tensor], num_layers: int) -> Tensor:
    """Depth-weighted MSE between CLS attention and its priors; both scaled by P so uniform = 1."""
    total = torch.zeros(())
    for layer, a in attn.items():
        p = a.shape[-1]
        total = total + (layer + 1) / num_layers * F.mse_loss(a * p, priors[layer] * p)
    return total


def soft_labels(targets: Tensor, num_classes: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """[N, C] soft targets: softmax of logits that are 0 except the target's, drawn from U(low, high)."""
    logits = torch.zeros(len(targets), num_classes)
    logits[torch.arange(len(targets)), targets] = low + (high - low) * torch.rand(len(targets), generator=generator)
    return logits.softmax(-1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV), independent of image size."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@dataclass
class Region:
    """One MSR region of one image: pixel box (top, left, size) and its own soft target."""

    image: int
    top: int
    left: int
    size: int
    target: Tensor


def sample_regions(n: int, image_size: int, max_regions: int, num_classes: int, image_targets: Tensor,
                   soft_range: tuple[float, float], generator: torch.Generator) -> list[Region]:
    """1..max_regions non-overlapping square regions per image, one per distinct quadrant.

    Each region is 1/4 to 1/2 of the image side, placed at random inside its quadrant (so regions
    never overlap), with a target class other than the image's own when there is one.
    """
    half = image_size // 2
    regions: list[Region] = []
    for i in range(n):
        k = int(torch.randint(1, max_regions + 1, (1,), generator=generator))
        for quad in torch.randperm(4, generator=generator)[:min(k, 4)].tolist():
            size = int(torch.randint(max(2, image_size // 4), half + 1, (1,), generator=generator))
            top = (quad // 2) * half + int(torch.randint(0, half - size + 1, (1,), generator=generator))
            left = (quad % 2) * half + int(torch.randint(0, half - size + 1, (1,), generator=generator))
            choices = [c for c in range(num_classes) if c != int(image_targets[i])] or [int(image_targets[i])]
            cls = torch.tensor([choices[int(torch.randint(len(choices), (1,), generator=generator))]])
            regions.append(Region(i, top, left, size, soft_labels(cls, num_classes, *soft_range, generator)[0]))
    return regions


def _one_per_image(regions: Sequence[Region], gen: torch.Generator) -> list[Region]:
    """One region of each image, drawn afresh every iteration: every region is optimised in turn at
    twice the cost of a plain step, instead of up to five times."""
    by_image: dict[int, list[Region]] = {}
    for r in regions:
        by_image.setdefault(r.image, []).append(r)
    return [rs[int(torch.randint(len(rs), (1,), generator=gen))] for rs in by_image.values()]


def crop_regions(images: Tensor, regions: Sequence[Region], image_size: int) -> Tensor:
    """Each region cropped from its image and resized (bilinear, differentiable) to the input size."""
    crops = [images[r.image:r.image + 1, :, r.top:r.top + r.size, r.left:r.left + r.size] for r in regions]
    return torch.cat([F.interpolate(c, size=(image_size, image_size), mode="bilinear", align_corners=False)
                      for c in crops])


class Synthesiser:
    """SPDFQ synthesis against one open_clip model and one zero-shot classifier [C, D]."""

    def __init__(self, model: nn.Module, classifier: Tensor, logit_scale: float, mean: Sequence[float],
                 std: Sequence[float], image_size: int, cfg: SynthesisConfig) -> None:
        self.visual = model.visual
        self.classifier = F.normalize(classifier.float(), dim=-1)
        self.scale = float(logit_scale)
        self.image_size = image_size
        self.cfg = cfg
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.low, self.high = (0 - mean_t) / std_t, (1 - mean_t) / std_t  # valid pixel range, normalised
        self.num_layers = len(_blocks(self.visual))
        grid = getattr(self.visual, "grid_size", None)
        if grid is None:
            raise ValueError("the vision tower has no patch grid (grid_size); SPDFQ needs a ViT")
        self.grid = (int(grid[0]), int(grid[1]))
        self.heads = _heads(_blocks(self.visual)[0])

    def logits(self, images: Tensor) -> Tensor:
        return self.scale * F.normalize(self.visual(images), dim=-1) @ self.classifier.T

    def losses(self, images: Tensor, recorder: AttentionRecorder, priors: dict[int, Tensor], targets: Tensor,
               regions: Sequence[Region]) -> dict[str, Tensor]:
        """Every term of the objective for one batch (unweighted), for logging and testing."""
        out = {"sl": soft_cross_entropy(self.logits(images), targets)}
        # The recorder holds the last forward's ln_1 outputs: read them before the crops' forward.
        out["apa"] = apa_loss(recorder.attentions(), priors, self.num_layers)
        if regions:
            crop_logits = self.logits(crop_regions(images, regions, self.image_size))
            out["msr"] = soft_cross_entropy(crop_logits, torch.stack([r.target for r in regions]))
        else:
            out["msr"] = torch.zeros(())
        out["tv"] = total_variation(images)
        return out

    def objective(self, terms: dict[str, Tensor]) -> Tensor:
        return self.cfg.apa_weight * terms["apa"] + terms["sl"] + terms["msr"] + self.cfg.tv_weight * terms["tv"]

    def _batch(self, n: int, gen: torch.Generator, bar: tqdm | None) -> tuple[Tensor, list[dict[str, float]]]:
        cfg, classes = self.cfg, self.classifier.shape[0]
        size = self.image_size
        images = torch.randn(n, 3, size, size, generator=gen).clamp_(self.low, self.high).requires_grad_(True)
        hard = torch.randint(classes, (n,), generator=gen)
        targets = soft_labels(hard, classes, *cfg.soft_range, gen)
        regions = sample_regions(n, size, cfg.max_regions, classes, hard, cfg.soft_range, gen) if cfg.max_regions else []
        layers = later_half(self.num_layers)
        priors = {layer: gaussian_mixture_priors(n, self.heads, self.grid, cfg.prior_components, gen) for layer in layers}
        opt = torch.optim.Adam([images], lr=cfg.lr, betas=cfg.betas)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.iters, 1))
        recorder = AttentionRecorder(self.visual, layers)
        history: list[dict[str, float]] = []
        try:
            for _ in range(cfg.iters):
                opt.zero_grad(set_to_none=True)
                terms = self.losses(images, recorder, priors, targets, _one_per_image(regions, gen))
                self.objective(terms).backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    images.copy_(torch.maximum(torch.minimum(images, self.high), self.low))
                history.append({k: float(v.detach()) for k, v in terms.items()})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
        finally:
            recorder.close()
        return images.detach(), history

    def run(self) -> tuple[Tensor, list[dict[str, float]]]:
        """[n, 3, S, S] synthetic images (normalised pixel space) and the per-iteration loss terms."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        requires = [p.requires_grad for p in self.visual.parameters()]
        self.visual.requires_grad_(False)
        batches, history = [], []
        total = math.ceil(cfg.n / cfg.batch_size) * cfg.iters
        bar = tqdm(total=total, desc="SPDFQ synthesis", unit="it", disable=not cfg.progress)
        try:
            with torch.enable_grad():
                for start in range(0, cfg.n, cfg.batch_size):
                    images, hist = self._batch(min(cfg.batch_size, cfg.n - start), gen, bar)
                    batches.append(images)
                    history.extend(hist)
        finally:
            bar.close()
            for p, r in zip(self.visual.parameters(), requires):
                p.requires_grad_(r)
        return torch.cat(batches), history


def synthesize(model: nn.Module, classifier: Tensor, logit_scale: float, mean: Sequence[float],
               std: Sequence[float], image_size: int, cfg: SynthesisConfig | None = None) -> Tensor:
    """SPDFQ calibration images [n, 3, S, S] in the model's normalised pixel space."""
    return Synthesiser(model, classifier, logit_scale, mean, std, image_size, cfg or SynthesisConfig()).run()[0]


def gaussian_images(n: int, image_size: int, seed: int = 0) -> Tensor:
    """The noise baseline: standard Gaussian pixels in normalised space (PSAQ-ViT's 'noise' mode)."""
    return torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def list_images(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration image folder not found: {folder}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def real_images(folder: str | Path, preprocess, n: int, seed: int = 0) -> Tensor:
    """The real-data baseline: n images sampled (by seed) from a folder tree, through the model's transform."""
    from PIL import Image

    files = list_images(folder)
    picked = random.Random(seed).sample(files, min(n, len(files)))
    return torch.stack([preprocess(to_rgb(Image.open(p))) for p in picked])
