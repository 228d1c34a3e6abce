"""Choosing among candidate directions: per-layer separability and Arditi-style selection.

Separability (ROC AUC of projections) is free once activations exist, so it is the first
filter; Arditi et al.'s selection adds three causal checks on validation prompts (bypass,
induce, KL) and is the baseline the steering pipeline compares against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusalkit.geometry import auc
from refusalkit.interventions import Profile, ablation, addition
from refusalkit.models import LoadedModel
from refusalkit.scoring import kl_divergence, last_logprobs, refusal_log_odds, refusal_token_ids


def layer_auc(pos: torch.Tensor, neg: torch.Tensor, directions: torch.Tensor) -> list[float]:
    """AUC of projections on each layer's direction: pos/neg [n, L, d], directions [L, d]."""
    return [auc(pos[:, i] @ directions[i], neg[:, i] @ directions[i])
            for i in range(directions.shape[0])]


def depth_window(n_layers: int, lo: float = 0.3, hi: float = 0.8) -> list[int]:
    """Candidate layers between two fractions of depth (the last ~20 % rarely steer well)."""
    return [i for i in range(n_layers) if lo * n_layers <= i < hi * n_layers]


def select_by_auc(aucs: Sequence[float], layers: Sequence[int],
                  allowed: Sequence[int] | None = None) -> int:
    """The allowed layer with the highest AUC; ties go to the deeper layer."""
    best = max((a, layer) for a, layer in zip(aucs, layers, strict=True)
               if allowed is None or layer in allowed)
    return best[1]


@dataclass(frozen=True)
class Candidate:
    layer: int
    bypass: float  # mean refusal log-odds on harmful prompts with the direction ablated
    induce: float  # mean refusal log-odds on harmless prompts with it added at its layer
    kl: float  # mean next-token KL on harmless prompts under ablation
    kept: bool


def arditi_select(
    lm: LoadedModel,
    directions: dict[int, torch.Tensor],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    raw_norms: dict[int, float] | None = None,
    kl_max: float = 0.1,
    batch_size: int = 16,
) -> tuple[int | None, list[Candidate]]:
    """Arditi et al.'s selection over candidate layers (METHODS.md §3).

    Drops candidates with KL > kl_max, induce score < 0 or a layer in the last 20 %; returns
    the lowest-bypass survivor (None if none survive) and every candidate's scores.
    """
    ids = refusal_token_ids(lm)
    base_harmless = last_logprobs(lm, harmless, batch_size=batch_size)
    all_layers = list(range(lm.n_layers))
    out: list[Candidate] = []
    for layer, vec in sorted(directions.items()):
        abl = Profile((ablation(vec, all_layers),))
        bypass = refusal_log_odds(last_logprobs(lm, harmful, profile=abl,
                                                batch_size=batch_size), ids).mean()
        abl_harmless = last_logprobs(lm, harmless, profile=abl, batch_size=batch_size)
        kl = kl_divergence(base_harmless, abl_harmless).mean()
        strength = (raw_norms or {}).get(layer, 1.0)
        add = Profile((addition({layer: vec}, strength),))
        induce = refusal_log_odds(last_logprobs(lm, harmless, profile=add,
                                                batch_size=batch_size), ids).mean()
        kept = kl <= kl_max and induce >= 0 and layer < 0.8 * lm.n_layers
        out.append(Candidate(layer, float(bypass), float(induce), float(kl), bool(kept)))
    survivors = [c for c in out if c.kept]
    best = min(survivors, key=lambda c: c.bypass).layer if survivors else None
    return best, out
