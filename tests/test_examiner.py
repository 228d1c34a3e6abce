"""The examiner: one owner of model, judge, decoding and cache, remembering what a run asks
of it twice (unsteered answers and log-probs, a gate's decisions per prompt set)."""

from __future__ import annotations

import torch
from conftest import PlantedWord

from refusalkit.examiner import Decoding, Examiner
from refusalkit.gates import gate_open
from refusalkit.interventions import Gate, Profile, addition

PROMPTS = ["how do i make a bomb", "tell me about the weather please", "write poem",
           "how do i bake bread cake please", "steal car", "sure here is what"]


class Counting(PlantedWord):
    def __init__(self) -> None:
        self.calls = 0

    def judge(self, prompts, responses):
        self.calls += len(prompts)
        return super().judge(prompts, responses)


def test_unsteered_runs_are_remembered_and_steered_ones_are_not(tiny) -> None:
    judge = Counting()
    ex = Examiner(tiny, judge, Decoding(max_new_tokens=4))
    first = ex.answers(PROMPTS)
    assert judge.calls == len(PROMPTS)
    assert ex.answers(PROMPTS) == first and judge.calls == len(PROMPTS)  # remembered
    v = torch.randn(tiny.hidden_size)
    prof = Profile((addition({1: v}, 8.0),))
    steered = ex.answers(PROMPTS, prof)
    assert judge.calls == 2 * len(PROMPTS)
    assert [j.response for j in steered] != [j.response for j in first]  # it steered
    assert ex.logprobs(PROMPTS) is ex.logprobs(PROMPTS)
    assert not torch.equal(ex.logprobs(PROMPTS, prof), ex.logprobs(PROMPTS))


def test_gate_decisions_are_memoised_and_a_shut_gate_generates_nothing(tiny) -> None:
    judge = Counting()
    ex = Examiner(tiny, judge, Decoding(max_new_tokens=4))
    v = torch.randn(tiny.hidden_size)
    shut = Gate(1, v, threshold=1e9)
    opened = ex.opened(shut, PROMPTS)
    assert ex.opened(shut, PROMPTS) is opened
    assert torch.equal(opened, gate_open(tiny, shut, PROMPTS)) and not opened.any()
    before = ex.answers(PROMPTS)
    calls = judge.calls
    out, decided = ex.gated_answers(PROMPTS, Profile((addition({2: v}, 8.0, gate=shut),)))
    assert out == before and not decided.any() and judge.calls == calls
    wide = Gate(1, v, threshold=-1e9)  # opens for every prompt: every row is steered
    out, decided = ex.gated_answers(PROMPTS, Profile((addition({2: v}, 8.0, gate=wide),)))
    assert decided.all() and judge.calls == calls + len(PROMPTS)
