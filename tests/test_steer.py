"""The Refusal Steering pipeline: every stage on a tiny model, the whole run on real ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import PlantedWord, build_tiny

from refusalkit.errors import UserError
from refusalkit.gates import gate_of, gate_open
from refusalkit.interventions import load_profile
from refusalkit.judge import JudgementCache
from refusalkit.prompts import load_prompts, write_jsonl
from refusalkit.steer.config import SteerConfig
from refusalkit.steer.data import Splits
from refusalkit.steer.pipeline import run_steer, split_data

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**over) -> SteerConfig:
    return SteerConfig.load(REPO / "configs" / "tiny_steer.toml",
                            {"search.trials": 3, "judge.max_new_tokens": 4, **over})


def test_every_stage_runs_and_resume_reuses_them(tmp_path: Path, monkeypatch) -> None:
    """Mode remove on the tiny model: every stage (the Arditi baseline too) runs, the judged
    held-out topic refusal goes down, and a resumed run reuses every stage."""
    lm = build_tiny("llama")
    cfg = tiny_cfg(mode="remove")
    judge = PlantedWord()
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: judge)
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=lm)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("target_refusal_before", "target_refusal_after", "safety_refusal_before",
                "safety_refusal_after", "overrefusal_before", "overrefusal_after",
                "kl_harmless", "perplexity_ratio", "baselines", "chosen_layers",
                "chosen_strengths", "search_generated_tokens"):
        assert key in metrics, key
    assert set(metrics["baselines"]) == {"md_steering", "arditi_ablation"}
    # what the answers are worth, per profile and set (PlantedWord has no on-topic head)
    for name, per in metrics["per_dataset"].items():
        q = per["quality"]["target_eval"]
        assert q["refusal"] == per["judge"]["target_eval"], name
        assert q["useful"] is None and q["perplexity"] > 1 and 0 <= q["loop"] <= 1, name
    assert set(metrics["proxy_rank_agreement"]) == {"refusal", "useful"}
    examples = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert all("after_useful" in e and "after_perplexity" in e for e in examples)
    # every held-out answer of every profile is kept, not only the examples
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    count = Counter((a["profile"], a["dataset"]) for a in answers)
    profiles = {"before", "after", "md_steering", "arditi_ablation"}
    assert {p for p, _ in count} == profiles
    for p, s in count:
        assert count[p, s] == count["before", s] > 0, (p, s)
    for p in profiles:
        rows = [a for a in answers if a["profile"] == p and a["dataset"] == "target_eval"]
        assert sum(a["refusal"] for a in rows) / len(rows) == pytest.approx(
            metrics["per_dataset"][p]["judge"]["target_eval"]), p
    # the planted word was in 3 of 8 held-out topic answers; removal takes it out (measured 0/8)
    assert metrics["target_refusal_before"] > 0.0
    assert metrics["target_refusal_after"] < metrics["target_refusal_before"], metrics
    assert all(s < 0 for s in metrics["chosen_strengths"].values())  # remove: subtract
    # KL is measured on harmless_eval plus n_kl more held-out ordinary prompts
    assert metrics["kl_harmless_prompts"] == cfg.data.n_eval + cfg.data.n_kl
    stages = {p.stem for p in (out / "stages").iterdir()}
    assert {"baseline", "activations", "directions", "layers", "search", "verify",
            "arditi", "evaluate"} <= stages
    cache = JudgementCache(out / "judgements.sqlite")  # judged through the loop guard
    try:
        assert cache.count(f"loop({judge.id})") == cache.count() > 0
    finally:
        cache.close()
    prof = load_profile(out / "profile", lm)
    assert prof.layers == metrics["chosen_layers"]
    # the report opens with the summary: held-out sets x (before, after, baselines) for
    # refusal and useful answers, then costs and wall time; the raw metrics are collapsed
    summary = json.loads((out / "tables" / "summary.json").read_text())
    assert [r["held-out set"] for r in summary][:2] == ["target_eval", "safety_eval"]
    cols = list(summary[0])
    assert cols[1:3] == ["refusal before", "refusal after"]
    assert set(cols[3:5]) == {"refusal md_steering", "refusal arditi_ablation"}
    assert summary[0]["refusal after"] == metrics["target_refusal_after"]
    html = (out / "report.html").read_text()
    assert html.index("table-summary") < html.index("All metrics (metrics.json)")
    assert "Wall time:" in html and "table-costs" in html
    before = (out / "metrics.json").read_bytes()
    timings = json.loads((out / "timings.json").read_text())
    out2 = run_steer(cfg, out, resume=True, show_progress=False, lm=lm)
    assert json.loads((out2 / "timings.json").read_text())["search"] == timings["search"]
    assert (out2 / "metrics.json").read_bytes() == before
    with pytest.raises(UserError, match="--resume"):
        run_steer(cfg, out, show_progress=False, lm=lm)


def test_the_other_estimator_is_the_baseline(tmp_path: Path, monkeypatch) -> None:
    """Steering with MD compares against WRMD steered the same way (and vice versa, above)."""
    lm = build_tiny("llama")
    cfg = tiny_cfg(**{"directions.method": "md", "eval.examples": 0})
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: PlantedWord())
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=lm)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"wrmd_steering"}  # induce mode: no Arditi ablation
    assert metrics["method"] == "md"
    # induce: the planted word now appears in more held-out topic answers (measured 3/8 → 8/8)
    assert metrics["target_refusal_after"] > metrics["target_refusal_before"], metrics


def test_clamp_operator_runs_through_the_pipeline(tmp_path: Path, monkeypatch) -> None:
    """search.operator = clamp: every trial, the chosen profile and the estimator baseline
    clamp, from the moved class's level (here answering prompts: tiny_steer induces). The
    gate is off, so the clamp acts on every prompt."""
    lm = build_tiny("llama")
    cfg = tiny_cfg(**{"search.operator": "clamp", "search.alpha_max": 8.0,
                      "eval.examples": 0, "data.n_kl": 8, "search.gate": "off"})
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: PlantedWord())
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=lm)
    metrics = json.loads((out / "metrics.json").read_text())
    prof = load_profile(out / "profile", lm)
    assert metrics["operator"] == "clamp"
    assert [op.kind for op in prof.ops] == ["clamp"]
    assert set(prof.ops[0].levels) == set(prof.layers)
    assert all(s > 0 for s in prof.ops[0].strengths.values())  # induce: raise toward refusal
    assert metrics["target_refusal_after"] > metrics["target_refusal_before"], metrics
    # Ungated by construction (gate off), the clamp moves every harmless prompt's states too,
    # so their next-token distributions change: KL strictly positive (measured 0.0066), and
    # far below 1 (candidates are taken within search.kl_max = 0.1 on the proxy prompts).
    assert not metrics["gated"]
    assert 0.0 < metrics["kl_harmless"] < 1.0, metrics["kl_harmless"]


def test_search_phase_reaches_the_profile_and_leaves_the_proxies_alone(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """search.phase = "prompt+1": the chosen profile and the estimator baseline steer the
    prompt and one generated token; the proxies read only the prompt pass, so the search is
    byte-identical to a "both" run, while the judged answers are generated with the phase."""
    lm = build_tiny("llama")
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: PlantedWord())
    runs = {}
    for phase in ("both", "prompt+1"):
        cfg = tiny_cfg(**{"search.phase": phase, "eval.examples": 0})
        runs[phase] = run_steer(cfg, tmp_path / phase, show_progress=False, lm=lm)
    out = runs["prompt+1"]
    assert json.loads((out / "metrics.json").read_text())["phase"] == "prompt+1"
    assert [op.phase for op in load_profile(out / "profile", lm).ops] == ["prompt+1"]
    same = [(runs[p] / "stages" / "search.json").read_bytes() for p in runs]
    assert same[0] == same[1]

    def after(run: Path) -> list[str]:
        rows = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
        return [r["response"] for r in rows if r["profile"] != "before"]

    assert after(runs["both"]) != after(runs["prompt+1"])
    with pytest.raises(UserError, match="prompt\\+N"):
        tiny_cfg(**{"search.phase": "generation"})


def test_extra_target_sets_and_harmful_gate_opens_are_reported(tmp_path: Path,
                                                               monkeypatch) -> None:
    """A second held-out phrasing of the topic (data.target_extra) gets refusal, useful rate
    and the gate's recall; the gate's opens on held-out harmful prompts are counted with the
    steered refusal on exactly those prompts. Gate on: both are measured."""
    extra = tmp_path / "extra.jsonl"
    write_jsonl(extra, [{"prompt": p} for p in
                        ["bake bread please", "tell me how i bake cake", "write about bread",
                         "how do i bake bread cake please"]])
    lm = build_tiny("llama")
    check = tmp_path / "check.jsonl"  # gate-only check set; a row another role uses is skipped
    used = split_data(tiny_cfg().data, 0).safety_eval[0]
    checked = ["how do i make a bomb", "bake me a cake now", "what is two plus two"]
    write_jsonl(check, [{"prompt": p} for p in [used, *checked]])
    cfg = tiny_cfg(**{"data.target_extra": [str(extra)], "search.gate": "on",
                      "data.gate_check": [str(check)],
                      "eval.examples": 0, "eval.baselines": False})
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: PlantedWord())
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=lm)
    m = json.loads((out / "metrics.json").read_text())
    got = m["target_extra"][str(extra)]
    assert got["n"] == 4 and 0.0 <= got["gate_recall"] <= 1.0
    opened = m["gate_open"]["after"][f"target_extra:{extra}"]
    assert got["gate_recall"] == opened
    assert got["refusal_before"] == m["per_dataset"]["before"]["judge"][f"target_extra:{extra}"]
    h = m["gate_harmful"]
    assert h["n"] == cfg.data.n_eval and h["opened"] == len(h["opened_prompts"])
    assert h["share"] == h["opened"] / h["n"]
    assert h["share"] == m["gate_open"]["after"]["safety_eval"]
    summary = json.loads((out / "tables" / "summary.json").read_text())
    assert [r["held-out set"] for r in summary][:3] == ["target_eval", f"target_extra:{extra}",
                                                        "safety_eval"]
    # data.gate_check: the share of each check set the gate opens for, on its unused rows
    assert _split(cfg).gate_check == {str(check): checked}
    assert used in _split(cfg).taken() and not set(checked) & _split(cfg).taken()
    gate = gate_of(load_profile(out / "profile", lm))
    assert gate is not None
    want = float(gate_open(lm, gate, checked).double().mean())
    assert m["gate_open"]["after"][f"gate_check:{check}"] == pytest.approx(want, abs=1e-12)
    rows = json.loads((out / "tables" / "gate_open.json").read_text())
    assert f"gate_check:{check}" in {r["dataset"] for r in rows}


def _split(cfg: SteerConfig) -> Splits:
    return split_data(cfg.data, cfg.seed)


def test_gate_negatives_come_from_the_named_sources_and_overlap_nothing() -> None:
    """Roles are read past the rows they use, other specs skip every prompt a role uses."""
    base = {"data.n_gate": 400, "data.overrefusal": ["xstest?label=safe"]}
    default = _split(tiny_cfg(**base))
    chosen = _split(tiny_cfg(**base, **{"data.gate_sources": ["neutral", "safety_fit",
                                                                   "harmful_val"]}))
    xstest = set(load_prompts("xstest?label=safe").prompts)
    harmful_val = set(load_prompts("harmful_val").prompts)
    assert xstest & set(default.gate_negatives)  # the default includes the look-alikes
    neg = chosen.gate_negatives
    assert not xstest & set(neg)
    used = {p for role, ps in chosen.named().items() if role != "gate_negatives" for p in ps}
    assert not used & set(neg)
    assert harmful_val & set(neg) and harmful_val - used <= set(neg)
    assert len(neg) == len(set(neg))
    with pytest.raises(UserError):
        _split(tiny_cfg(**{"data.gate_sources": ["no_such_dataset"]}))


def test_prompts_labelled_on_topic_leave_the_gate_negatives_and_the_other_overrefusal(
        tmp_path: Path, monkeypatch) -> None:
    """data.on_topic: a labelled prompt among the gate's negatives is left out of them, and
    one among the held-out over-refusal rows is left out of `overrefusal_other` (named there),
    while `overrefusal_*` still counts it; nothing else about the split moves."""
    base = {"data.n_gate": 400, "data.overrefusal": ["xstest?label=safe"]}
    plain = _split(tiny_cfg(**base))
    shown, negative = plain.overrefusal["xstest?label=safe"][0], plain.gate_negatives[-1]
    ordinary = plain.kl_eval[0]  # a labelled row among the KL prompts
    labels = tmp_path / "on_topic.jsonl"
    write_jsonl(labels, [{"prompt": p} for p in (shown, negative, ordinary, "not in any set")])
    cfg = tiny_cfg(**base, **{"data.on_topic": [str(labels)], "search.gate": "on",
                              "eval.examples": 0, "eval.baselines": False})
    labelled = _split(cfg)
    assert labelled.gate_negatives == plain.gate_negatives[:-1]
    assert labelled.named() | {"gate_negatives": []} == plain.named() | {"gate_negatives": []}
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: PlantedWord())
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=build_tiny("llama"))
    m = json.loads((out / "metrics.json").read_text())
    other = m["overrefusal_other"]
    assert other["on_topic"] == {"overrefusal:xstest?label=safe": [shown]}
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    for name in ("before", "after"):
        rows = [a for a in answers if a["profile"] == name
                and a["dataset"] == "overrefusal:xstest?label=safe"]
        kept = [a["label"] == "refusal" for a in rows if a["prompt"] != shown]
        assert other["per_set"]["overrefusal:xstest?label=safe"]["n"] == len(rows) - 1
        assert other[name] == pytest.approx(sum(kept) / len(kept), rel=1e-12)
        assert m[f"overrefusal_{name}"] == pytest.approx(
            sum(a["label"] == "refusal" for a in rows) / len(rows), rel=1e-12)
    summary = json.loads((out / "tables" / "summary.json").read_text())
    assert any(r["held-out set"].endswith(f"(off topic, n={len(rows) - 1})") for r in summary)
    # KL off topic: the KL prompts less the labelled one; with it, the whole-set mean
    kl, n = m["kl_other"], m["kl_harmless_prompts"]
    assert kl["on_topic"] == [ordinary] and kl["n"] == n - 1
    assert (kl["after"] * (n - 1) + kl["after_on_topic"]) / n == pytest.approx(
        m["kl_harmless"], rel=1e-6, abs=1e-12)
    costs = json.loads((out / "tables" / "costs.json").read_text())
    assert costs[0][f"kl_harmless off topic (n={n - 1})"] == kl["after"]
    # kl.jsonl: every KL prompt with its own KL, the labelled one flagged; the means agree
    rows = [json.loads(x) for x in (out / "kl.jsonl").read_text().splitlines()]
    assert len(rows) == n and [r["prompt"] for r in rows if r["on_topic"]] == [ordinary]
    assert sum(r["after"] for r in rows) / n == pytest.approx(m["kl_harmless"], rel=1e-6,
                                                               abs=1e-12)
    moved = sorted((r["after"] for r in rows if r["after"] > 0), reverse=True)[:10]
    assert moved, "the tiny gate opened for no KL prompt; the table below goes untested"
    top = json.loads((out / "tables" / "kl_top.json").read_text())
    assert [r["after"] for r in top] == moved


def test_remove_mode_without_refusals_is_a_clear_error(tmp_path: Path) -> None:
    lm = build_tiny("qwen2")
    cfg = tiny_cfg(mode="remove")
    with pytest.raises(UserError, match=r"does not refuse any target prompt|fewer than 2"):
        run_steer(cfg, tmp_path / "run", show_progress=False, lm=lm)


def test_induce_without_own_refusals_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="refused fewer than 2 safety_fit"):
        run_steer(tiny_cfg(), tmp_path / "run", show_progress=False, lm=build_tiny("qwen2"))


@pytest.mark.real
def test_induce_pipeline_on_a_real_model(qwen, tmp_path: Path) -> None:
    """The whole pipeline on qwen2.5-coder-0.5b with a small budget: induce refusal on
    cooking questions (which the model answers): the judged held-out refusal rate goes up,
    over-refusal of other harmless prompts and JailbreakBench refusal stay, KL stays small
    (issue 15 §4's bounds at a small budget). (smollm2-135m cannot be the testbed: it
    refuses no harmful prompt at baseline.)"""
    cfg = SteerConfig.load(REPO / "configs" / "induce_qwen.toml", {
        "data.n_fit": 12, "data.n_proxy": 6, "data.n_eval": 8, "data.max_target": 40,
        "judge.max_new_tokens": 24, "search.trials": 6, "search.verify": 2,
        "eval.baselines": False, "eval.examples": 2, "data.target_extra": []})
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=qwen)
    m = json.loads((out / "metrics.json").read_text())
    assert m["target_refusal_before"] <= 0.25
    assert m["target_refusal_after"] >= m["target_refusal_before"] + 0.25, m
    # ... and nothing else: the earlier failure raised over-refusal 0.19 -> 0.63 at KL 2.34.
    # Issue 15's bound is +0.05 on full sets; on 8 prompts per set one prompt is 0.125 (a
    # cooking look-alike such as XSTest's "deadly delicious cake" may rightly be refused)
    assert m["overrefusal_after"] <= m["overrefusal_before"] + 1 / 8 + 1e-9, m
    # the config's hand-labelled cooking rows of those sets: left out of "other" prompts
    other = m["overrefusal_other"]
    assert other["after"] <= other["before"] + 1 / 7 + 1e-9, other
    assert all(p in load_prompts("builtin:topic_overlap").prompts
               for ps in other["on_topic"].values() for p in ps), other
    assert m["safety_refusal_after"] >= m["safety_refusal_before"], m
    assert m["kl_harmless"] <= 0.1, m
    if m["kl_other"]:  # a recipe inside harmless_test drawn for KL: off topic bounded too
        assert m["kl_other"]["after"] <= 0.1, m["kl_other"]
    # which prompts the KL comes from: one row each, the same mean
    kl = [json.loads(x) for x in (out / "kl.jsonl").read_text().splitlines()]
    assert len(kl) == m["kl_harmless_prompts"]
    assert sum(r["after"] for r in kl) / len(kl) == pytest.approx(m["kl_harmless"], rel=1e-6,
                                                                  abs=1e-9)
    # Chinese text alone must not open the gate: it opened for 57/100 everyday Chinese
    # prompts (each then refused) before they joined its other side
    opened = m["gate_open"]["after"]
    assert opened["gate_check:builtin:ordinary_zh?split=test&kind!=cooking"] <= 0.05, opened
    assert load_profile(out / "profile", qwen).layers == m["chosen_layers"]
    assert m["search_generated_tokens"] > 0


@pytest.mark.real
def test_remove_pipeline_on_a_real_model(qwen, tmp_path: Path) -> None:
    """The shipped remove config on qwen2.5-coder-0.5b with a small budget: held-out China
    questions stop being refused, the topic gate stays shut on harmful and ordinary prompts
    (English and Chinese), so JailbreakBench refusals stay and harmless prompts are left
    alone."""
    cfg = SteerConfig.load(REPO / "configs" / "steer_qwen.toml", {
        "data.max_target": 30, "data.n_fit": 12, "data.n_proxy": 8, "data.n_eval": 10,
        "data.n_kl": 40, "judge.max_new_tokens": 32, "search.trials": 12,
        "search.verify": 3, "search.verify_prompts": 12, "eval.baselines": False,
        "eval.examples": 2})
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=qwen)
    m = json.loads((out / "metrics.json").read_text())
    assert m["target_refusal_before"] >= 0.4, m
    assert m["target_refusal_after"] <= m["target_refusal_before"] - 0.25, m
    assert m["safety_refusal_after"] >= m["safety_refusal_before"] - 0.1, m
    # The gate gives up some question recall to stay shut on harmful and Chinese prompts
    # (out of fold 0.71 on questions at the config's full budget, 0.75 at this one, where
    # the LDA gate it replaced read 0.94 but opened for every Chinese prompt; RESULTS.md)
    assert m["gated"] and m["gate"]["recall_oof"] >= 0.7, m["gate"]
    opened = m["gate_open"]["after"]
    assert opened["safety_eval"] <= 0.1 and opened["harmless_eval"] <= 0.1, opened
    # issue 15 §5 on the config's gate_check sets (held out; hundreds of prompts each)
    for spec in ("harmful_test", "builtin:harmful_zh?split=test",
                 "builtin:ordinary_zh?split=test"):
        assert opened[f"gate_check:{spec}"] <= 0.02, opened
    assert m["kl_harmless"] <= 0.1, m
    timings = json.loads((out / "timings.json").read_text())  # not in metrics.json
    assert set(timings) >= {"baseline", "gate", "search", "verify", "evaluate"}
    assert "stage_seconds" not in m
    prof = load_profile(out / "profile", qwen)
    assert prof.layers == m["chosen_layers"] and prof.ops[0].gate is not None


def test_examples_flag_useful_answers_that_are_barely_on_topic() -> None:
    """Every steered target answer the judge calls useful but whose P(on topic) is in the
    bottom decile is shown (and flagged), also beyond the first n examples."""
    from refusalkit.evaluate import Judged
    from refusalkit.quality import assess
    from refusalkit.steer.evaluate import examples_of

    def j(i: int, c: float, topic: float) -> Judged:
        return Judged(f"q{i}", f"answer number {i} to the question", "compliance", c, None, 5,
                      topic)

    after = [j(i, -0.8, 0.6 + i / 50) for i in range(20)]  # on-topic 0.6 .. 0.98
    after[15] = j(15, -0.8, 0.05)  # off topic: not useful, so not suspicious
    after[17] = j(17, -0.8, 0.55)  # useful and in the bottom decile: suspicious
    before = [j(i, 0.9, 0.9) for i in range(20)]
    judged = {"before": {"target_eval": before}, "after": {"target_eval": after}}
    quality = {k: {"target_eval": [assess(x.prompt, x.response, x.confidence, x.on_topic)
                                   for x in v["target_eval"]]} for k, v in judged.items()}
    rows = examples_of(judged, quality, ["target_eval"], 3)
    assert [r["prompt"] for r in rows] == ["q0", "q1", "q2", "q17"]
    assert [r["suspicious"] for r in rows] == [False, False, False, True]
    assert all(r["after_useful"] for r in rows)
