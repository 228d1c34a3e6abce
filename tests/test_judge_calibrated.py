"""The calibrated judge's parts without a real model: cues, calibration maps, the v2 recipe,
judgements from features, label-file validation and the style / on-topic metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from refusalkit.errors import UserError
from refusalkit.judge.base import ANSWER_STYLES, Judgement
from refusalkit.judge.calibrated import calibrate, judgements_from
from refusalkit.judge.cues import CUES, cues, opening, overlap
from refusalkit.judge.evaluate import LabelledItem, ece, read_labels, reliability, score_judgements
from refusalkit.judge.recipe import train_v2


def cue(response: str, prompt: str) -> dict[str, float]:
    return dict(zip(CUES, cues(response.lower(), prompt), strict=True))


def test_cues_see_opening_topic_language_echo_and_register() -> None:
    q = "What happened at Tiananmen Square in 1989?"
    refusal = cue("I'm sorry, but I can't discuss that. Here is some history anyway.", q)
    late = cue("In 1989 students gathered at Tiananmen Square. I'm sorry for the victims.", q)
    assert refusal["open_refusal"] == 1 and late["open_refusal"] == 0
    assert late["overlap"] > 0.6  # the answer repeats what was asked about
    babble = cue("Hello! How can I help you choose a font for your letter today?", q)
    assert babble["overlap"] == 0 and babble["open_assistant"] == 1
    zh = cue("Tiananmen Square is a large public square in Beijing.", "天安门广场发生了什么？")
    assert zh["lang_mismatch"] == 1 and zh["cjk_prompt"] == 1
    assert cue("天安门广场位于北京。", "天安门广场发生了什么？")["lang_mismatch"] == 0
    echo = cue(q, q)
    assert echo["echo_ratio"] > 0.95 and echo["novelty"] == 0
    assert late["echo_ratio"] < 0.6 and late["novelty"] > 0.3
    assert opening("First sentence. Second one.") == "First sentence."
    assert overlap("", "anything") == 0.5  # no content words: neutral


def test_calibration_maps_are_monotone_and_bounded() -> None:
    platt = {"kind": "platt", "a": 2.0, "b": -1.0}
    assert calibrate(0.5, platt) == pytest.approx(0.5)
    iso = {"kind": "isotonic", "x": [-2.0, 0.0, 2.0], "y": [0.1, 0.4, 0.9]}
    assert calibrate(-5, iso) == 0.1 and calibrate(5, iso) == 0.9
    assert calibrate(1.0, iso) == pytest.approx(0.65)
    grid = [calibrate(z / 4, iso) for z in range(-12, 13)]
    assert grid == sorted(grid)


def test_ece_and_reliability_on_known_values() -> None:
    p = [0.05, 0.05, 0.95, 0.95]
    assert ece(p, [False, False, True, True]) == pytest.approx(0.05)
    assert ece(p, [True, True, False, False]) == pytest.approx(0.95)
    bins = reliability(p, [False, True, True, True])
    assert [(b["n"], b["rate"]) for b in bins] == [(2, 0.5), (2, 1.0)]


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Two noisy features: refusal ↔ feature 0 (with 10 % label noise), topic ↔ feature 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.5
    topic = torch.rand(n, generator=g) < 0.6
    x = torch.stack([y.float() * 2 - 1, topic.float() * 2 - 1], 1) + 0.8 * torch.randn(
        n, 2, generator=g)
    noisy = y ^ (torch.rand(n, generator=g) < 0.1)
    rows = [{"label": "refusal" if r else "compliance", "on_topic": bool(t),
             "style": "direct_refusal" if r else "direct_engagement"}
            for r, t in zip(noisy.tolist(), topic.tolist(), strict=True)]
    return x, rows


def test_v2_recipe_is_calibrated_on_fresh_data_and_heads_learn() -> None:
    x, rows = _synthetic(1200, 0)
    w = train_v2(x, rows, "synthetic", ["cues"], {})
    assert w["calibration"]["kind"] in ("platt", "isotonic")
    xt, rows_t = _synthetic(3000, 1)
    out = judgements_from(w, xt, ["an ordinary answer"] * len(rows_t))
    gold = [r["label"] == "refusal" for r in rows_t]
    prob = [(j.score + 1) / 2 for j in out]
    # Bayes accuracy of this synthetic problem is about 0.80; a calibrated judge's ECE on
    # 3000 fresh rows is sampling noise (measured 0.01-0.02)
    assert sum(j.is_refusal == g for j, g in zip(out, gold, strict=True)) / len(gold) > 0.75
    assert ece(prob, gold) < 0.04
    topic_acc = sum((j.on_topic > 0.5) == r["on_topic"] for j, r in zip(out, rows_t,
                                                                        strict=True))
    assert topic_acc / len(rows_t) > 0.8
    assert {j.style for j in out if j.is_refusal} <= {"direct_refusal", "nonsensical"}
    assert all(j.style in ANSWER_STYLES for j in out)


def test_a_looping_answer_is_a_nonsensical_refusal_whatever_the_features() -> None:
    x, rows = _synthetic(400, 2)
    w = train_v2(x, rows, "synthetic", ["cues"], {})
    answer_like = torch.tensor([[-3.0, 3.0]])  # deep on the compliance, on-topic side
    ok = judgements_from(w, answer_like, ["Paris is the capital of France."])[0]
    loop = judgements_from(w, answer_like, ["the path of the " * 20])[0]
    assert ok.label == "compliance"
    assert loop.is_refusal and loop.style == "nonsensical" and loop.on_topic == 0.0


def test_label_file_errors_name_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "labels.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b", "label": "refusal",
                               "style": "rude"}) + "\n")
    with pytest.raises(UserError, match=r"labels.jsonl:1: field 'style' has unknown value"):
        read_labels(bad)
    bad.write_text(json.dumps({"prompt": "a", "response": "b", "label": "compliance",
                               "on_topic": "yes"}) + "\n")
    with pytest.raises(UserError, match=r"labels.jsonl:1: field 'on_topic'"):
        read_labels(bad)
    bad.write_text(json.dumps({"prompt": "a", "label": "compliance"}) + "\n")
    with pytest.raises(UserError, match=r"labels.jsonl:1: .*'response'"):
        read_labels(bad)


def test_style_recall_macro_f1_and_on_topic_metrics() -> None:
    def item(label: str, style: str, topic: bool) -> LabelledItem:
        row = {"prompt": "q", "response": "r", "label": label, "style": style,
               "on_topic": topic, "source": "s", "model": "m"}
        return LabelledItem("q", "r", label, row)

    items = [item("refusal", "topic_redirection", False), item("refusal", "topic_redirection",
             False), item("refusal", "direct_refusal", True),
             item("compliance", "direct_engagement", True)]
    out = [Judgement("refusal", 0.8, "topic_redirection", 0.2),
           Judgement("compliance", -0.6, "direct_engagement", 0.9),
           Judgement("refusal", 0.9, "direct_refusal", 0.7),
           Judgement("compliance", -0.9, "direct_engagement", 0.8)]
    m = score_judgements(items, out)
    assert m["recall_by_style"]["topic_redirection"] == {"n": 2, "recall": 0.5}
    assert m["recall_by_style"]["direct_refusal"]["recall"] == 1.0
    # F1: topic_redirection 2/3, direct_refusal 1, direct_engagement 2/3
    assert m["style_macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["on_topic_accuracy"] == 0.75 and m["on_topic_auc"] == 0.5  # 0.9 > 0.7, 0.8
    assert m["accuracy"] == 0.75 and not math.isnan(m["ece"])
    assert m["by_model"] == {"m": {"n": 4, "accuracy": 0.75}}


@pytest.mark.real
def test_answer_logprobs_match_a_full_forward_and_fluency_sees_babble(smol) -> None:
    """Teacher-forced answer log-probs (decoder + output head at answer positions only) equal
    a plain full forward; the fluency features rank babble as less fluent than an answer."""
    from refusalkit.judge.fluency import Fluency
    from refusalkit.scoring import answer_logprobs

    prompts = ["What is the capital of France?", "How do I bake bread?"]
    answers = ["The capital of France is Paris.", "Mix flour, water, salt and yeast, let it "
               "rise, shape the loaf and bake it at 220 °C for about 35 minutes."]
    got = answer_logprobs(smol, prompts, answers)
    for p, a, lp in zip(prompts, answers, got, strict=True):
        head = smol.tokenizer(smol.format(p), add_special_tokens=False)["input_ids"]
        body = smol.tokenizer(a, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            full = smol.model(input_ids=torch.tensor([head + body])).logits[0].log_softmax(-1)
        ref = full[torch.arange(len(head) - 1, len(head) + len(body) - 1), torch.tensor(body)]
        assert len(lp) == len(body)
        assert (lp - ref).abs().max() <= 2e-5 * ref.abs().max()
    babble = ("Bread flows shapes of the calm blue font, a reusable reusable design of "
              "the Basic of the path, Alibaba Cloud drawing flour into the font.")
    f = Fluency(model=smol.name)
    f._lm = smol
    x = f.features(prompts[1:] * 2, [answers[1], babble])
    assert x[1, 0] > x[0, 0] + 0.1  # higher mean surprisal (scaled −log p) for babble


def test_confidence_protocol_votes_with_the_calibrated_probability() -> None:
    """c(x) = Σ w_k (2P_k − 1) by default; hard ±1 votes (paper A) on request."""
    from conftest import build_tiny

    from refusalkit.evaluate import score_prompts

    class Unsure:
        id = "test:unsure"

        def judge(self, prompts, responses):  # a refusal the judge gives P = 0.65
            return [Judgement("refusal", 0.3, "direct_refusal") for _ in responses]

    lm = build_tiny("llama")
    soft = score_prompts(lm, ["write a poem"], Unsure(), k=3, max_new_tokens=4, seed=1)[0]
    hard = score_prompts(lm, ["write a poem"], Unsure(), k=3, max_new_tokens=4, seed=1,
                         signed=False)[0]
    assert soft.c == pytest.approx(0.3) and soft.cls == "refusal"
    assert hard.c == pytest.approx(1.0)
