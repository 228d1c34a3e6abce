"""The steer run's prompt sets: seeded, disjoint lists for every role."""

from __future__ import annotations

from refusalkit.prompts import load_prompts
from refusalkit.steer.config import SteerConfig


def split_data(cfg: SteerConfig) -> dict[str, list[str]]:
    """Seeded, disjoint prompt lists for every role in the pipeline."""
    d, seed = cfg.data, cfg.seed
    fit, held = [], []
    for spec in d.target:
        ps = load_prompts(spec).take(d.max_target, seed=seed).prompts
        cut = max(1, round(len(ps) * d.target_eval_fraction))
        held += ps[:cut]
        fit += ps[cut:]
    safety = load_prompts(d.safety_fit).take(d.n_fit, seed=seed).prompts
    neutral_all = load_prompts(d.neutral).take(d.n_fit + d.n_proxy, seed=seed).prompts
    out = {
        "target_fit": fit, "target_eval": held, "safety_fit": safety,
        "neutral": neutral_all[: d.n_fit], "neutral_proxy": neutral_all[d.n_fit:],
        "safety_eval": load_prompts(d.safety_eval).take(d.n_eval, seed=seed).prompts,
        "harmless_eval": load_prompts(d.harmless_eval).take(d.n_eval, seed=seed).prompts,
        "kl_eval": load_prompts(d.harmless_eval).take(d.n_kl, seed=seed,
                                                      offset=d.n_eval).prompts,
    }
    for spec in d.overrefusal:
        out[f"overrefusal:{spec}"] = load_prompts(spec).take(d.n_eval, seed=seed).prompts
    # The topic gate's negatives: more and more varied "other" prompts than the fitting sets,
    # each source read past the rows every other role took (so they never overlap).
    roles = {"neutral": [(d.neutral, d.n_fit + d.n_proxy)],
             "safety_fit": [(d.safety_fit, d.n_fit)],
             "overrefusal": [(spec, d.n_eval) for spec in d.overrefusal]}
    sources = [src for name in d.gate_sources for src in roles.get(name, [(name, 0)])]
    taken = {p for ps in out.values() for p in ps}
    out["gate_negatives"] = list(dict.fromkeys(
        p for spec, offset in sources
        for p in load_prompts(spec).take(d.n_gate, seed=seed, offset=offset).prompts
        if p not in taken))
    return out
