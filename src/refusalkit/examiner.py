"""The examiner: one object that runs the model and judges it.

It owns what every pipeline otherwise threads through its calls — the model, the judge, the
decoding settings, the judgement cache and the batch size — and memoises what is asked of it
more than once in a run: the unsteered answers to a prompt set, and a gate's decisions on a
prompt set (a closed gate changes nothing, so gated profiles only run the rows it opens for).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusalkit.evaluate import Judged, judge_prompts, score_prompts
from refusalkit.gates import gate_of, gate_open
from refusalkit.generation import generate
from refusalkit.interventions import Gate, Profile, lift_gate
from refusalkit.judge import CachedJudge, Judge, Judgement, JudgementCache
from refusalkit.judge.protocol import PromptScore
from refusalkit.models import LoadedModel
from refusalkit.scoring import last_logprobs


@dataclass(frozen=True)
class Decoding:
    """How answers are produced for judging: paper A's protocol (`sample`, k answers) or the
    greedy answer, with its token budget and seed."""

    mode: str = "greedy"
    k: int = 5
    max_new_tokens: int = 48
    seed: int = 0
    signed: bool = True  # votes are the judge's calibrated 2P-1; False: paper A's +-1 labels


class Examiner:
    def __init__(self, lm: LoadedModel, judge: Judge, decoding: Decoding = Decoding(), *,
                 cache: JudgementCache | None = None, batch_size: int = 16,
                 show_progress: bool = False) -> None:
        self.lm, self.judge, self.decoding = lm, judge, decoding
        self.cache, self.batch_size, self.show_progress = cache, batch_size, show_progress
        self._unsteered: dict[tuple[str, tuple[str, ...]], list[Judged]] = {}
        self._opened: dict[tuple[int, tuple[str, ...]], tuple[Gate, torch.Tensor]] = {}
        self._logprobs: dict[tuple[str, ...], torch.Tensor] = {}

    def answers(self, prompts: Sequence[str], profile: Profile | None = None, *,
                mode: str | None = None) -> list[Judged]:
        """Judged answers (c(x) and the first answer) under `profile`; unsteered ones are
        memoised per prompt set and decoding mode."""
        mode = mode or self.decoding.mode
        key = (mode, tuple(prompts))
        if profile is None and key in self._unsteered:
            return list(self._unsteered[key])
        d = self.decoding
        out = judge_prompts(self.lm, prompts, self.judge, profile=profile, mode=mode, k=d.k,
                            max_new_tokens=d.max_new_tokens, cache=self.cache, seed=d.seed,
                            batch_size=self.batch_size, show_progress=self.show_progress)
        if profile is None:
            self._unsteered[key] = list(out)
        return out

    def scores(self, prompts: Sequence[str], profile: Profile | None = None
               ) -> list[PromptScore]:
        """Paper A's confidence protocol in full: every sampled answer, its weight and vote,
        and c(x) per prompt."""
        d = self.decoding
        return score_prompts(self.lm, prompts, self.judge, k=d.k, mode=d.mode,  # type: ignore[arg-type]
                             max_new_tokens=d.max_new_tokens, profile=profile, seed=d.seed,
                             signed=d.signed, cache=self.cache, batch_size=self.batch_size,
                             show_progress=self.show_progress)

    def judged_texts(self, prompts: Sequence[str], profile: Profile | None = None
                     ) -> tuple[list[str], list[Judgement]]:
        """Greedy answers (after any thinking) and the judge's own judgement of each: for
        analyses that read the judge's label and style rather than c(x)."""
        gens = generate(self.lm, list(prompts), profile=profile,
                        max_new_tokens=self.decoding.max_new_tokens,
                        batch_size=self.batch_size, show_progress=self.show_progress,
                        logprobs=False)
        texts = [g[0].answer for g in gens]
        judge = CachedJudge(self.judge, self.cache) if self.cache is not None else self.judge
        return texts, judge.judge(list(prompts), texts)

    def remember(self, prompts: Sequence[str], judged: Sequence[Judged]) -> None:
        """Unsteered answers computed earlier (a resumed stage) stand for a fresh run."""
        if len(judged) != len(prompts) or any(
                j.prompt != p for j, p in zip(judged, prompts, strict=True)):
            raise ValueError("unsteered judgements must be of the same prompts, in order")
        self._unsteered[self.decoding.mode, tuple(prompts)] = list(judged)

    def gated_answers(self, prompts: Sequence[str], profile: Profile
                      ) -> tuple[list[Judged], torch.Tensor]:
        """Judged answers under a profile, generating only where its gate opens (the other
        rows are the unsteered answers); returns the answers and the gate's decisions."""
        gate = gate_of(profile)
        if gate is None:
            return self.answers(prompts, profile), torch.ones(len(prompts), dtype=torch.bool)
        opened = self.opened(gate, prompts)
        out = self.answers(prompts)  # a closed gate adds nothing: those rows stay unsteered
        rows = opened.nonzero()[:, 0].tolist()
        for i, j in zip(rows, self.answers([prompts[i] for i in rows], lift_gate(profile)),
                        strict=True):
            out[i] = j
        return out, opened

    def opened(self, gate: Gate, prompts: Sequence[str]) -> torch.Tensor:
        """The gate's decision per prompt, memoised per (gate, prompt set)."""
        key = (id(gate), tuple(prompts))
        if key not in self._opened:  # the gate is kept with its decisions: its id stays valid
            self._opened[key] = (gate, gate_open(self.lm, gate, prompts,
                                                 batch_size=self.batch_size))
        return self._opened[key][1]

    def logprobs(self, prompts: Sequence[str], profile: Profile | None = None
                 ) -> torch.Tensor:
        """Next-token log-probs at the last prompt position [n, vocab]; unsteered ones are
        memoised per prompt set."""
        key = tuple(prompts)
        if profile is None and key in self._logprobs:
            return self._logprobs[key]
        out = last_logprobs(self.lm, prompts, profile=profile, batch_size=self.batch_size)
        if profile is None:
            self._logprobs[key] = out
        return out
