"""The judge interface: (prompt, response) pairs in, labelled judgements out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Label = Literal["refusal", "compliance", "partial"]


@dataclass(frozen=True)
class Judgement:
    """label; score in [-1, 1] (+1 certain refusal, −1 certain compliance); style if known."""

    label: Label
    score: float
    style: str | None = None

    @property
    def is_refusal(self) -> bool:
        return self.label in ("refusal", "partial")


class Judge(Protocol):
    """Anything with a stable `id` (used in caches and reports) and a batch `judge` method."""

    id: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]: ...
