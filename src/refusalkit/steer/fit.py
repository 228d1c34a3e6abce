"""What the steer run fits from the baseline: the classes that define the target direction,
per-layer gaps and levels, the search space and the topic gate."""

from __future__ import annotations

from typing import Any

import torch

from refusalkit.activations import capture
from refusalkit.errors import UserError
from refusalkit.gates import fit_gate, pool_position
from refusalkit.judge.protocol import THRESHOLD
from refusalkit.models import LoadedModel
from refusalkit.steer.config import SteerConfig
from refusalkit.steer.search import (
    SearchSpace,
)

# Plain mean difference and paper A's WRMD: whichever the run does not steer with is steered
# with the same layers, strengths and gate, so the value of the estimator is measured.
BASELINE_METHODS = ("md", "wrmd")


def classes(acts: dict[str, torch.Tensor], c: torch.Tensor, remove: bool,
             c_safety: torch.Tensor):
    """(refusing, complying, weights…) activations that define the target direction."""
    if not remove:
        # induce: the model's own refusals (safety prompts it refused) vs its answers (topic
        # prompts it answered, and neutral ones) — the refuse-vs-answer direction, added on
        # the topic. (A "refuse everything" system prompt was tried instead: its direction
        # encodes the system-prompt change and lowered refusal when added, measured on qwen.)
        r_mask, a_mask = c_safety > THRESHOLD, c < -THRESHOLD
        if int(r_mask.sum()) < 2:
            raise UserError("the model refused fewer than 2 safety_fit prompts at baseline; "
                            "inducing refusal needs examples of its own refusals (check the "
                            "judge, or use a model that refuses harmful requests)")
        complied = torch.cat([acts["target_fit"][a_mask], acts["neutral"]])
        w_c = torch.cat([c[a_mask].abs(), torch.ones(len(acts["neutral"]))])
        return acts["safety_fit"][r_mask], complied, c_safety[r_mask].abs(), w_c
    r_mask, c_mask = c > THRESHOLD, c < -THRESHOLD
    refused, complied = acts["target_fit"][r_mask], acts["target_fit"][c_mask]
    w_r, w_c = c[r_mask].abs(), c[c_mask].abs()
    if len(complied) < 4:  # too few answered topic prompts: answered neutral prompts stand in
        complied = torch.cat([complied, acts["neutral"]])
        w_c = torch.cat([w_c, torch.ones(len(acts["neutral"]))])
    if len(refused) < 2:
        raise UserError("fewer than 2 target prompts were refused at baseline; add target "
                        "prompts or check the judge")
    return refused, complied, w_r, w_c


def gaps_levels(acts, dirs: torch.Tensor, c: torch.Tensor, remove: bool,
                 c_safety: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer: the refuse-vs-answer projection gap, and the projection of the class the
    steering moves (refusing prompts when removing, answering ones when inducing), which a
    clamp starts from."""
    refused, complied, _, _ = classes(acts, c, remove, c_safety)
    moved = refused if remove else complied
    gaps, levels = [], []
    for i in range(dirs.shape[0]):
        u = dirs[i] / dirs[i].norm().clamp_min(1e-12)
        gaps.append(float((refused[:, i] @ dirs[i]).mean() - (complied[:, i] @ dirs[i]).mean()))
        levels.append(float((moved[:, i] @ u).mean()))
    return gaps, levels


def search_space(lm: LoadedModel, cfg: SteerConfig) -> SearchSpace:
    lo, hi = (round(f * lm.n_layers) for f in cfg.search.window)
    lo, hi = max(1, min(lo, lm.n_layers - 1)), max(lo + 1, min(hi, lm.n_layers))
    gate = {"off": (False,), "on": (True,), "search": (False, True)}[cfg.search.gate]
    return SearchSpace((lo, hi), cfg.search.max_layers, cfg.search.alpha_max,
                       -1.0 if cfg.mode == "remove" else 1.0, gate, cfg.search.operator)


def fit_topic_gate(lm: LoadedModel, acts: dict[str, torch.Tensor],
                    data: dict[str, list[str]], cfg: SteerConfig,
                    show_progress: bool) -> dict[str, Any]:
    """A topic detector no deeper than `gate_max_layer`, fitted on the topic's fitting prompts
    against every other prompt the run fits on plus the gate negatives (see gates.py)."""
    hi = max(1, min(lm.n_layers - 1, round(cfg.search.gate_max_layer * lm.n_layers)))
    layers = list(range(1, hi + 1))
    pool = cfg.search.gate_pool

    def read(name: str) -> torch.Tensor:
        if pool == "last" and name in acts:  # the activations stage read exactly this
            return acts[name][:, layers]
        return capture(lm, data[name], layers, [pool_position(pool)],
                       batch_size=cfg.batch_size, show_progress=show_progress)[:, :, 0]

    names = ["neutral", "safety_fit"] + (["gate_negatives"] if data["gate_negatives"] else [])
    neg = torch.cat([read(n) for n in names])
    fit = fit_gate(read("target_fit"), neg, layers, max_false_open=cfg.search.gate_false_open,
                   pool=pool, seed=cfg.seed)
    return {"layer": fit.gate.layer, "threshold": fit.gate.threshold, "pool": pool,
            "vector": fit.gate.vector.tolist(), "recall_oof": fit.recall, "leak": fit.leak,
            "margin_z": fit.margin_z, "shrink": fit.shrink,
            "n_topic": len(data["target_fit"]), "n_other": int(neg.shape[0]),
            "layers": fit.table}
