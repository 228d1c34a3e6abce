"""Behaviour buckets and steering sweeps for `refusalkit analyze` (paper B, METHODS.md §2).

- Buckets: harmful and benign prompts are generated *unsteered* (greedy) and judged:
  HR harmful-refused, HC harmful-complied, BR benign-refused (over-refusal), BC
  benign-complied. Over-refusals are rare, so benign candidates are first ranked by the cheap
  first-token refusal score and a share of the generation budget goes to the top of that
  ranking (`buckets.enrich`); buckets are still decided by the judge, never by the proxy.
- Evaluation set: up to `eval_per_bucket` prompts from each bucket (a short bucket is filled
  from the other bucket of the same side), so RR is measured on harmful and ORR on benign
  prompts whose unsteered behaviour is known; α = 0 is regenerated in the sweep's batches.
- Sweeps: for each direction r̂ (unit), activation addition h ← h + α·r̂ at the analysis layer
  on every position, prompt and generation, for each α; and directional ablation of r̂ at
  every layer. Responses are generated greedily and judged; RR/ORR/accuracy come from text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from refusalkit.analyze.config import AnalyzeConfig, sample_pool
from refusalkit.analyze.styles import lexical_style
from refusalkit.examiner import Examiner
from refusalkit.interventions import Profile, ablation, addition
from refusalkit.scoring import refusal_score

BUCKETS = ("HR", "HC", "BR", "BC")


def judged_rows(ex: Examiner, prompts: Sequence[str],
                profile: Profile | None = None) -> list[dict[str, Any]]:
    """Greedy answers under `profile`, judged → rows with refusal (0/1), score, judge and
    lexical style (lexical style only for refusals; compliance rows carry "compliance")."""
    texts, judgements = ex.judged_texts(prompts, profile)
    out = []
    for p, t, j in zip(prompts, texts, judgements, strict=True):
        refused = bool(j.is_refusal)
        out.append({"prompt": p, "response": t, "refusal": int(refused),
                    "score": float(j.score), "judge_style": j.style,
                    "style": lexical_style(t) if refused else "compliance"})
    return out


def baseline(ex: Examiner, cfg: AnalyzeConfig) -> dict[str, Any]:
    """Unsteered, judged responses for the bucket pool (a JSON-ready stage result)."""
    b = cfg.buckets
    harmful = sample_pool(b.harmful, b.n_harmful, cfg.seed)
    n_cand = max(b.prescreen, b.n_benign)
    candidates = sample_pool(b.benign, n_cand, cfg.seed)
    prescreen: dict[str, float] = {}
    if b.prescreen > 0 and len(candidates) > b.n_benign:
        scores = refusal_score(ex.lm, candidates, batch_size=cfg.batch_size,
                               show_progress=ex.show_progress)
        prescreen = {p: float(s) for p, s in zip(candidates, scores, strict=True)}
        n_top = round(b.enrich * b.n_benign)
        ranked = sorted(candidates, key=lambda p: -prescreen[p])
        top = ranked[:n_top]
        rest = [p for p in candidates if p not in set(top)]
        random.Random(cfg.seed).shuffle(rest)
        benign = top + rest[: b.n_benign - n_top]
    else:
        benign = candidates[: b.n_benign]
    rows = {}
    for side, prompts in (("harmful", harmful), ("benign", benign)):
        rows[side] = judged_rows(ex, prompts)
        for r in rows[side]:
            refused = r["refusal"] == 1
            r["bucket"] = ("HR" if refused else "HC") if side == "harmful" else \
                ("BR" if refused else "BC")
            if prescreen:
                r["prescreen_score"] = prescreen.get(r["prompt"])
    return {"harmful": rows["harmful"], "benign": rows["benign"],
            "prescreened": len(prescreen)}


def bucket_prompts(base: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in BUCKETS}
    for side in ("harmful", "benign"):
        for r in base[side]:
            out[r["bucket"]].append(r["prompt"])
    return out


def choose_eval(base: dict[str, Any], per_bucket: int, seed: int) -> dict[str, list[dict]]:
    """Evaluation rows per side: up to `per_bucket` from each bucket of that side, topped up
    from its other bucket when one is short (so each side has 2·per_bucket when possible)."""
    rng = random.Random(seed + 17)
    out = {}
    for side, (a, b) in (("harmful", ("HR", "HC")), ("benign", ("BR", "BC"))):
        rows = {k: [r for r in base[side] if r["bucket"] == k] for k in (a, b)}
        for k in rows:
            rng.shuffle(rows[k])
        take = {k: min(per_bucket, len(rows[k])) for k in rows}
        for k, other in ((a, b), (b, a)):
            spare = len(rows[k]) - take[k]
            short = per_bucket - take[other]
            take[k] += max(0, min(spare, short))
        out[side] = rows[a][: take[a]] + rows[b][: take[b]]
    return out


def unsteered_eval(ex: Examiner, chosen: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """α = 0 for the sweeps: the evaluation prompts regenerated unsteered in exactly the
    batches the steered conditions use, so a difference is the steering, not a different
    padding (greedy decoding of borderline prompts can flip with batch composition).
    Rows keep the bucket their baseline response put them in."""
    prompts = [r["prompt"] for r in chosen["harmful"] + chosen["benign"]]
    rows = judged_rows(ex, prompts)
    n_h = len(chosen["harmful"])
    for r, c in zip(rows, chosen["harmful"] + chosen["benign"], strict=True):
        r["bucket"] = c["bucket"]
    return {"harmful": rows[:n_h], "benign": rows[n_h:]}


def calibrate(ex: Examiner, cfg: AnalyzeConfig, vector: torch.Tensor, layer: int,
              unit_scale: float, eval_rows: dict[str, list[dict]]) -> dict[str, Any]:
    """α_max for the sweeps: walk up `sweep.ladder` adding the (first split's) direction to
    complied benign evaluation prompts until `calibrate_target` of them refuse (judged).

    Stops at the first value that reaches the target; if none does (reported), takes the
    value that refused most — past a point a larger α yields broken text, not refusals.
    Uses the sweep's generation settings; at most len(ladder) × calibrate_prompts responses.
    """
    sw = cfg.sweep
    rows = eval_rows["benign"]
    prompts = [r["prompt"] for r in rows if not r["refusal"]] or [r["prompt"] for r in rows]
    prompts = prompts[: sw.calibrate_prompts]
    r = (vector.double() / vector.double().norm().clamp_min(1e-12)).float()
    steps: list[dict[str, float]] = []
    for a in sw.ladder:
        profile = Profile((addition({layer: r}, a * unit_scale),))
        judged = judged_rows(ex, prompts, profile)
        rate = sum(j["refusal"] for j in judged) / len(judged)
        steps.append({"alpha": a, "alpha_abs": a * unit_scale, "refusal": rate})
        if rate >= sw.calibrate_target:
            break
    reached = steps[-1]["refusal"] >= sw.calibrate_target
    # Not reached: the value that refused most (too large an α breaks the text instead).
    best = steps[-1] if reached else max(steps, key=lambda st: (st["refusal"], -st["alpha"]))
    return {"ladder": steps, "alpha_max": best["alpha"], "n_prompts": len(prompts),
            "reached": reached}


def sweep_direction(ex: Examiner, cfg: AnalyzeConfig, vector: torch.Tensor, layer: int,
                    alphas_abs: Sequence[float], eval_rows: dict[str, list[dict]]
                    ) -> dict[str, Any]:
    """All conditions of one direction: addition at each α, then ablation (if enabled)."""
    r = (vector.double() / vector.double().norm().clamp_min(1e-12)).float()
    prompts = [row["prompt"] for row in eval_rows["harmful"] + eval_rows["benign"]]
    n_h = len(eval_rows["harmful"])
    conditions: list[tuple[str, float, float, Profile]] = [
        ("add", a_rel, a_abs, Profile((addition({layer: r}, a_abs),)))
        for a_rel, a_abs in zip(cfg.sweep.alphas, alphas_abs, strict=True)]
    if cfg.sweep.ablation:
        conditions.append(("ablate", 0.0, 0.0,
                           Profile((ablation(r, list(range(ex.lm.n_layers))),))))
    out = []
    for kind, a_rel, a_abs, profile in conditions:
        rows = judged_rows(ex, prompts, profile)
        out.append({"kind": kind, "alpha": a_rel, "alpha_abs": a_abs,
                    "harmful": rows[:n_h], "benign": rows[n_h:]})
    return {"conditions": out}


def outcome_matrix(base_eval: dict[str, list[dict]], sweep: dict[str, Any],
                   side: str) -> torch.Tensor:
    """0/1 refusals [1 + n_add, n_prompts]: row 0 unsteered, then each addition α."""
    rows = [[r["refusal"] for r in base_eval[side]]]
    rows += [[r["refusal"] for r in c[side]] for c in sweep["conditions"] if c["kind"] == "add"]
    return torch.tensor(rows, dtype=torch.float64)


def rates(harmful: Sequence[int], benign: Sequence[int]) -> dict[str, float]:
    """RR on harmful, ORR on benign, accuracy = (refused harmful + answered benign) / all."""
    nh, nb = len(harmful), len(benign)
    rr = sum(harmful) / nh if nh else float("nan")
    orr = sum(benign) / nb if nb else float("nan")
    acc = (sum(harmful) + nb - sum(benign)) / (nh + nb) if nh + nb else float("nan")
    return {"rr": rr, "orr": orr, "acc": acc, "n_harmful": nh, "n_benign": nb}


def steered_styles(base_eval: dict[str, list[dict]], sweep: dict[str, Any],
                   key: str = "style") -> list[str]:
    """One style per (prompt) for a direction: the style of its refusal at the largest α
    that produced one (prompts never refused under addition contribute nothing)."""
    adds = [c for c in sweep["conditions"] if c["kind"] == "add"]
    adds.sort(key=lambda c: -c["alpha"])
    out = []
    for side in ("harmful", "benign"):
        for i in range(len(base_eval[side])):
            for c in adds:
                row = c[side][i]
                if row["refusal"]:
                    out.append(str(row.get(key)))
                    break
    return out


def run_sweeps(names: Sequence[str], run_stage: Callable[[str, Callable[[], Any]], Any],
               compute: Callable[[str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One resumable stage per direction (`sweep-NAME`), so an interrupted sweep loses at
    most the direction in progress."""
    return {n: run_stage(f"sweep-{n}", lambda n=n: compute(n)) for n in names}
