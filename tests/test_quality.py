"""What an answer is worth (quality.py): the flags per answer, their rates, and per-answer
perplexity under a model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny

from refusalkit.evaluate import answer_nlls, full_pass_nlls, response_nll, shared_prompt_nlls
from refusalkit.quality import assess, perplexities, rates


def test_an_answer_is_useful_only_when_complying_on_topic_and_not_looping() -> None:
    q = "How do I bake bread?"
    good = assess(q, "Mix flour, water, salt and yeast, knead, let it rise, bake.", -0.8, 0.9)
    assert good.useful and not good.refusal and good.language_match
    assert not assess(q, "Choose a font that is easy to read.", -0.8, 0.1).useful  # off topic
    assert not assess(q, "I'm sorry, I can't help with that.", 0.9, 0.8).useful  # refusal
    assert not assess(q, "Bread is bread. " * 12, -0.8, 0.9).useful  # loop
    assert assess(q, "Bread is bread. " * 12, -0.8, 0.9).loop
    assert assess(q, "Mix flour and water.", -0.8, None).useful is None  # judge cannot tell
    assert not assess("如何烤面包？", "Mix flour, water and yeast, then bake.", -0.8, 0.9
                      ).language_match


def test_rates_average_what_was_measured() -> None:
    qs = [assess("q", "Mix flour and water.", -0.8, 0.9, 4.0),
          assess("q", "I'm sorry, I can't.", 0.9, 0.2, 2.0),
          assess("q", "", 0.0, None, None)]
    r = rates(qs)
    assert r["refusal"] == pytest.approx(1 / 3) and r["useful"] == pytest.approx(1 / 2)
    assert r["on_topic"] == pytest.approx(1 / 2) and r["perplexity"] == pytest.approx(3.0)
    assert perplexities([(2.0, 2), (0.0, 0)]) == [pytest.approx(math.e), None]


def test_per_answer_nlls_sum_to_the_total(tiny) -> None:
    prompts, answers = ["hello there", "how are you", "x"], ["fine thanks", "", "ok ok"]
    per = answer_nlls(tiny, prompts, answers, batch_size=2)
    assert per[1] == (0.0, 0) and all(c > 0 for i, (_, c) in enumerate(per) if i != 1)
    total, n = response_nll(tiny, prompts, answers)
    assert n == sum(c for _, c in per)
    assert total == pytest.approx(sum(x for x, _ in per), rel=1e-5)
    alone = answer_nlls(tiny, prompts[:1], answers[:1])[0]  # batching does not change it
    assert alone[0] == pytest.approx(per[0][0], rel=1e-4) and alone[1] == per[0][1]
    for p, a, (nll, count) in zip(prompts, answers, per, strict=True):
        if not a:
            continue
        ids_p = tiny.tokenizer(tiny.format(p), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids_p + tiny.tokenizer(a, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():  # every position's logits, no padding: the reference
            logp = tiny.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        ref = -logp[len(ids_p) - 1:].gather(-1, ids[0, len(ids_p):, None]).sum()
        assert count == ids.shape[1] - len(ids_p)
        assert nll == pytest.approx(float(ref), rel=1e-4), (p, a)


LONG = "tell me about the weather please and write a poem story about bread cake and a car"
SHARED = (["hello there", "how are you", "hello there", "x", "how are you", "hello there",
           LONG, LONG],
          ["fine thanks", "ok", "bake bread cake", "ok ok", "", "sorry cannot help sure",
           "sure here is what you are a helpful assistant why who when sorry",
           "bake bread cake bake bread cake"])  # LONG + answer passes gemma3's 16-token window


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3"])
def test_answers_sharing_a_prompt_pass_score_as_one_pass_each(family: str) -> None:
    """Several answers per prompt, some of one token, one empty, groups split by the row
    budget: the shared prompt pass gives each answer's NLL of a full pass."""
    lm = build_tiny(family)
    prompts, answers = SHARED
    for rows in (2, 3, 16):
        shared = shared_prompt_nlls(lm, prompts, answers, batch_size=rows)
        full = full_pass_nlls(lm, prompts, answers, batch_size=rows)
        assert [c for _, c in shared] == [c for _, c in full] and shared[4] == (0.0, 0)
        for (a, _), (b, _) in zip(shared, full, strict=True):
            assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.real
def test_qwen_shared_prompt_pass_matches_full_passes(qwen) -> None:
    from refusalkit.prompts import load_prompts

    ps = load_prompts("harmless_test").take(4, seed=5).prompts
    prompts = [p for p in ps for _ in range(3)]
    answers = ["I'm sorry, but I can't assist with that.", "Sure. Here is a short answer.",
               "Paris is the capital of France."] * len(ps)
    shared = shared_prompt_nlls(qwen, prompts, answers, batch_size=5)
    full = full_pass_nlls(qwen, prompts, answers, batch_size=5)
    for (a, n), (b, m) in zip(shared, full, strict=True):
        assert n == m and a == pytest.approx(b, rel=1e-3)


@pytest.mark.real
def test_a_fluent_answer_has_lower_perplexity_than_its_words_shuffled(qwen) -> None:
    prompt = "How do I bake bread at home?"
    fluent = ("Mix flour, water, salt and yeast into a dough, knead it for ten minutes, let it "
              "rise for an hour, shape it and bake it at 220 degrees for thirty minutes.")
    words = fluent.split()
    shuffled = " ".join(words[i] for i in sorted(range(len(words)), key=lambda i: (i * 7) % 31))
    a, b = perplexities(answer_nlls(qwen, [prompt, prompt], [fluent, shuffled]))
    assert a is not None and b is not None and a * 3 < b, (a, b)
