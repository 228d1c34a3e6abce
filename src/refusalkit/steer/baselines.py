"""Choosing among candidate directions: per-layer separability and Arditi-style selection.

Separability (ROC AUC of projections) is free once activations exist, so it is the first
filter; Arditi et al.'s selection adds three causal checks on validation prompts (bypass,
induce, KL) and is the baseline the steering pipeline compares against.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from refusalkit.directions import mean_difference, per_layer
from refusalkit.errors import UserError
from refusalkit.geometry import depth_window
from refusalkit.interventions import Profile, ablation, addition
from refusalkit.judge.protocol import THRESHOLD
from refusalkit.models import LoadedModel
from refusalkit.scoring import kl_divergence, last_logprobs, refusal_log_odds, refusal_token_ids
from refusalkit.steer.data import Splits


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


# ---------------------------------------------------------------- the Arditi baseline

def arditi_baseline(lm: LoadedModel, acts: dict[str, Any], splits: Splits,
                    base: dict[str, Any], seed: int) -> dict[str, Any]:
    """Arditi et al.: harmful-vs-harmless MD per layer, picked by bypass/induce/KL."""
    refused = torch.tensor([r["confidence"] > THRESHOLD for r in base["safety_fit"]])
    answered = torch.tensor([r["confidence"] < -THRESHOLD for r in base["neutral"]])
    if refused.sum() < 2 or answered.sum() < 2:
        raise UserError("Arditi baseline needs refused harmful and answered neutral prompts")
    harmful, harmless = acts["safety_fit"][refused], acts["neutral"][answered]
    md = per_layer(mean_difference, harmful, harmless, normalize=False)
    cands = depth_window(lm.n_layers, 0.3, 0.8)[::2]
    dirs = {i: md[i] / md[i].norm() for i in cands}
    norms = {i: float(md[i].norm()) for i in cands}
    rng = random.Random(seed)
    h_val = rng.sample(list(splits.safety_fit), min(12, len(splits.safety_fit)))
    best, table = arditi_select(lm, dirs, h_val, splits.neutral_proxy[:12], raw_norms=norms)
    if best is None:
        best = min(table, key=lambda c: c.bypass).layer
    return {"layer": best, "direction": dirs[best].tolist(),
            "candidates": [asdict(c) for c in table]}


def arditi_profile(rec: dict[str, Any], lm: LoadedModel) -> Profile:
    return Profile((ablation(torch.tensor(rec["direction"]), list(range(lm.n_layers))),),
                   meta={"method": "arditi", "layer": rec["layer"]})
