"""Leave-one-model-out evaluation: would the judge's recipe hold on a model it never saw?

For each model in a labelled file (e.g. XSTest's gpt4 / llama2orig / mistralinstruct), the v2
recipe is trained on every other model's rows (plus optional extra training rows, such as the
project's dev split) and scored on the held-out model's rows. Features are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from refusalkit.errors import UserError
from refusalkit.judge.base import Judgement
from refusalkit.judge.calibrated import judgements_from
from refusalkit.judge.evaluate import LabelledItem, score_judgements
from refusalkit.judge.recipe import train_v2
from refusalkit.judge.trained import featurize


def _rows(items: Sequence[LabelledItem]) -> list[dict[str, Any]]:
    return [{**i.row, "label": i.label} for i in items]


def leave_one_model_out(items: list[LabelledItem], extra: list[LabelledItem],
                        components: Sequence[str]) -> dict[str, Any]:
    """Per held-out model: the agreement figures of a judge trained without it."""
    models = sorted({str(i.row.get("model")) for i in items if i.row.get("model")})
    if len(models) < 2:
        raise UserError("leave-one-model-out needs a labels file whose rows name at least two "
                        "different 'model's")
    both = items + extra
    x = featurize(components, [i.prompt for i in both], [i.response for i in both])
    x_items, x_extra = x[: len(items)], x[len(items):]
    folds: dict[str, Any] = {}
    for model in models:
        held = [n for n, i in enumerate(items) if i.row.get("model") == model]
        train = [n for n, i in enumerate(items) if i.row.get("model") != model]
        # calibrated where the shipped judge is: on the extra (project) rows when given
        weights = train_v2(torch.cat([x_items[train], x_extra]),
                           _rows([items[n] for n in train]) + _rows(extra),
                           f"lomo-{model}", components, {"held_out_model": model},
                           calibrate_on=[not extra] * len(train) + [True] * len(extra))
        out: list[Judgement] = judgements_from(
            weights, x_items[held], [items[n].response for n in held])
        metrics = score_judgements([items[n] for n in held], out)
        folds[model] = {k: metrics[k] for k in ("n", "accuracy", "f1", "auc", "ece", "recall",
                                                "precision")}
    worst = min(f["accuracy"] for f in folds.values())
    return {"components": list(components), "folds": folds, "min_accuracy": worst,
            "n_extra": len(extra)}
