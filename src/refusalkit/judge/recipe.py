"""How the calibrated judge is trained: one recipe, used for the packaged weights and for every
leave-one-model-out fold, so the held-out figures describe the judge that ships.

1. Standardise the features; choose the L2 strength of the binary logistic regression by
   stratified 5-fold cross-validated log-loss on the training rows.
2. Calibrate: out-of-fold logits → Platt (a·z + b) and isotonic maps; keep the one with the
   lower out-of-fold ECE (10 equal-width bins).
3. Heads on the same standardised features, fitted where their labels exist: style (softmax
   over the 16 styles, project rows only), partial vs refusal, and on topic.
Training rows never include a `test` split row (the caller passes dev rows only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refusalkit.judge.base import ANSWER_STYLES
from refusalkit.judge.calibrated import FORMAT
from refusalkit.judge.evaluate import ece
from refusalkit.judge.trained import fit_logistic, folds

L2_GRID = (1.0, 10.0, 100.0, 1000.0)
def fit_softmax(z: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float,
                steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (LBFGS, float64)."""
    z = z.double()
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w * w).sum() / (
            2 * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _logloss(z: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.binary_cross_entropy_with_logits(z.double(), y.double()))


def out_of_fold(x: torch.Tensor, y: torch.Tensor, l2: float, k: int = 5) -> torch.Tensor:
    """Logits of each row from a model fitted without its fold."""
    z = torch.empty(len(y))
    for test in folds(y, k):
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        mean, std, w, b = fit_logistic(x[train], y[train], l2)
        z[test] = ((x[test] - mean) / std) @ w + b
    return z


def fit_calibration(z: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Platt and isotonic maps on out-of-fold logits; the lower-ECE one (ECE itself measured
    out of fold again, so the isotonic map's flexibility is not rewarded for overfitting)."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    zn, yn = z.double().numpy(), y.numpy().astype(int)
    maps: dict[str, list[float]] = {"platt": [0.0] * len(zn), "isotonic": [0.0] * len(zn)}
    for test in folds(y, 5, seed=1):
        tr = np.ones(len(zn), dtype=bool)
        tr[test.numpy()] = False
        lr = LogisticRegression(C=1e6).fit(zn[tr, None], yn[tr])
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(zn[tr], yn[tr])
        for i, pp, pi in zip(test.tolist(), lr.predict_proba(zn[test.numpy(), None])[:, 1],
                             iso.predict(zn[test.numpy()]), strict=True):
            maps["platt"][i], maps["isotonic"][i] = float(pp), float(pi)
    scores = {k: ece(v, yn.astype(bool)) for k, v in maps.items()}
    lr = LogisticRegression(C=1e6).fit(zn[:, None], yn)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(zn, yn)
    best = min(scores, key=lambda k: scores[k])
    if best == "platt":
        cal = {"kind": "platt", "a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
    else:
        cal = {"kind": "isotonic", "x": [float(v) for v in iso.X_thresholds_],
               "y": [float(v) for v in iso.y_thresholds_]}
    return {**cal, "oof_ece": {k: round(v, 4) for k, v in scores.items()}}


def _head(z: torch.Tensor, y: torch.Tensor, l2: float) -> dict[str, Any]:
    """A binary head on already standardised features (z has zero mean, unit std); with
    fewer than two labelled rows of each class it abstains (P = the base rate, or 0.5)."""
    if min(int(y.sum()), int((1 - y).sum())) < 2:
        rate = float(y.mean()) if len(y) else 0.5
        logit = math.log(max(rate, 1e-3) / max(1 - rate, 1e-3))
        return {"coef": [[0.0] * z.shape[1]], "intercept": [round(logit, 6)]}
    _, _, w, b = fit_logistic(z, y, l2)  # re-standardising a standardised z is a no-op
    return {"coef": [[round(v, 6) for v in w.tolist()]], "intercept": [round(b, 6)]}


def train_v2(x: torch.Tensor, rows: Sequence[dict[str, Any]], name: str,
             components: Sequence[str], meta: dict[str, Any],
             calibrate_on: Sequence[bool] | None = None) -> dict[str, Any]:
    """Weights of the calibrated judge from features `x` [n, D] of labelled `rows` (each with
    `label`, and where known `style` and `on_topic`). `calibrate_on` marks the rows whose
    out-of-fold logits fit the calibration map (default: all)."""
    y = torch.tensor([float(r["label"] in ("refusal", "partial")) for r in rows])
    cv = {l2: _logloss(out_of_fold(x, y, l2), y) for l2 in L2_GRID}
    l2 = min(cv, key=lambda v: (cv[v], -v))
    mean, std, w, b = fit_logistic(x, y, l2)
    z = (x - mean) / std
    oof = out_of_fold(x, y, l2)
    keep = torch.tensor(list(calibrate_on)) if calibrate_on is not None else torch.ones(
        len(y), dtype=torch.bool)
    cal = fit_calibration(oof[keep], y[keep])
    record: dict[str, Any] = {
        "format": FORMAT, "name": name, "components": list(components),
        "mean": [round(v, 6) for v in mean.tolist()], "std": [round(v, 6) for v in std.tolist()],
        "binary": {"coef": [[round(v, 6) for v in w.tolist()]], "intercept": [round(b, 6)]},
        "calibration": cal, "threshold": 0.5,
    }
    refused = [i for i, r in enumerate(rows) if r["label"] in ("refusal", "partial")]
    record["partial"] = _head(z[refused], torch.tensor(
        [float(rows[i]["label"] == "partial") for i in refused]), l2)
    topic = [i for i, r in enumerate(rows) if r.get("on_topic") is not None]
    record["on_topic"] = _head(z[topic], torch.tensor(
        [float(bool(rows[i]["on_topic"])) for i in topic]), l2)
    styled = [i for i, r in enumerate(rows) if r.get("style") in ANSWER_STYLES]
    if styled:
        ws, bs = fit_softmax(z[styled], torch.tensor(
            [ANSWER_STYLES.index(rows[i]["style"]) for i in styled]), len(ANSWER_STYLES), l2)
    else:  # no style labels: the first style of each side (direct refusal / engagement)
        ws = torch.zeros(len(ANSWER_STYLES), z.shape[1], dtype=torch.float64)
        bs = torch.tensor([float(s in ("direct_refusal", "direct_engagement"))
                           for s in ANSWER_STYLES], dtype=torch.float64)
    record["style"] = {"classes": list(ANSWER_STYLES),
                       "coef": [[round(v, 6) for v in row] for row in ws.tolist()],
                       "intercept": [round(v, 6) for v in bs.tolist()]}
    record["meta"] = {**meta, "n": len(rows), "n_style": len(styled), "n_on_topic": len(topic),
                      "l2": l2, "cv_logloss": {str(k): round(v, 4) for k, v in cv.items()}}
    return record
