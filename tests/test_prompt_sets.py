"""The prompt sets shipped inside the package: each is documented, loads, and its held-out
parts share nothing (not even a near copy) with the parts a run fits or chooses on, so a
held-out figure measured on them stays held out."""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources

import pytest

from refusalkit.prompts import load_prompts

PROMPTS = resources.files("refusalkit") / "data" / "prompts"
SETS = sorted(p.name.removesuffix(".jsonl") for p in PROMPTS.iterdir()
              if p.name.endswith(".jsonl"))
HAN = re.compile(r"[\u4e00-\u9fff]")
LABELS = {"topic_overlap"}  # labels on public sets' prompts, not prompts to answer


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (PROMPTS / f"{name}.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]


def _no_near_copy(mine: list[str], others: list[str], lower: bool = True) -> None:
    """No prompt of `mine` is within difflib ratio 0.8 of any of `others`."""
    def norm(t: str) -> str:
        return t.lower() if lower else t

    for p in mine:
        m = difflib.SequenceMatcher(None, norm(p))
        for o in others:
            m.set_seq1(norm(o))
            assert m.real_quick_ratio() < 0.8 or m.ratio() < 0.8, (p, o)


@pytest.mark.parametrize("name", SETS)
def test_every_shipped_set_loads_is_documented_and_has_no_repeats(name: str) -> None:
    rows = _rows(name)
    doc = name.removesuffix("_dev").removesuffix("_fit")
    assert (PROMPTS / f"{name}.md").is_file() or (PROMPTS / f"{doc}.md").is_file()
    prompts = load_prompts(f"builtin:{name}").prompts
    assert len(prompts) == len(rows) >= (1 if name in LABELS else 20)
    assert len(set(prompts)) == len(prompts)
    for r in rows:
        if r.get("lang") == "zh":
            assert HAN.search(r["prompt"]), r
        elif r.get("lang") == "en":
            assert not HAN.search(r["prompt"]), r


def test_chinese_sets_split_as_documented() -> None:
    """ordinary_zh: 200 fit / 100 test with every kind in both; harmful_zh: translations of
    harmful_train (fit) and harmful_test (test) rows, each naming its row; the Chinese
    topic requests: 60 fit / 20 dev; the topic questions: 180 fit / 60 dev in both
    languages."""
    ordinary = _rows("ordinary_zh")
    assert sum(r["split"] == "fit" for r in ordinary) == 200
    assert sum(r["split"] == "test" for r in ordinary) == 100
    kinds = {r["kind"] for r in ordinary}
    assert {r["kind"] for r in ordinary if r["split"] == "test"} == kinds
    harmful = _rows("harmful_zh")
    assert {(r["split"], r["source"]) for r in harmful} == {("fit", "harmful_train"),
                                                            ("test", "harmful_test")}
    for r in harmful[:: 17]:  # each translation names the row it translates
        assert load_prompts(r["source"]).prompts[r["row"]] == r["original"]
    requests = load_prompts("builtin:china_requests_zh_fit")
    assert len(requests.where(split="fit")) == 60 and len(requests.where(split="dev")) == 20
    questions = _rows("china_questions_fit")
    assert {(lang, split): sum(r["lang"] == lang and r["split"] == split for r in questions)
            for lang in ("en", "zh") for split in ("fit", "dev")} == {
        ("en", "fit"): 135, ("en", "dev"): 45, ("zh", "fit"): 45, ("zh", "dev"): 15}


def test_nothing_held_out_is_a_near_copy_of_what_runs_fit_or_choose_on() -> None:
    """Held out (never fitted or chosen on): china_requests, ordinary_zh?split=test,
    harmful_zh?split=test, harmful_fresh_test, and deccp (a run holds out a random share of
    it, so all of it counts). Fitted or chosen on: the *_fit and *_dev sets and the fit
    splits. No held-out prompt is within difflib ratio 0.8 of any of those."""
    held = [*load_prompts("builtin:china_requests").prompts,
            *load_prompts("deccp_censored").prompts, *load_prompts("deccp_uncensored").prompts,
            *load_prompts("builtin:ordinary_zh?split=test").prompts,
            *load_prompts("builtin:harmful_zh?split=test").prompts,
            *load_prompts("builtin:harmful_fresh_test").prompts,
            *load_prompts("builtin:topic_cooking_fresh").prompts]
    used = [*load_prompts("builtin:topic_cooking").prompts,
            *load_prompts("builtin:china_requests_fit").prompts,
            *load_prompts("builtin:china_requests_dev").prompts,
            *load_prompts("builtin:china_requests_zh_fit").prompts,
            *load_prompts("builtin:china_questions_fit").prompts,
            *load_prompts("builtin:political_harm_fit").prompts,
            *load_prompts("builtin:harmful_questions_fit").prompts,
            *load_prompts("builtin:ordinary_zh?split=fit").prompts,
            *load_prompts("builtin:harmful_zh?split=fit").prompts]
    _no_near_copy(held, used, lower=False)


def test_topic_overlap_labels_prompts_of_the_overrefusal_sets() -> None:
    """builtin:topic_overlap labels rows of the public over-refusal sets and of the ordinary
    prompts KL is measured on (harmless_test), so each of its
    prompts is a row of the set it names, on a topic a shipped induce config uses; leaving
    them out of "other" prompts leaves most of each set (no set is mostly on a topic)."""
    rows = _rows("topic_overlap")
    assert {r["topic"] for r in rows} == {"cooking", "investing"}
    for r in rows:
        assert r["prompt"] in load_prompts(r["dataset"]).prompts, r
    for spec in ("xstest?label=safe", "coconot_contrast", "harmless_test"):
        every = load_prompts(spec).prompts
        assert 0 < sum(p in every for p in load_prompts("builtin:topic_overlap").prompts) \
            < len(every) / 10


def test_harmful_questions_are_written_not_copied_from_the_harmful_sets_we_report() -> None:
    """builtin:harmful_questions_fit (gate negatives) is no near copy (difflib 0.8) of the
    harmful sets safety is reported on, so a gate fitted on it is not graded on itself."""
    mine = _rows("harmful_questions_fit")
    assert len(mine) == 100 and {r["split"] for r in mine} == {"fit"}
    assert all(r["prompt"].rstrip().endswith("?") for r in mine)
    reported = [*load_prompts("harmful_test").prompts, *load_prompts("jailbreakbench").prompts,
                *load_prompts("xstest?label=unsafe").prompts,
                *load_prompts("coconot_original?category=Requests with safety concerns").prompts]
    _no_near_copy([r["prompt"] for r in mine], reported)


def test_the_fresh_harmful_set_is_held_out_and_no_near_copy_of_any_public_set() -> None:
    """builtin:harmful_fresh_test (written blind, read once per chosen gate) is all test rows
    in 12 kinds × (4 English questions, 4 English requests, 4 Chinese), and no near copy
    (difflib 0.8) of the public harmful sets a gate may be fitted or chosen on."""
    rows = _rows("harmful_fresh_test")
    assert len(rows) == 144 and {r["split"] for r in rows} == {"test"}
    kinds = {r["kind"] for r in rows}
    assert len(kinds) == 12
    for k in kinds:
        mine = [r for r in rows if r["kind"] == k]
        assert sum(r["lang"] == "en" and r["form"] == "question" for r in mine) == 4
        assert sum(r["lang"] == "en" and r["form"] == "request" for r in mine) == 4
        assert sum(r["lang"] == "zh" for r in mine) == 4
    public = [*load_prompts("harmful_train").prompts, *load_prompts("harmful_val").prompts,
              *load_prompts("harmful_test").prompts, *load_prompts("xstest?label=unsafe").prompts,
              *load_prompts("coconot_original?category=Requests with safety concerns").prompts]
    _no_near_copy([r["prompt"] for r in rows], public)


def test_ordinary_chinese_prompts_name_no_sensitive_topic() -> None:
    """ordinary_zh is the gate's everyday Chinese side: a sensitive keyword in it would teach
    the gate to stay shut on the topic itself."""
    words = ("天安门", "六四", "西藏", "新疆", "维吾尔", "台湾", "香港", "法轮", "文革",
             "习近平", "毛泽东", "审查", "人权", "共产党", "抗议", "民主", "翻墙")
    for p in load_prompts("builtin:ordinary_zh").prompts:
        assert not any(w in p for w in words), p


def test_a_filter_can_leave_one_kind_out() -> None:
    """`field!=value` leaves rows out, with `field=value` beside it: an induce run on cooking
    can put every everyday Chinese kind but cooking on its gate's other side."""
    every = load_prompts("builtin:ordinary_zh?split=fit")
    cooking = every.where(kind="cooking")
    rest = load_prompts("builtin:ordinary_zh?split=fit&kind!=cooking")
    assert len(cooking) > 0 and len(rest) + len(cooking) == len(every)
    assert not set(rest.prompts) & set(cooking.prompts)
    both = load_prompts("builtin:ordinary_zh?kind!=cooking&kind!=math&split=test")
    assert {r["kind"] for r in both.rows}.isdisjoint({"cooking", "math"})
    assert {r["split"] for r in both.rows} == {"test"}


def test_part_splits_a_set_into_disjoint_interleaved_parts() -> None:
    """`part=k/n` after the filters: three parts of XSTest's unsafe prompts are disjoint,
    together the whole filtered set, and each spans its ordering (every type is in each);
    a malformed part is one error line, not another share of the set."""
    from refusalkit.errors import UserError

    whole = load_prompts("xstest?label=unsafe")
    parts = [load_prompts(f"xstest?label=unsafe&part={k}/3") for k in range(3)]
    assert sorted(p for ps in parts for p in ps.prompts) == sorted(whole.prompts)
    assert [len(ps) for ps in parts] == [67, 67, 66]
    assert all(set(a.prompts).isdisjoint(b.prompts) for a in parts for b in parts if a is not b)
    types = {r["type"] for r in whole.rows}
    assert all({r["type"] for r in ps.rows} == types for ps in parts)
    assert parts[1].prompts == whole.prompts[1::3]
    for bad in ("3/3", "1", "a/2", "-1/2"):
        with pytest.raises(UserError, match="part="):
            load_prompts(f"xstest?label=unsafe&part={bad}")
