"""The maths on one attention matrix: its softmax, normalised cumulative spectrum, rank needed
for a share of it, and effective rank."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

SHARE_GRID: tuple[float, ...] = tuple(round(0.5 + 0.01 * i, 2) for i in range(50)) + (0.995, 0.999)
"""Shares whose rank-needed is kept per sample, so recommendations at any of them need no re-run."""
MAX_CURVE_POINTS = 512
"""Above this many ranks, cumulative curves are kept at geometrically spaced ranks only."""



def normalised_cumulative(svals: torch.Tensor) -> torch.Tensor:
    """(..., m) singular values, descending -> (..., m) cumulative share c_r = sum_{i<=r} s_i / sum s."""
    svals = svals.clamp(min=0)
    cum = svals.cumsum(-1)
    return cum / cum[..., -1:].clamp(min=torch.finfo(cum.dtype).tiny)


def rank_needed(cumulative: torch.Tensor, shares: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Smallest r (1-based) with c_r >= share, for each share: (..., m) x (G,) -> (..., G) int64.

    A share is reached up to 1e-6 (fp32 cumulative sums of a rank-r matrix land at 1 - 1e-7)."""
    shares = torch.as_tensor(shares, dtype=cumulative.dtype, device=cumulative.device)
    target = (shares - 1e-6).expand(*cumulative.shape[:-1], shares.numel()).contiguous()
    idx = torch.searchsorted(cumulative.contiguous(), target)  # first index with c >= target
    return (idx + 1).clamp(max=cumulative.shape[-1])


def effective_rank(svals: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli's effective rank exp(H(s / sum s)): 1 for rank one, m for a flat spectrum."""
    p = svals.clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    entropy = -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum(-1)
    return entropy.exp()


def curve_ranks(m: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Ranks (1-based) at which a cumulative curve of m values is kept: all, or geometric when long."""
    if m <= max_points:
        return np.arange(1, m + 1)
    return np.unique(np.geomspace(1, m, max_points).round().astype(np.int64))



def attention_probabilities(q: torch.Tensor, k: torch.Tensor,
                            key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """P = softmax(Q K^T / sqrt(Dh)) in fp32: (..., L, Dh) x (..., L, Dh) -> (..., L, L).

    ``key_mask`` (..., L), True = real token, drops padded keys as the model's SDPA call does."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[..., None, :].bool(), float("-inf"))
    return torch.softmax(scores, dim=-1)
