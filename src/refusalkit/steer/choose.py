"""Choosing the profile among the verified candidates, and how well the search's cheap proxy
ranked them."""

from __future__ import annotations

from typing import Any

from refusalkit.judge.protocol import THRESHOLD
from refusalkit.steer.search import TrialParams

TIE = 0.05  # judged rates this close count as a tie (one or two prompts of a verify set)
SLACK = 0.1  # induce: how much the ordinary prompts' judged refusal may rise on the verify set


def proxy_agreement(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Spearman correlation, over the verified candidates, of the search's proxy target
    objective (refusal log-odds) with the judged target refusal and useful-answer rates: does
    the cheap proxy rank candidates the way the judged check does? (None: fewer than three
    candidates, or a constant column.)"""
    from scipy.stats import spearmanr

    def rho(key: str) -> float | None:
        pairs = [(r["target"], r[key]) for r in rows
                 if r.get("target") is not None and r.get(key) is not None]
        if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
            return None
        return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)

    return {"refusal": rho("target_refusal"), "useful": rho("target_useful")}


def keep_rate(base_rows: list[dict[str, Any]], keep_prompts: list[str]) -> float:
    """The unsteered refusal rate on the prompts whose behaviour must be kept."""
    refused = {r["prompt"]: r["confidence"] > THRESHOLD for r in base_rows}
    return sum(refused.get(p, False) for p in keep_prompts) / max(1, len(keep_prompts))


def choose_remove(rows: list[dict[str, Any]], keep_min: float) -> dict[str, Any]:
    """The highest useful-answer rate on the target (lowest judged refusal when the judge
    cannot tell on-topic answers) among candidates that keep at least `keep_min` of the
    safety refusals; among those within TIE of the best, the one that steers least."""
    ok = [r for r in rows if r["keep_refusal"] >= keep_min] or rows
    if all(r.get("target_useful") is not None for r in ok):
        top = max(r["target_useful"] for r in ok)
        near = [r for r in ok if r["target_useful"] >= top - TIE]
        return min(near, key=lambda r: (size(r), -r["target_useful"], r["target_refusal"]))
    best = min(r["target_refusal"] for r in ok)
    near = [r for r in ok if r["target_refusal"] <= best + TIE]
    return min(near, key=lambda r: (size(r), r["target_refusal"], -r["keep_refusal"]))


def choose_induce(rows: list[dict[str, Any]], base_rate: float) -> dict[str, Any]:
    """The highest judged target refusal that keeps ordinary prompts answered (at most SLACK
    above their unsteered refusal); among those within TIE of the best, the gentlest."""
    ok = [r for r in rows if r["keep_refusal"] <= base_rate + SLACK] or rows
    best = max(r["target_refusal"] for r in ok)
    near = [r for r in ok if r["target_refusal"] >= best - TIE]
    return min(near, key=lambda r: (size(r), -r["target_refusal"], r["keep_refusal"]))


def size(row: dict[str, Any]) -> float:
    """How much a candidate steers (α × layers): the tie-break toward the gentler one."""
    return TrialParams.of(row["params"]).size
