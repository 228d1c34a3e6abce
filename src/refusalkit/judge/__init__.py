"""Refusal judges: one interface (`Judge`), composable, each with a stable id."""

from refusalkit.judge.base import Judge, Judgement
from refusalkit.judge.keyword import KeywordJudge

__all__ = ["Judge", "Judgement", "KeywordJudge"]
