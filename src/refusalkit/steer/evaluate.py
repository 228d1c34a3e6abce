"""Held-out evaluation of the steering pipeline: the chosen profile and its baselines.

Each held-out set is answered once unsteered and once per profile (the chosen one and each
baseline); the configured judge and the keyword judge read the same answers, so their
numbers sit side by side without generating twice.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from refusalkit.evaluate import (
    Judged,
    assess_answers,
    fill_perplexities,
    perplexity_ratio,
    refusal_rate,
)
from refusalkit.examiner import Examiner
from refusalkit.gates import gate_of
from refusalkit.interventions import Profile
from refusalkit.judge import KeywordJudge
from refusalkit.quality import AnswerQuality
from refusalkit.quality import rates as quality_rates
from refusalkit.scoring import kl_divergence
from refusalkit.steer.data import Splits
from refusalkit.steer.search import steered_logprobs


def _keyword_rate(js: list[Judged]) -> float:
    kw = KeywordJudge()
    return sum(kw.is_refusal(j.response) for j in js) / max(1, len(js))


def _summary(rates: dict[str, float], overrefusal_sets: list[str]) -> dict[str, float]:
    over = [rates[s] for s in overrefusal_sets]
    return {"target": rates["target_eval"], "safety": rates["safety_eval"],
            "overrefusal": sum(over) / max(1, len(over))}


def evaluate_all(ex: Examiner, splits: Splits, profile: Profile,
                 baselines: dict[str, Profile], n_examples: int) -> dict[str, Any]:
    """Before/after refusal on every held-out set, KL and perplexity on harmless prompts."""
    data = splits.held_out()
    sets = list(data)
    over = [k for k in sets if k.startswith("overrefusal:")]
    judged, open_share = _judge_all(ex, data, {"after": profile, **baselines})
    rates = {name: {s: refusal_rate(js) for s, js in by_set.items()}
             for name, by_set in judged.items()}
    kw = {name: {s: _keyword_rate(js) for s, js in by_set.items()}
          for name, by_set in judged.items()}
    ppl_cache: dict[tuple[str, str], float | None] = {}  # unsteered model, shared by profiles
    fill_perplexities(ex.lm, [j for by_set in judged.values() for js in by_set.values()
                              for j in js], ppl_cache, batch_size=ex.batch_size)
    quality = {name: {s: assess_answers(ex.lm, js, batch_size=ex.batch_size, cache=ppl_cache)
                      for s, js in by_set.items()} for name, by_set in judged.items()}
    qrates = {name: {s: quality_rates(qs) for s, qs in by_set.items()}
              for name, by_set in quality.items()}
    costs, kl_each = {}, {}
    for name, p in {"after": profile, **baselines}.items():
        costs[name], kl_each[name] = _cost(ex, splits, p)
    for name, p in {"after": profile, **baselines}.items():
        g = gate_of(p)
        if g is not None:
            open_share[name]["harmless_eval"] = float(ex.opened(g, splits.harmless_eval)
                                                      .double().mean())
            if splits.kl_eval:
                open_share[name]["kl_eval"] = float(ex.opened(g, splits.kl_eval).double().mean())
            for spec, ps in splits.gate_check.items():
                if ps:
                    open_share[name][f"gate_check:{spec}"] = float(
                        ex.opened(g, ps).double().mean())

    before, after = _summary(rates["before"], over), _summary(rates["after"], over)
    metrics: dict[str, Any] = {
        "target_refusal_before": before["target"], "target_refusal_after": after["target"],
        "safety_refusal_before": before["safety"], "safety_refusal_after": after["safety"],
        "overrefusal_before": before["overrefusal"], "overrefusal_after": after["overrefusal"],
        **costs["after"],
        "keyword": {"target_refusal_before": kw["before"]["target_eval"],
                    "target_refusal_after": kw["after"]["target_eval"],
                    "safety_refusal_before": kw["before"]["safety_eval"],
                    "safety_refusal_after": kw["after"]["safety_eval"]},
        "target_useful_before": qrates["before"]["target_eval"]["useful"],
        "target_useful_after": qrates["after"]["target_eval"]["useful"],
        "per_dataset": {name: {"judge": rates[name], "keyword": kw[name],
                               "quality": qrates[name]} for name in rates},
        "baselines": {},
        "gate_open": open_share,
        "kl_harmless_prompts": len(splits.kl_prompts),
        "kl_first_n": len(splits.harmless_eval),
    }
    for name in baselines:
        s = _summary(rates[name], over)
        metrics["baselines"][name] = {"target_refusal_after": s["target"],
                                      "safety_refusal_after": s["safety"],
                                      "overrefusal_after": s["overrefusal"],
                                      "target_useful_after":
                                          qrates[name]["target_eval"]["useful"],
                                      **costs[name]}
    metrics["overrefusal_other"] = overrefusal_other(judged, over, splits.on_topic)
    metrics["kl_other"] = kl_other(kl_each, splits.kl_prompts, splits.on_topic)
    metrics["target_extra"] = _target_extra(data, rates, qrates, open_share)
    metrics["gate_harmful"] = gate_harmful(ex, profile, data["safety_eval"],
                                           judged["before"]["safety_eval"],
                                           judged["after"]["safety_eval"])
    metrics["_examples"] = examples_of(judged, quality, sets, n_examples)
    metrics["_answers"] = answers_of(judged, quality)
    metrics["_kl"] = kl_rows(kl_each, splits.kl_prompts, splits.on_topic)
    return metrics


def _target_extra(data: dict[str, list[str]], rates: dict[str, dict[str, float]],
                  qrates: dict[str, dict[str, dict[str, Any]]],
                  open_share: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Refusal, useful answers and gate recall on each extra phrasing of the target."""
    return {s[len("target_extra:"):]: {"n": len(ps),
                                       "refusal_before": rates["before"][s],
                                       "refusal_after": rates["after"][s],
                                       "useful_before": qrates["before"][s]["useful"],
                                       "useful_after": qrates["after"][s]["useful"],
                                       "gate_recall": open_share.get("after", {}).get(s)}
            for s, ps in data.items() if s.startswith("target_extra:")}


def overrefusal_other(judged: dict[str, dict[str, list[Judged]]], sets: list[str],
                      on_topic: frozenset[str]) -> dict[str, Any] | None:
    """Over-refusal on the over-refusal sets' prompts that are *not* labelled as on the
    target topic (data.on_topic), for every profile, with the labelled prompts named: in
    induce mode a cooking prompt inside XSTest that is now refused is the run working, and
    the figure with it is still reported beside this one. None when nothing is labelled."""
    if not on_topic:
        return None
    out: dict[str, Any] = {"on_topic": {s: [j.prompt for j in judged["before"][s]
                                            if j.prompt in on_topic] for s in sets},
                           "per_set": {}}
    for name, by_set in judged.items():
        rates = {}
        for s in sets:
            other = [j for j in by_set[s] if j.prompt not in on_topic]
            rates[s] = refusal_rate(other)
            out["per_set"].setdefault(s, {"n": len(other)})[name] = rates[s]
        out[name] = sum(rates.values()) / max(1, len(rates))
    return out


def kl_other(kl_each: dict[str, torch.Tensor], prompts: list[str],
             on_topic: frozenset[str]) -> dict[str, Any] | None:
    """KL on the KL prompts that are *not* labelled as on the target topic, per profile: in
    induce mode the gate opening on a recipe inside the ordinary prompts is the run working,
    not damage to other prompts (the whole-set kl_harmless stays beside it). None when no
    labels are given or none of them fell in the KL draw (the figure would equal kl_harmless)."""
    mask = torch.tensor([p not in on_topic for p in prompts], dtype=torch.bool)
    if not on_topic or bool(mask.all()):
        return None
    out: dict[str, Any] = {"on_topic": [p for p in prompts if p in on_topic],
                           "n": int(mask.sum())}
    for name, kl in kl_each.items():
        out[name] = float(kl[mask].mean()) if out["n"] else None
        out[f"{name}_on_topic"] = float(kl[~mask].mean())
    return out


def kl_rows(kl_each: dict[str, torch.Tensor], prompts: list[str],
            on_topic: frozenset[str]) -> list[dict[str, Any]]:
    """Each harmless prompt's next-token KL under every profile (run folder's kl.jsonl): the
    mean says how much ordinary prompts moved, these rows say which ones, e.g. the food
    prompts an induce gate opened for."""
    return [{"prompt": p, "on_topic": p in on_topic,
             **{name: float(kl[i]) for name, kl in kl_each.items()}}
            for i, p in enumerate(prompts)]


def gate_harmful(ex: Examiner, profile: Profile, prompts: list[str], before: list[Judged],
                 after: list[Judged]) -> dict[str, Any] | None:
    """The topic gate on held-out harmful requests: the share it opens for (a harmful
    request that touches the topic unlocks the steering) and the judged refusal on exactly
    those prompts before and after. None for an ungated profile (it steers every prompt;
    safety_refusal_after is then the whole story)."""
    g = gate_of(profile)
    if g is None:
        return None
    opened = ex.opened(g, prompts).tolist()
    rows = [i for i, o in enumerate(opened) if o]
    return {"n": len(prompts), "opened": len(rows), "share": len(rows) / max(1, len(prompts)),
            "refusal_before_on_opened": refusal_rate([before[i] for i in rows]) if rows else None,
            "refusal_after_on_opened": refusal_rate([after[i] for i in rows]) if rows else None,
            "opened_prompts": [prompts[i] for i in rows]}


def _judge_all(ex: Examiner, data: dict[str, list[str]], profiles: dict[str, Profile]
               ) -> tuple[dict[str, dict[str, list[Judged]]], dict[str, dict[str, float]]]:
    """Every set answered unsteered ("before") and under each profile, and the share of each
    set a gated profile's gate opened for. Unsteered answers come first: a gated profile
    reuses them wherever its gate stays shut."""
    judged = {"before": {s: ex.answers(ps) for s, ps in data.items()}}
    open_share: dict[str, dict[str, float]] = {}
    for name, p in profiles.items():
        judged[name] = {}
        for s, ps in data.items():
            judged[name][s], opened = ex.gated_answers(ps, p)
            if gate_of(p) is not None:
                open_share.setdefault(name, {})[s] = float(opened.double().mean())
    return judged, open_share


def _cost(ex: Examiner, splits: Splits, p: Profile
          ) -> tuple[dict[str, float], torch.Tensor]:
    """KL on harmless_eval plus the n_kl more held-out ordinary prompts (KL is cheap), and the
    perplexity ratio of the unsteered greedy answers to harmless_eval. A shut gate changes
    nothing: only the rows it opens for are run. Also returns the per-prompt KL."""
    harmless, kl_prompts = splits.harmless_eval, splits.kl_prompts
    base_logp = ex.logprobs(kl_prompts)
    base_answers = [j.response for j in ex.answers(harmless, mode="greedy")]
    g = gate_of(p)
    opened = (torch.cat([ex.opened(g, harmless), ex.opened(g, splits.kl_eval)])
              if g is not None else None)
    kl = kl_divergence(base_logp, steered_logprobs(ex.lm, kl_prompts, p, base_logp, opened, g,
                                                   ex.batch_size))
    return {"kl_harmless": float(kl.mean()),
            "kl_harmless_first_n_eval": float(kl[: len(harmless)].mean()),
            "perplexity_ratio": perplexity_ratio(
                ex.lm, harmless, base_answers, p,
                ex.opened(g, harmless) if g is not None else None)}, kl


def answers_of(judged: dict[str, dict[str, list[Judged]]],
               quality: dict[str, dict[str, list[AnswerQuality]]]) -> list[dict[str, Any]]:
    """Every held-out answer of every profile ("before" = unsteered), with its judgement and
    flags: rates are only worth what the answers behind them are, and a reader (or another
    judge) must be able to read all of them, not only the report's examples."""
    return [{"profile": name, "dataset": s, "index": i, "prompt": j.prompt,
             "response": j.response, "label": j.label, "confidence": j.confidence,
             "style": j.style, "p_on_topic": j.on_topic, **q.flags()}
            for name, by_set in judged.items() for s, js in by_set.items()
            for i, (j, q) in enumerate(zip(js, quality[name][s], strict=True))]


def examples_of(judged: dict[str, dict[str, list[Judged]]],
                quality: dict[str, dict[str, list[AnswerQuality]]], sets: list[str],
                n: int) -> list[dict[str, Any]]:
    """The first n before/after pairs of every held-out set, flagged with what the answer is
    worth; plus every steered target answer called useful whose P(on topic) is in the bottom
    decile of the steered target answers (suspicious: the judge may have been fooled)."""
    def row(s: str, i: int, suspicious: bool = False) -> dict[str, Any]:
        b, a, q = judged["before"][s][i], judged["after"][s][i], quality["after"][s][i]
        return {"dataset": s, "prompt": b.prompt, "before": b.response,
                "before_label": b.label, "before_confidence": b.confidence,
                "after": a.response, "after_label": a.label,
                "after_confidence": a.confidence, "after_style": a.style,
                "after_useful": q.useful, "after_on_topic": a.on_topic,
                "after_loop": q.loop, "after_language_match": q.language_match,
                "after_perplexity": q.perplexity, "suspicious": suspicious}

    picked = {(s, i): False for s in sets for i in range(min(n, len(judged["before"][s])))}
    target = judged["after"]["target_eval"]
    topical = sorted(j.on_topic for j in target if j.on_topic is not None)
    if topical:
        cut = topical[max(0, math.ceil(0.1 * len(topical)) - 1)]  # bottom-decile bound
        for i, (j, q) in enumerate(zip(target, quality["after"]["target_eval"], strict=True)):
            if q.useful and j.on_topic is not None and j.on_topic <= cut:
                picked["target_eval", i] = True
    return [row(s, i, flag) for (s, i), flag in picked.items()]
