"""Which implementation a served model runs for each hot path: its `kernels` setting resolved at load.

Why a check at all: a Triton kernel compiles on first use, for the GPU at hand, with the Triton at
hand; either may differ from where it was tested. So each kernel the model would run is called once at
load on a small probe (at the model's own sizes, which also compiles the shapes requests use most) and
compared with its torch reference. A kernel that raises or disagrees runs torch instead, with a logged
warning and a note in GetModelInfo; the model serves either way.

- views: ViewGenerator, AugMix off, a few seeded views of a random image (within PIXEL_TOL).
- gs_bias: GS-Bias on random unit features at the model's default views, patches and settings
  (logits and biases within GS_BIAS_TOL, same steps).
- tokens: the model's token compressor on a random batch (same kept patches, pooled features within
  rounding of the model's precision).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from adaptclip.adapt.encoder import EncoderModel
from adaptclip.adapt.gsbias import gs_bias
from adaptclip.adapt.views import ViewGenerator
from adaptclip.kernels.backend import KernelBackends, check_backend, resolve, unavailable

log = logging.getLogger(__name__)
PIXEL_TOL = 1e-3  # views, in [0, 1] pixel units
GS_BIAS_TOL = 1e-4  # GS-Bias logits and biases, fp32
PROBE_VIEWS = 4
PROBE_CLASSES = 10


class KernelMismatch(RuntimeError):
    """A kernel ran but its result differs from the torch reference's."""


def _probe(*shape: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def check_views(model: EncoderModel) -> None:
    """The view kernel against ViewGenerator's torch path, same seed (boxes smaller and larger than S)."""
    size, device = model.image_size, model.device
    image = torch.rand(3, size + 7, 2 * size + 3, generator=torch.Generator().manual_seed(0)).to(device)
    base = torch.zeros(1, 3, size, size, device=device)
    views = [ViewGenerator(size, model.mean, model.std, crop_scale=(0.05, 1.0), augmix=False, backend=backend)(
        [image], base, PROBE_VIEWS + 1, seed=0) for backend in ("torch", "triton")]
    std = torch.tensor(model.std, device=device).view(3, 1, 1)
    err = float(((views[1] - views[0]).abs() * std).max())
    if not err <= PIXEL_TOL:
        raise KernelMismatch(f"views differ from torch by {err:.2e} in [0, 1] pixel units (> {PIXEL_TOL:g})")


def check_gs_bias(model: EncoderModel) -> None:
    """The fused GS-Bias against the torch loop at the model's defaults (views, top-K, steps, ratios)."""
    s, device, dim = model.adapt_defaults, model.device, model.embed_dim
    n_patches = getattr(model.compressor, "n_patches", 0) or 16
    feats = F.normalize(_probe(s.views, dim, device=device), dim=-1)
    patches = F.normalize(_probe(n_patches, dim, device=device, seed=1), dim=-1) if model.has_patches else None
    classifier = F.normalize(_probe(PROBE_CLASSES, dim, device=device, seed=2), dim=-1)
    kwargs = dict(logit_scale=model.logit_scale, selection_ratio=s.ratio, steps=max(s.steps, 1), alpha=s.alpha,
                  beta=s.beta, top_k_patches=s.spatial_top_k)
    want, got = (gs_bias(feats, patches, classifier, backend=backend, **kwargs) for backend in ("torch", "triton"))
    for name in ("logits", "global_bias", "spatial_bias"):
        a, b = getattr(got, name), getattr(want, name)
        if not torch.allclose(a.float(), b.float(), rtol=GS_BIAS_TOL, atol=GS_BIAS_TOL):
            raise KernelMismatch(f"GS-Bias {name} differ from torch by {float((a - b).abs().max()):.2e}")
    if not torch.equal(got.steps_run.cpu(), want.steps_run.cpu()):
        raise KernelMismatch("GS-Bias ran a different number of steps than torch")


def check_tokens(model: EncoderModel) -> None:
    """The token-selection kernels inside the model's compressor against its torch path."""
    torch_path = model.compressor
    dtype = torch_path.input_dtype
    images = _probe(2, 3, *torch_path.visual.image_size, device=model.device).to(dtype)
    keep = model.keep_rate if model.keep_rate < 1.0 else 0.5
    kernel_path = copy.copy(torch_path)
    kernel_path.backend = "triton"
    want, got = (c.encode(images, keep, with_patches=True) for c in (torch_path, kernel_path))
    if not torch.equal(got.patch_index, want.patch_index):
        raise KernelMismatch("token selection kept other patches than torch")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    ref = want.pooled.float()
    if not torch.allclose(got.pooled.float(), ref, rtol=tol, atol=tol * float(ref.abs().max())):
        raise KernelMismatch(f"token-compressed features differ from torch by "
                             f"{float((got.pooled.float() - ref).abs().max()):.2e}")


CHECKS: dict[str, Callable[[EncoderModel], None]] = {"views": check_views, "gs_bias": check_gs_bias,
                                                     "tokens": check_tokens}


def choose_kernels(model: EncoderModel, requested: str) -> KernelBackends:
    """Resolve `requested` (auto | torch | triton, ValueError otherwise) for `model` on its device.

    Every kernel that would run is checked (CHECKS); each failure logs a warning and leaves that op on
    torch. Sets the model's token compressor's backend to what its check allowed.
    """
    check_backend(requested, "kernels")
    tokens = "torch" if model.compressor is not None else "none"
    if resolve(requested, model.device) == "torch":
        return KernelBackends(requested, tokens=tokens)
    if why := unavailable(model.device):
        log.warning("model %s: kernels: triton asked, but %s; running torch", model.name, why)
        return KernelBackends(requested, tokens=tokens, notes=(why,))
    chosen, notes = {}, []
    for op, check in CHECKS.items():
        if op == "tokens" and model.compressor is None:
            chosen[op] = "none"
            continue
        try:
            check(model)
            chosen[op] = "triton"
        except Exception as exc:  # noqa: BLE001 - a kernel must never keep the model from serving
            note = f"{op}: the Triton kernel failed its warm-up check ({type(exc).__name__}: {exc}); running torch"
            log.warning("model %s: %s", model.name, note)
            chosen[op] = "torch"
            notes.append(note)
    if model.compressor is not None:
        model.compressor.backend = chosen["tokens"]
    return KernelBackends(requested, notes=tuple(notes), **chosen)
