"""The test-time-adaptation peers offered beside GS-Bias: ZERO (NeurIPS 2024) and TPT (NeurIPS 2022).

ZERO follows GitHub FarinaMatteo/zero (ttas/zero.py); TPT follows GitHub azshue/TPT
(tpt_classification.py, clip/custom_clip.py), on open_clip's text tower. Deviations are noted
at each function.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptclip.adapt.selection import confident_order, confident_views, kept_count, marginal_entropy


def _check_ratio(selection_ratio: float) -> None:
    if not (isinstance(selection_ratio, (int, float)) and not isinstance(selection_ratio, bool)
            and 0.0 < selection_ratio <= 1.0):
        raise ValueError(f"selection_ratio must be in (0, 1], got {selection_ratio!r}")


@torch.no_grad()
def zero_logits(view_logits: Tensor, selection_ratio: float = 0.3) -> Tensor:
    """ZERO: majority vote of the argmaxes of the most confident views; no optimisation.

    view_logits: [V, C] or [B, V, C], scaled (logit_scale * cosine), since views are ranked by
    the entropy of their softmax as in the official code. Keeps the `max(1, int(V * ratio))` lowest-entropy views
    and counts their argmax votes per class. Ties between the most-voted classes are broken
    greedily, as in the official code, by walking further views and taking the first whose
    argmax is a tied class; the winner gets one extra vote. Returns the votes divided by their
    total ([C] or [B, C]): a probability-like distribution whose argmax is ZERO's prediction
    (the official code returns the raw counts; only the scale differs).

    Deviation: the official walk is `l[k:]`, the *unsorted* views from index k on, and its
    fallback (`logit[~ties]` on an int tensor) indexes the wrong classes; here the walk is the
    discarded views by increasing entropy, then the kept ones, which always finds a tied class.
    Exact ties between logits within a view go to the lowest class index (argmax), where the
    official zero-temperature softmax would split the vote.
    """
    if view_logits.ndim not in (2, 3) or 0 in view_logits.shape:
        raise ValueError(f"view_logits must be [V, C] or [B, V, C], got {tuple(view_logits.shape)}")
    _check_ratio(selection_ratio)
    logits = view_logits if view_logits.ndim == 3 else view_logits.unsqueeze(0)
    order, k = confident_order(logits), kept_count(logits.shape[-2], selection_ratio)
    preds = torch.gather(logits.argmax(dim=-1), 1, order)  # [B, V] argmax per view, most confident first
    votes = F.one_hot(preds[:, :k], logits.shape[-1]).sum(dim=1).to(logits.dtype)  # [B, C]
    tied = votes == votes.amax(dim=-1, keepdim=True)
    walk = torch.cat([preds[:, k:], preds[:, :k]], dim=1)
    hits = torch.gather(tied, 1, walk)  # does this view vote for a tied class?
    winner = torch.gather(walk, 1, hits.int().argmax(dim=1, keepdim=True))  # first hit
    needs_break = (tied.sum(dim=-1, keepdim=True) > 1).to(votes.dtype)
    votes = votes.scatter_add(1, winner, needs_break)
    probs = votes / votes.sum(dim=-1, keepdim=True)
    return probs if view_logits.ndim == 3 else probs[0]


CLASS_CHUNK = 128  # prompts per text-tower pass with autograd (see tpt_logits)


class _TextTower:
    """The pieces of an open_clip text tower needed to encode prompt *embeddings*.

    Supports CLIP (tower on the model) and CustomTextCLIP with a plain TextTransformer, both
    with argmax (EOT) pooling; other towers (HF, CoCa's cls token, pad masks) raise ValueError.
    """

    def __init__(self, model: nn.Module) -> None:
        tower = model.text if hasattr(model, "text") else model
        pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final",
                  "text_projection", "attn_mask")
        if not all(hasattr(tower, name) for name in needed) or pool != "argmax" \
                or getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ValueError(f"TPT supports open_clip text towers with argmax pooling "
                             f"(CLIP / TextTransformer), not {type(tower).__name__}")
        self.tower = tower

    def token_embeddings(self, ids: Tensor) -> Tensor:
        return self.tower.token_embedding(ids)

    def encode(self, embeddings: Tensor, ids: Tensor) -> Tensor:
        """open_clip encode_text from token embeddings on: the EOT feature, projected."""
        tower = self.tower
        cast_dtype = tower.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        projection = tower.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def tpt_logits(model: nn.Module, tokenizer: Callable[[Sequence[str]], Tensor],
               classnames: Sequence[str], image_feats_views: Tensor, *, logit_scale: float,
               n_ctx: int = 4, ctx_init: str = "a photo of a", lr: float = 5e-3, steps: int = 1,
               selection_ratio: float = 0.1, class_chunk: int | None = CLASS_CHUNK,
               deadline: float | None = None) -> Tensor:
    """TPT: tune a shared prompt context on the views' marginal entropy, then score view 0.

    Prompts are "{ctx_init} {classname}." whose n_ctx context tokens (positions 1..n_ctx, after
    SOT) are replaced by a learnable context initialised from their own token embeddings. Each
    step: class embeddings through the text tower, logits `logit_scale * f W^T` for all views,
    marginal entropy of the `max(1, int(V * ratio))` lowest-entropy views (the selection is made
    at the first step and kept, as in the official code), one AdamW(lr) step on the context
    only. Returns [C] logits of view 0 under the tuned prompts; steps=0 gives plain zero-shot
    logits of the prompt. image_feats_views: [V, D] L2-normalised, view 0 the original.

    The model is never modified: its parameters are only read and gradients are taken w.r.t.
    the context alone (torch.autograd.grad), so no parameter's .grad or requires_grad is
    touched. The model's train/eval mode is used as is (call it in eval mode).
    class_chunk bounds memory: with more classes than that, the text tower runs over at most
    class_chunk prompts at a time. The gradient stays exact: the class embeddings are computed
    without autograd, the loss's gradient w.r.t. them is taken, and each chunk is re-encoded with
    autograd and back-propagated with its slice of that gradient (one extra text-tower forward;
    all 1,000 ImageNet prompts at once need tens of GB). None = all classes at once, as the paper.
    Precision: the text tower runs in the model's dtype (open_clip's fp16/bf16 cast the prompt embeddings
    to it); the context, AdamW's state, the class embeddings after the tower, the logits and the entropy
    are fp32 whatever that dtype (float64 for a float64 model), so a half model tunes an fp32 context
    and nothing mixes dtypes.
    Deviations: the official code runs under fp16 autocast with a GradScaler (fp32 master context, as
    here, but half logits). The official code sets n_ctx to the word count of ctx_init; here ctx_init
    must tokenise to exactly n_ctx tokens. Past `deadline` (a time.monotonic() instant) the next step
    raises TimeoutError instead of running: a request whose caller gave up stops holding the tower.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an int >= 1, got {n_ctx!r}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    if not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be finite and > 0, got {logit_scale!r}")
    _check_ratio(selection_ratio)
    if not classnames:
        raise ValueError("classnames must not be empty")
    if class_chunk is not None and (isinstance(class_chunk, bool) or not isinstance(class_chunk, int)
                                    or class_chunk < 1):
        raise ValueError(f"class_chunk must be an int >= 1 or None, got {class_chunk!r}")
    if image_feats_views.ndim != 2 or image_feats_views.shape[0] < 1:
        raise ValueError(f"image_feats_views must be [V, D], got {tuple(image_feats_views.shape)}")
    tower = _TextTower(model)
    device = tower.tower.positional_embedding.device

    ctx_ids = tokenizer([ctx_init]).to(device)
    if int(ctx_ids[0].argmax()) - 1 != n_ctx:  # tokens between SOT and EOT
        raise ValueError(f"ctx_init {ctx_init!r} has {int(ctx_ids[0].argmax()) - 1} tokens, "
                         f"n_ctx is {n_ctx}")
    ids = tokenizer([f"{ctx_init} {name.replace('_', ' ')}." for name in classnames]).to(device)
    if not torch.equal(ids[:, 1:1 + n_ctx], ctx_ids[:, 1:1 + n_ctx].expand(len(classnames), -1)):
        raise ValueError("ctx_init tokens change when followed by a class name; pick another ctx_init")

    # Inputs may be inference tensors (server under torch.inference_mode): leave that mode.
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():  # the context, its optimiser state and the loss in at least fp32 (see the docstring)
            embeddings = tower.token_embeddings(ids)
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            embeddings = embeddings.to(dtype)
            feats = image_feats_views.to(device, dtype, copy=True)  # a copy: not an inference tensor
        ctx = nn.Parameter(embeddings[0, 1:1 + n_ctx].clone())
        optimizer = torch.optim.AdamW([ctx], lr=lr)  # torch default weight decay, as the official code

        chunks = [slice(lo, lo + (class_chunk or len(classnames))) for lo in
                  range(0, len(classnames), class_chunk or len(classnames))]

        def class_embeddings(part: slice = slice(None)) -> Tensor:
            emb = embeddings[part]
            prompts = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(emb.shape[0], -1, -1),
                                 emb[:, 1 + n_ctx:]], dim=1)
            return F.normalize(tower.encode(prompts, ids[part]).to(dtype), dim=-1)

        def all_class_embeddings() -> Tensor:
            with torch.no_grad():
                return torch.cat([class_embeddings(part) for part in chunks])

        selected = None
        for step in range(steps):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"deadline passed after {step} of {steps} TPT steps")
            weights = class_embeddings() if len(chunks) == 1 else all_class_embeddings().requires_grad_()
            logits = logit_scale * feats @ weights.T
            if selected is None:
                selected = confident_views(logits.detach(), selection_ratio)
            loss = marginal_entropy(logits[selected])
            if len(chunks) == 1:
                (ctx.grad,) = torch.autograd.grad(loss, [ctx])
            else:
                (grad_weights,) = torch.autograd.grad(loss, [weights])
                ctx.grad = sum(torch.autograd.grad(class_embeddings(part), [ctx], grad_weights[part])[0]
                               for part in chunks)
            optimizer.step()
        return logit_scale * feats[0] @ all_class_embeddings().T
