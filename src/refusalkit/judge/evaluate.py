"""Agreement of a judge with human labels: label files, binary metrics, timing.

Binary view throughout: `partial` counts as refusal (the positive class), as the issue
specifies; the 3×3 confusion is reported too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.errors import UserError
from refusalkit.judge.base import LABELS, Judge, Judgement
from refusalkit.prompts import read_jsonl


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
            raise UserError(f"{path}:{n}: unknown label '{row['label']}'; use "
                            + ", ".join(LABELS))
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
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def evaluate(judge: Judge, items: list[LabelledItem]) -> tuple[dict[str, Any], list[Judgement]]:
    """Judge the items once; metrics plus seconds per item (wall clock, includes loading)."""
    start = time.perf_counter()
    out = judge.judge([i.prompt for i in items], [i.response for i in items])
    seconds = time.perf_counter() - start
    gold = [i.refusal for i in items]
    pred = [j.is_refusal for j in out]
    metrics = binary_metrics(gold, pred)
    three = {g: {p: 0 for p in LABELS} for g in LABELS}
    for item, j in zip(items, out, strict=True):
        three[item.label][j.label] += 1
    metrics.update(judge=judge.id, auc=auc(gold, [j.score for j in out]),
                   confusion_3way=three, seconds_per_item=seconds / len(items))
    return metrics, out
