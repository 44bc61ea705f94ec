"""The two quantities every view-based method shares: which views are confident, and the marginal entropy.

GS-Bias, ZERO and TPT all rank views by the entropy of their softmax and keep the most confident
fraction (the official `int(V * ratio)`, clamped to at least one view, where the official code
breaks at 0), and GS-Bias and TPT both minimise the entropy of the kept views' mean softmax
(the official `avg_entropy`, in log-sum-exp form with its finfo.min clamp). One implementation
of each lives here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def view_entropy(logits: Tensor) -> Tensor:
    """Softmax entropy of each row of `logits` [..., V, C] -> [..., V]."""
    return -(torch.softmax(logits, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(-1)


def normalized_entropy(logits: Tensor) -> float:
    """Entropy of softmax(logits) [C] divided by log(C): 0 = certain, 1 = uniform."""
    if logits.shape[-1] < 2:
        return 0.0
    return float(view_entropy(logits.float()) / math.log(logits.shape[-1]))


def kept_count(n_views: int, ratio: float) -> int:
    """How many confident views a selection keeps: official `int(V * ratio)`, at least one."""
    return max(1, int(n_views * ratio))


def confident_order(logits: Tensor) -> Tensor:
    """View indices [..., V] by increasing entropy; a stable sort, so ties go to the lower index."""
    return torch.argsort(view_entropy(logits), dim=-1, stable=True)


def confident_views(logits: Tensor, ratio: float) -> Tensor:
    """Indices [..., k] of the k = kept_count(V, ratio) lowest-entropy views, most confident first."""
    return confident_order(logits)[..., :kept_count(logits.shape[-2], ratio)]


def log_marginal(log_p: Tensor) -> Tensor:
    """log of the mean softmax over rows, from their log-softmax [..., N, C] -> [..., C] (clamped at finfo.min)."""
    log_p_bar = torch.logsumexp(log_p, dim=-2) - math.log(log_p.shape[-2])
    return log_p_bar.clamp(min=torch.finfo(log_p_bar.dtype).min)


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax of the rows of `logits` [..., N, C] -> [...]; differentiable (TPT)."""
    log_p_bar = log_marginal(torch.log_softmax(logits, dim=-1))
    return -(log_p_bar.exp() * log_p_bar).sum(dim=-1)


def marginal_entropy_and_grad(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Marginal entropy of `logits` [..., N, C] and its gradient w.r.t. a bias [..., C] added to every
    row, in closed form (GS-Bias needs no autograd):
    dH/db_j = mean_v p_vj * (sum_c p_vc log p̄_c - log p̄_j). Returns (H [...], grad [..., C])."""
    if logits.ndim < 2 or logits.shape[-2] == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., N, C] with N, C >= 1, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    log_p_bar = log_marginal(log_p)
    entropy = -(log_p_bar.exp() * log_p_bar).sum(dim=-1)
    cross = (p * log_p_bar.unsqueeze(-2)).sum(dim=-1, keepdim=True)  # sum_c p_vc log p̄_c
    grad = (p * (cross - log_p_bar.unsqueeze(-2))).mean(dim=-2)
    return entropy, grad
