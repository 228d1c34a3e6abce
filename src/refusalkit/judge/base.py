"""The judge interface: (prompt, response) pairs in, labelled judgements out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Label = Literal["refusal", "compliance", "partial"]
LABELS: tuple[str, ...] = ("refusal", "partial", "compliance")

# The 12 refusal styles of paper A's judge prompt (METHODS.md §1.1), in the prompt's order;
# letters A–L in the prompt map to these keys. "compliance" and "partial" complete the set.
REFUSAL_STYLES: tuple[str, ...] = (
    "direct_refusal", "deflection", "misinformation", "reframing", "feigned_ignorance",
    "vagueness", "topic_redirection", "conditional_framing", "moral_lecturing",
    "official_narrative", "question_invalidation", "nonsensical",
)
STYLES: tuple[str, ...] = (*REFUSAL_STYLES, "partial", "compliance")
# How a compliant answer complies (labels and the calibrated judge's style head).
COMPLIANCE_STYLES: tuple[str, ...] = ("direct_engagement", "balanced", "educational",
                                      "disclaimer_then_answer")
ANSWER_STYLES: tuple[str, ...] = (*REFUSAL_STYLES, *COMPLIANCE_STYLES)
UNPARSEABLE = "unparseable"  # style of a judgement whose label could not be read (score 0)


@dataclass(frozen=True)
class Judgement:
    """label; score in [-1, 1] (+1 certain refusal, −1 certain compliance); style if known;
    on_topic = P(the answer addresses what was asked) where the judge estimates it."""

    label: Label
    score: float
    style: str | None = None
    on_topic: float | None = None

    @property
    def is_refusal(self) -> bool:
        return self.label in ("refusal", "partial")

    @property
    def parsed(self) -> bool:
        """False when the judge could not read a label (paper A counts such answers as 0)."""
        return self.style != UNPARSEABLE


class Judge(Protocol):
    """Anything with a stable `id` (used in caches and reports) and a batch `judge` method."""

    id: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]: ...


def check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    """Judges take parallel lists; a length mismatch is a caller bug worth a clear message."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
