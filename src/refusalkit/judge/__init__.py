"""Refusal judges: one interface (`Judge`), composable, each with a stable id.

`make_judge(spec)` builds any of them from a string; `CachedJudge` + `JudgementCache` keep
judgements on disk; `protocol` aggregates judged answers into paper A's refusal confidence
c(x). Text in, judgements out: running the model is `evaluate.score_prompts`' job.
"""

from refusalkit.judge.base import LABELS, REFUSAL_STYLES, STYLES, Judge, Judgement
from refusalkit.judge.cache import CachedJudge, JudgementCache
from refusalkit.judge.keyword import KeywordJudge
from refusalkit.judge.protocol import PromptScore, summarize
from refusalkit.judge.spec import EnsembleJudge, make_judge

__all__ = [
    "LABELS", "REFUSAL_STYLES", "STYLES", "CachedJudge", "EnsembleJudge", "Judge", "Judgement",
    "JudgementCache", "KeywordJudge", "PromptScore", "make_judge", "summarize",
]
