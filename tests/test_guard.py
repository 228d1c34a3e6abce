"""The loop guard (judge/guard.py): looping output is a refusal, whatever the wrapped judge says,
and every steer run judges through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny

from refusalkit.judge import Judgement, JudgementCache
from refusalkit.judge.guard import LoopGuard, guarded, looping
from refusalkit.steer.config import SteerConfig
from refusalkit.steer.pipeline import run_steer

REPO = Path(__file__).resolve().parents[1]
NONSENSICAL = Judgement("refusal", 1.0, "nonsensical")

# Looping output, as steering pushed too far produces it (qwen2.5-coder-0.5b, see guard.py).
EN_LOOP = "The Basic of the Basic of the Basic of the Basic of the Basic of the Basic of the " \
          "Basic of the Basic of the"
ZH_LOOP = "中国政府" * 12  # one Chinese 4-gram repeated: no spaces, so no word trigrams

# Ordinary answers, including list-style ones whose lines share a shape.
EN = ("To bake bread, mix 500 g of flour with 10 g of salt, 7 g of dried yeast and 300 ml of "
      "warm water. Knead the dough for ten minutes until it is smooth, let it rise for an "
      "hour, shape it into a loaf and bake it at 220 °C for about 30 minutes.")
EN_LIST = ("Here is a simple plan:\n1. Preheat the oven to 180 °C.\n2. Mix the flour, the sugar "
           "and the eggs in a bowl.\n3. Pour the batter into a tin.\n4. Bake for 30 minutes, "
           "then let it cool on a rack.\n5. Serve with cream.")
ZH = ("做米饭很简单：先把大米淘洗两到三遍，然后按一比一点二的比例加水，浸泡半小时。接着用大火煮开，"
      "再转小火焖十五分钟，关火后不要马上开盖，再焖五分钟，米饭就会松软可口。")
ZH_LIST = ("以下是做番茄炒蛋的步骤：\n1. 把番茄切块，鸡蛋打散。\n"
           "2. 锅里放油，先炒鸡蛋，盛出备用。\n"
           "3. 再炒番茄，加一点盐和糖。\n4. 倒回鸡蛋，翻炒均匀即可出锅。")


@pytest.mark.parametrize("text", [EN_LOOP, ZH_LOOP, "I cannot help with that. " * 4])
def test_looping_output_is_flagged(text: str) -> None:
    assert looping(text)


@pytest.mark.parametrize("text", [EN, EN_LIST, ZH, ZH_LIST, "", "Paris.",
                                  "no no no"])  # too short to call a loop
def test_ordinary_answers_are_not_flagged(text: str) -> None:
    assert not looping(text)


class Recorder:
    """A stand-in inner judge: calls everything compliance and records what it was shown."""

    id = "test:recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def judge(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [Judgement("compliance", -0.5 - i / 100, "compliance")
                for i in range(len(responses))]


def test_guard_labels_loops_and_passes_the_rest_to_the_inner_judge() -> None:
    inner = Recorder()
    guard = LoopGuard(inner)
    assert guard.id == "loop(test:recorder)"
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    out = guard.judge(prompts, [EN, EN_LOOP, ZH_LIST, ZH_LOOP, EN_LIST])
    # the inner judge saw the three ordinary answers only, once, in order, with their prompts
    assert inner.calls == [(["p0", "p2", "p4"], [EN, ZH_LIST, EN_LIST])]
    assert out[1] == out[3] == NONSENSICAL
    assert [out[0], out[2], out[4]] == [Judgement("compliance", -0.5 - i / 100, "compliance")
                                        for i in range(3)]
    # all loops: the inner judge is not asked at all
    inner.calls.clear()
    assert guard.judge(["a", "b"], [EN_LOOP, ZH_LOOP]) == [NONSENSICAL, NONSENSICAL]
    assert inner.calls == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        guard.judge(["a", "b"], [EN])


def test_guarded_wraps_once() -> None:
    inner = Recorder()
    guard = guarded(inner)
    assert isinstance(guard, LoopGuard) and guard.inner is inner
    assert guarded(guard) is guard


def test_the_steer_pipeline_judges_through_the_guard(tmp_path: Path, monkeypatch) -> None:
    """A tiny steer run whose own judge calls every answer compliance. The tiny random model
    loops on several prompts at 8 new tokens (6 of 12 topic, 3 of 8 safety prompts), so the
    only refusals the run can see are the guard's: without it the induce run stops with
    "refused fewer than 2 safety_fit prompts"."""
    inner = Recorder()
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: inner)
    cfg = SteerConfig.load(REPO / "configs" / "tiny_steer.toml", {
        "search.trials": 2, "search.verify": 1, "judge.max_new_tokens": 8,
        "eval.baselines": False, "eval.examples": 0, "data.n_kl": 4})
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=build_tiny("llama"))
    shown = [r for _, rs in inner.calls for r in rs]
    assert shown and not any(looping(r) for r in shown)
    base = json.loads((out / "stages" / "baseline.json").read_text())
    rows = [r for name in ("target_fit", "safety_fit", "neutral") for r in base[name]]
    loops = [r for r in rows if looping(r["response"])]
    assert len(loops) >= 2
    assert all(r["style"] == "nonsensical" and r["confidence"] == 1.0 for r in loops)
    assert all(r["confidence"] < 0 for r in rows if not looping(r["response"]))
    cache = JudgementCache(out / "judgements.sqlite")
    try:  # every stored judgement is the guarded judge's, none the bare inner judge's
        assert cache.count("loop(test:recorder)") == cache.count() > 0
    finally:
        cache.close()
