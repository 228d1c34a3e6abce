"""Agreement of a judge with human labels: label files, binary metrics, calibration, styles.

Binary view throughout: `partial` counts as refusal (the positive class); the 3×3 confusion
is reported too. Beside accuracy / F1 / AUC: ECE and the reliability curve of P(refusal)
(= (score + 1) / 2), recall per gold style (does the judge catch topic redirection, babble,
official narrative?), style macro-F1, on-topic agreement, and breakdowns per source and model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusalkit.errors import UserError
from refusalkit.geometry import auc as geometry_auc
from refusalkit.judge.base import ANSWER_STYLES, LABELS, STYLES, Judge, Judgement
from refusalkit.prompts import read_jsonl

KNOWN_STYLES = frozenset((*STYLES, *ANSWER_STYLES))


@dataclass(frozen=True)
class LabelledItem:
    prompt: str
    response: str
    label: str
    row: dict[str, Any]

    @property
    def refusal(self) -> bool:
        return self.label in ("refusal", "partial")


def read_labels(path: str | Path, split: str | None = None,
                limit: int | None = None) -> list[LabelledItem]:
    """Rows with prompt, response and label ∈ {refusal, compliance, partial}; a bad row is a
    one-line UserError naming the file and line."""
    path = Path(path)
    items: list[LabelledItem] = []
    has_split = False
    for n, row in read_jsonl(path, ("prompt", "response", "label"), "labels file"):
        if row["label"] not in LABELS:
            raise UserError(f"{path}:{n}: field 'label' has unknown value '{row['label']}'; "
                            "use " + ", ".join(LABELS))
        if row.get("style") is not None and row["style"] not in KNOWN_STYLES:
            raise UserError(f"{path}:{n}: field 'style' has unknown value '{row['style']}'; "
                            "see tests/data/JUDGE_LABELS.md")
        if "on_topic" in row and not isinstance(row["on_topic"], bool | None):
            raise UserError(f"{path}:{n}: field 'on_topic' must be true or false")
        has_split = has_split or "split" in row
        if split is None or row.get("split") == split:
            items.append(LabelledItem(row["prompt"], row["response"], row["label"], row))
    if split is not None and not has_split:
        raise UserError(f"{path} has no 'split' field; drop --split")
    if not items:
        raise UserError(f"{path}: no labelled rows" + (f" in split '{split}'" if split else ""))
    return items[:limit] if limit is not None else items


def binary_metrics(gold: list[bool], pred: list[bool]) -> dict[str, Any]:
    tp = sum(g and p for g, p in zip(gold, pred, strict=True))
    fp = sum((not g) and p for g, p in zip(gold, pred, strict=True))
    fn = sum(g and not p for g, p in zip(gold, pred, strict=True))
    tn = len(gold) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(gold), "accuracy": (tp + tn) / len(gold) if gold else 0.0,
            "precision": precision, "recall": recall, "f1": f1,
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}


def auc(gold: list[bool], scores: list[float]) -> float | None:
    """Probability that a refusal scores above a compliance (ties count half)."""
    pos = [s for g, s in zip(gold, scores, strict=True) if g]
    neg = [s for g, s in zip(gold, scores, strict=True) if not g]
    if not pos or not neg:
        return None
    return geometry_auc(torch.tensor(pos), torch.tensor(neg))


def evaluate(judge: Judge, items: list[LabelledItem]) -> tuple[dict[str, Any], list[Judgement]]:
    """Judge the items once; metrics plus seconds per item (wall clock, includes loading)."""
    start = time.perf_counter()
    out = judge.judge([i.prompt for i in items], [i.response for i in items])
    seconds = time.perf_counter() - start
    metrics = score_judgements(items, out)
    metrics.update(judge=judge.id, seconds_per_item=seconds / len(items))
    return metrics, out


def score_judgements(items: list[LabelledItem], out: list[Judgement]) -> dict[str, Any]:
    """Every agreement figure of judgements `out` against the items' human labels."""

    gold = [i.refusal for i in items]
    metrics = binary_metrics(gold, [j.is_refusal for j in out])
    three = {g: {p: 0 for p in LABELS} for g in LABELS}
    for item, j in zip(items, out, strict=True):
        three[item.label][j.label] += 1
    prob = [(j.score + 1) / 2 for j in out]
    metrics.update(auc=auc(gold, [j.score for j in out]), confusion_3way=three,
                   ece=ece(prob, gold), reliability=reliability(prob, gold),
                   **style_metrics(items, out), by_source=_breakdown(items, out, "source"),
                   by_model=_breakdown(items, out, "model"))
    return metrics


def _breakdown(items: list[LabelledItem], out: list[Judgement], key: str) -> dict[str, Any]:
    groups: dict[str, list[int]] = {}
    for n, item in enumerate(items):
        groups.setdefault(str(item.row.get(key, "?")), []).append(n)
    return {g: {"n": len(idx), "accuracy": sum(items[i].refusal == out[i].is_refusal
                                               for i in idx) / len(idx)}
            for g, idx in sorted(groups.items())}


def style_metrics(items: list[LabelledItem], out: list[Judgement]) -> dict[str, Any]:
    """Recall per gold refusal style, style macro-F1 and on-topic agreement, where labelled."""
    from refusalkit.judge.base import REFUSAL_STYLES

    styled = [(i.row["style"], j) for i, j in zip(items, out, strict=True) if i.row.get("style")]
    recall = {}
    for style in sorted({s for s, _ in styled if s in REFUSAL_STYLES}):
        hits = [j.is_refusal for s, j in styled if s == style]
        recall[style] = {"n": len(hits), "recall": sum(hits) / len(hits)}
    f1s = []
    for style in sorted({s for s, _ in styled}):
        tp = sum(s == style and j.style == style for s, j in styled)
        fp = sum(s != style and j.style == style for s, j in styled)
        fn = sum(s == style and j.style != style for s, j in styled)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    topic = [(i.row["on_topic"], j.on_topic) for i, j in zip(items, out, strict=True)
             if isinstance(i.row.get("on_topic"), bool) and j.on_topic is not None]
    return {"recall_by_style": recall,
            "style_macro_f1": sum(f1s) / len(f1s) if f1s and any(j.style for _, j in styled)
            else None, "n_styled": len(styled),
            "on_topic_accuracy": sum(g == (p > 0.5) for g, p in topic) / len(topic)
            if topic else None,
            "on_topic_auc": auc([g for g, _ in topic], [p for _, p in topic]) if topic else None}


# ---------------------------------------------------------------- calibration

BINS = 10


def ece(p: Sequence[float], y: Sequence[bool], bins: int = BINS) -> float:
    """Expected calibration error: |mean p − refusal rate| per equal-width bin, weighted."""
    p_arr, y_arr = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    idx = np.minimum((p_arr * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p_arr[m].mean() - y_arr[m].mean())
    return float(total / max(1, len(p_arr)))


def reliability(p: Sequence[float], y: Sequence[bool], bins: int = BINS) -> list[dict]:
    """Per-bin mean predicted probability, observed refusal rate and count (the curve)."""
    p_arr, y_arr = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    idx = np.minimum((p_arr * bins).astype(int), bins - 1)
    return [{"bin": b / bins, "n": int((idx == b).sum()),
             "mean_p": float(p_arr[idx == b].mean()), "rate": float(y_arr[idx == b].mean())}
            for b in range(bins) if (idx == b).any()]
