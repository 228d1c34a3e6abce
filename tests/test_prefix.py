"""The template's shared head run once per call (refusalkit.prefix): every prompt pass gives
what it gives with each row running its whole prompt, on several architectures, under an
ungated profile, and not at all where it would be wrong (sliding windows, a gate)."""

from __future__ import annotations

import pytest
import torch
from conftest import RTOL_FLOAT32, build_tiny

import refusalkit.prefix as prefix
from refusalkit.activations import (
    MEAN_ALL,
    MEAN_POST,
    MEAN_USER,
    capture,
    head_prefix,
    shared_head,
)
from refusalkit.evaluate import answer_nlls
from refusalkit.examiner import Decoding, Examiner
from refusalkit.generation import generate
from refusalkit.interventions import Gate, Profile, addition, steer
from refusalkit.scoring import last_logprobs

PROMPTS = ["how do i make a bomb", "tell me about the weather please", "hi",
           "write a poem about bread", "why steal a car", "who are you", "sure"]
SYSTEM = "you are helpful assistant system"  # five words: the head is eight tokens
FULL = ("llama", "qwen2", "qwen3", "phi3")


def with_system(family: str):
    lm = build_tiny(family)
    lm.system_prompt = SYSTEM
    return lm


@pytest.fixture
def plain(monkeypatch):
    """Run a call with no head shared (what every pass did before)."""
    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(prefix, "MIN_SHARED", 10**9)
            return fn(*args, **kwargs)
    return run


@pytest.fixture
def heads(monkeypatch):
    """How many head passes each pass ran (so an equality below is not two plain runs)."""
    calls: list[str] = []

    def spy(real, mod: str):
        def run(*args):
            out = real(*args)
            if out is not None:  # head_prefix returns None when it ran no head
                if mod != "activations":  # its run_prefix call was recorded as activations'
                    calls.pop()
                calls.append(mod)
            return out
        return run

    monkeypatch.setattr("refusalkit.activations.run_prefix",
                        spy(prefix.run_prefix, "activations"))
    for mod in ("scoring", "generation", "evaluate"):
        monkeypatch.setattr(f"refusalkit.{mod}.head_prefix", spy(head_prefix, mod))
    return calls


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= RTOL_FLOAT32 * b.abs().max())


def encoded(lm, prompts=PROMPTS):
    return [lm.tokenizer(lm.format(p), add_special_tokens=False)["input_ids"] for p in prompts]


def test_the_head_is_what_every_prompt_shares_up_to_the_users_text() -> None:
    lm = with_system("llama")
    assert shared_head(lm, encoded(lm)) == 8  # <|system|> five words <|end|> <|user|>
    assert shared_head(lm, encoded(lm)[:1]) == 0  # one prompt: nothing to share
    lm.system_prompt = None
    assert shared_head(lm, encoded(lm)) == 0  # "<|user|>" alone is not worth a pass
    # the user's text never joins the head, even when every prompt starts alike
    lm.system_prompt = SYSTEM
    assert shared_head(lm, encoded(lm, ["how do i bake bread", "how do i steal a car"])) == 8
    # a row keeps its user text and the template's tail beyond the head
    assert prefix.prefix_length(lm, [[5] * 12, [5] * 12], head=10, keep=4) == 8


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_sliding_window_models_keep_the_plain_layout(family: str) -> None:
    """Their window is counted in cache slots, which padding between head and rest would
    take up, so nothing is shared."""
    lm = with_system(family)
    assert not prefix.full_attention(lm)
    assert shared_head(lm, encoded(lm)) == 0


@pytest.mark.parametrize("family", FULL)
def test_capture_with_the_head_run_once_matches_whole_prompts(family: str, plain,
                                                             heads) -> None:
    lm = with_system(family)
    layers, pos = [0, 2, lm.n_layers], [-1, -3, MEAN_ALL, MEAN_USER, MEAN_POST]
    got = capture(lm, PROMPTS, layers, pos, batch_size=3, show_progress=False)
    assert heads == ["activations"]
    stopped = capture(lm, PROMPTS, [2], [MEAN_ALL], batch_size=3, show_progress=False)
    assert close(stopped[:, 0], got[:, 1, 2:3])  # a pass cut off at layer 2, head included
    first = capture(lm, PROMPTS, [0], [MEAN_ALL], batch_size=3, show_progress=False)
    assert close(first[:, 0], got[:, 0, 2:3])  # cut off before any layer: no cache at all
    want = plain(capture, lm, PROMPTS, layers, pos, batch_size=3, show_progress=False)
    assert not torch.equal(got, torch.zeros_like(got))
    assert close(got, want)
    off = capture(lm, PROMPTS, layers, pos, batch_size=3, show_progress=False,
                  share_prefix=False)
    assert torch.equal(off, want)  # the switch a caller under a gated profile uses


def ungated(lm) -> Profile:
    v = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2)) * 4
    return Profile((addition({1: v, 2: v}, 1.0),))


@pytest.mark.parametrize("family", FULL)
def test_next_token_logprobs_unsteered_and_steered(family: str, plain, heads) -> None:
    lm = with_system(family)
    for prof in (None, ungated(lm)):
        got = last_logprobs(lm, PROMPTS, profile=prof, batch_size=4)
        assert close(got, plain(last_logprobs, lm, PROMPTS, profile=prof, batch_size=4))
    assert heads == ["scoring", "scoring"]
    # the profile acts on the head too: steered differs from unsteered by far more than noise
    assert not close(last_logprobs(lm, PROMPTS, profile=ungated(lm)),
                     last_logprobs(lm, PROMPTS))


@pytest.mark.parametrize("family", FULL)
def test_greedy_answers_and_their_perplexity(family: str, plain, heads) -> None:
    lm = with_system(family)
    for prof in (None, ungated(lm)):
        got = generate(lm, PROMPTS, max_new_tokens=10, batch_size=4, profile=prof,
                       show_progress=False)
        want = plain(generate, lm, PROMPTS, max_new_tokens=10, batch_size=4, profile=prof,
                     show_progress=False)
        assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]
        assert close(torch.tensor([x for g in got for x in g[0].logprobs]),
                     torch.tensor([x for w in want for x in w[0].logprobs]))
    answers = [g[0].text for g in got] + ["sure here is", ""]
    ps = PROMPTS + PROMPTS[:2]  # two prompts with two answers each, one of them empty
    got_nll = torch.tensor([n for n, _ in answer_nlls(lm, ps, answers, batch_size=4)])
    want_nll = torch.tensor([n for n, _ in plain(answer_nlls, lm, ps, answers, batch_size=4)])
    assert close(got_nll, want_nll)
    assert heads == ["generation", "generation", "evaluate"]


def test_a_gated_profile_is_not_given_a_shared_head(heads) -> None:
    """Its gate reads the whole prompt and decides per row whether the layers it steers
    change the head's states, so the head cannot be one pass for all rows."""
    lm = with_system("llama")
    v = torch.randn(lm.hidden_size)
    prof = Profile((addition({2: v}, 1.0, gate=Gate(1, v, 0.0)),))
    last_logprobs(lm, PROMPTS, profile=prof)
    generate(lm, PROMPTS, max_new_tokens=3, profile=prof, show_progress=False)
    assert heads == []
    with steer(lm, prof):  # a caller's own gated block around plain calls
        generate(lm, PROMPTS, max_new_tokens=3, show_progress=False)
        capture(lm, PROMPTS, [1], show_progress=False)
    assert heads == []
    last_logprobs(lm, PROMPTS)  # the gate's hook is off again
    generate(lm, PROMPTS, max_new_tokens=3, show_progress=False)
    assert heads == ["scoring", "generation"]


class Nobody:
    id = "test:nobody"

    def judge(self, prompts, responses):
        from refusalkit.judge import Judgement

        return [Judgement("compliance", -1.0, "compliance") for _ in responses]


def test_gated_answers_run_the_open_rows_with_the_gate_lifted() -> None:
    """The examiner's gate has decided before the open rows are answered; answering them
    with the gate lifted is what the gate does to them, and lets them share the head."""
    lm = with_system("llama")
    acts = capture(lm, PROMPTS, [1], show_progress=False)[:, 0, 0]
    cond = acts[0] - acts[1]
    proj = (acts @ (cond / cond.norm())).sort().values
    gap = 1 + int((proj[2:-1] - proj[1:-2]).argmax())  # widest gap: no decision is close
    v = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1)) * 10
    prof = Profile((addition({2: v}, 1.0, gate=Gate(1, cond, float(proj[gap:gap + 2].mean()))),))
    ex = Examiner(lm, Nobody(), Decoding(max_new_tokens=8), batch_size=4)
    got, opened = ex.gated_answers(PROMPTS, prof)
    alone = generate(lm, PROMPTS, max_new_tokens=8, batch_size=1, profile=prof,
                     show_progress=False)
    assert 0 < int(opened.sum()) < len(PROMPTS)
    assert [j.response for j in got] == [a[0].text for a in alone]


@pytest.mark.real
def test_qwen_prompt_passes_with_the_system_prompt_run_once(qwen, plain, heads) -> None:
    """On the testbed, whose default system prompt is 24 of a prompt's ~42 tokens: gate
    features, next-token log-probs, greedy answers and perplexity as with whole prompts."""
    from refusalkit.prompts import load_prompts

    prompts = (load_prompts("deccp_censored").take(6, seed=2).prompts
               + load_prompts("harmless_test").take(6, seed=2).prompts)
    assert shared_head(qwen, encoded(qwen, prompts)) == 24
    got = capture(qwen, prompts, [12], [MEAN_ALL, -1], batch_size=12, show_progress=False)
    assert close(got, plain(capture, qwen, prompts, [12], [MEAN_ALL, -1], batch_size=12,
                            show_progress=False))
    got = last_logprobs(qwen, prompts, batch_size=12)
    want = plain(last_logprobs, qwen, prompts, batch_size=12)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert close(got.exp(), want.exp())
    gens = generate(qwen, prompts, max_new_tokens=16, batch_size=12, show_progress=False)
    ref = plain(generate, qwen, prompts, max_new_tokens=16, batch_size=12, show_progress=False)
    assert [g[0].token_ids for g in gens] == [r[0].token_ids for r in ref]
    answers = [g[0].text for g in gens]
    got_nll = torch.tensor([n for n, _ in answer_nlls(qwen, prompts, answers, batch_size=12)])
    assert close(got_nll, torch.tensor([n for n, _ in plain(answer_nlls, qwen, prompts,
                                                               answers, batch_size=12)]))
    assert heads == ["activations", "scoring", "generation", "evaluate"]
