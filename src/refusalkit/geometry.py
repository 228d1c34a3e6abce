"""Small shared geometry: unit vectors, ROC AUC and where along the depth a direction separates.

Foundation for directions, interventions, gates, kernels, the judge's evaluation and both
pipelines; paper B's analysis geometry lives in analyze/geometry.py.
"""

from __future__ import annotations

import torch


def unit(v: torch.Tensor) -> torch.Tensor:
    """Normalise along the last axis (zero vectors stay zero)."""
    v = v.double()
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def auc(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> float:
    """Area under the ROC curve: P(score_pos > score_neg), ties counting one half."""
    p, n = pos_scores.double().flatten(), neg_scores.double().flatten()
    if len(p) == 0 or len(n) == 0:
        raise ValueError("AUC needs scores on both sides")
    diff = p[:, None] - n[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def layer_auc(pos: torch.Tensor, neg: torch.Tensor, directions: torch.Tensor) -> list[float]:
    """AUC of projections on each layer's direction: pos/neg [n, L, d], directions [L, d]."""
    return [auc(pos[:, i] @ directions[i], neg[:, i] @ directions[i])
            for i in range(directions.shape[0])]


def depth_window(n_layers: int, lo: float = 0.3, hi: float = 0.8) -> list[int]:
    """Candidate layers between two fractions of depth (the last ~20 % rarely steer well)."""
    return [i for i in range(n_layers) if lo * n_layers <= i < hi * n_layers]
