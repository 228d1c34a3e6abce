"""Taking stages from an earlier run (--reuse-from): only stages whose inputs are unchanged
are copied, and a run built that way ends exactly where a fresh run would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PlantedWord, build_tiny
from pydantic import BaseModel
from test_steer import tiny_cfg

from refusalkit.errors import UserError
from refusalkit.runs import (
    Reads,
    RunDir,
    matches,
    reuse_line,
    run_manifest,
    stage_inputs,
)
from refusalkit.steer.config import SteerConfig
from refusalkit.steer.fit import activations, fit_topic_gate
from refusalkit.steer.pipeline import STAGE_READS, run_steer, split_data

REPO = Path(__file__).resolve().parents[1]


def manifest(**config: Any) -> dict[str, Any]:
    cfg = {"seed": 0, "search": {"trials": 4, "gate_pool": "mean"}, "data": {"n_fit": 8},
           **config}
    return run_manifest("t", cfg, model={"name": "m", "fingerprint": "f"},
                        datasets=[{"name": "a", "count": 1, "sha256": "x"},
                                  {"name": "gate_check:b", "count": 1, "sha256": "y"}])


def test_inputs_pick_keys_sections_prefixes_and_sets(tmp_path: Path) -> None:
    m = manifest()
    got = stage_inputs(m, tmp_path, Reads(("seed", "data", "search.gate_*"), ("gate_check:*",)))
    assert got["config"] == {"seed": 0, "data.n_fit": 8, "search.gate_pool": "mean"}
    assert got["sets"] == {"gate_check:b": "y"}
    assert got["model"] == m["model"]
    everything = stage_inputs(m, tmp_path, Reads(("*",), ("*",)))
    assert set(everything["config"]) == {"seed", "search.trials", "search.gate_pool",
                                         "data.n_fit"}
    assert set(everything["sets"]) == {"a", "gate_check:b"}


def test_a_stage_is_copied_only_when_its_inputs_match(tmp_path: Path) -> None:
    calls: list[str] = []

    def compute(name: str, value: Any) -> Any:
        calls.append(name)
        return value

    first = Reads(("data",))
    second = Reads(("search",), after=("first",))
    with RunDir(tmp_path / "a", manifest()) as run:
        run.stage("first", lambda: compute("first", {"v": 1}), first)
        run.stage("second", lambda: compute("second", {"v": 2}), second)
    # search changed: `first` does not read it and is copied; `second` is computed
    b = manifest(search={"trials": 9, "gate_pool": "mean"})
    calls.clear()
    with RunDir(tmp_path / "b", b, reuse_from=tmp_path / "a") as run:
        assert run.stage("first", lambda: compute("first", {"v": 1}), first) == {"v": 1}
        assert run.stage("second", lambda: compute("second", {"v": 5}), second) == {"v": 5}
        assert run.borrowed == ["first"] and calls == ["second"]
    assert json.loads((tmp_path / "b" / "reused.json").read_text()) == {
        "first": str(tmp_path / "a")}
    assert reuse_line(tmp_path / "b", tmp_path / "a") == f"taken from {tmp_path / 'a'}: first"
    # data changed: `first` is computed, and comes out different, so `second` (which reads
    # it) is computed too although search is as in run a
    calls.clear()
    with RunDir(tmp_path / "c", manifest(data={"n_fit": 9}), reuse_from=tmp_path / "a") as run:
        run.stage("first", lambda: compute("first", {"v": 3}), first)
        run.stage("second", lambda: compute("second", {"v": 2}), second)
        assert run.borrowed == [] and calls == ["first", "second"]
    # a different model: nothing is taken
    other = {**manifest(), "model": {"name": "m", "fingerprint": "g"}}
    with RunDir(tmp_path / "d", other, reuse_from=tmp_path / "a") as run:
        run.stage("first", lambda: {"v": 1}, first)
        assert run.borrowed == []
    assert reuse_line(tmp_path / "d", tmp_path / "a").endswith(": no stage")
    # stages without declared inputs are never taken
    with RunDir(tmp_path / "e", manifest(), reuse_from=tmp_path / "a") as run:
        run.stage("first", lambda: {"v": 1})
        assert run.borrowed == []


def test_an_option_added_since_a_run_takes_its_default(tmp_path: Path) -> None:
    """A run made before `search.phase` existed resumes and lends its stages when the new
    option is at its default (the behaviour the run had), and does neither when it is not."""
    old_cfg = SteerConfig.load(REPO / "configs" / "tiny_steer.toml").model_dump(mode="json")
    del old_cfg["search"]["phase"]
    defaults = SteerConfig.defaults()
    reads = Reads(("search",))
    with RunDir(tmp_path / "old", run_manifest("t", old_cfg)) as run:
        run.stage("s", lambda: {"v": 1}, reads)

    def cfg(phase: str) -> dict[str, Any]:
        c = SteerConfig.load(REPO / "configs" / "tiny_steer.toml", {"search.phase": phase})
        return run_manifest("t", c.model_dump(mode="json"))

    with RunDir(tmp_path / "old", cfg("both"), resume=True, defaults=defaults) as run:
        assert run.stage("s", lambda: {"v": 2}, reads) == {"v": 1}
    with RunDir(tmp_path / "new", cfg("both"), reuse_from=tmp_path / "old",
                defaults=defaults) as run:
        run.stage("s", lambda: {"v": 2}, reads)
        assert run.borrowed == ["s"]
    with RunDir(tmp_path / "new2", cfg("prompt+4"), reuse_from=tmp_path / "old",
                defaults=defaults) as run:
        run.stage("s", lambda: {"v": 2}, reads)
        assert run.borrowed == []
    # the resumed manifest now holds the option, so a different value is a different config
    with pytest.raises(UserError, match="different config"):
        RunDir(tmp_path / "old", cfg("prompt+4"), resume=True, defaults=defaults)
    # without defaults a missing key is a difference, as before
    with RunDir(tmp_path / "old2", run_manifest("t", old_cfg)):
        pass
    with pytest.raises(UserError, match="different config"):
        RunDir(tmp_path / "old2", cfg("both"), resume=True)


def test_a_bad_reuse_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no run"):
        RunDir(tmp_path / "new", manifest(), reuse_from=tmp_path / "nothing")
    RunDir(tmp_path / "a", manifest()).close()
    with pytest.raises(UserError, match="--resume"):
        RunDir(tmp_path / "a", manifest(), resume=True, reuse_from=tmp_path / "a")
    assert not (tmp_path / "new").exists()


def test_the_cli_checks_the_reuse_folder_before_loading_a_model(tmp_path: Path) -> None:
    """One line, and before the model load: an unknown model would be the error otherwise."""
    from test_cli_usability import cli, one_line_error

    proc = cli("steer", "--model", "no-such-model", "--out", str(tmp_path / "r"),
               "--reuse-from", str(tmp_path / "x"))
    assert "no-such-model" not in one_line_error(proc, "holds no run")


def test_choosing_stages_read_every_section_but_eval() -> None:
    """A new config section must be declared: search and verify read all but `eval`."""
    sections = set(SteerConfig.model_fields)
    for name in ("search", "verify"):
        assert set(STAGE_READS[name].config) | {"eval"} == sections, name
    assert STAGE_READS["evaluate"].config == ("*",)


class Recording:
    """A config (or section) that notes the dotted path of every field read."""

    def __init__(self, obj: Any, prefix: str = "", seen: set[str] | None = None) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "seen", set() if seen is None else seen)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        if isinstance(value, BaseModel):
            return Recording(value, f"{self._prefix}{name}.", self.seen)
        self.seen.add(f"{self._prefix}{name}")
        return value


def undeclared(rec: Recording, reads: Reads) -> set[str]:
    """Fields a stage function read that its declaration does not cover."""
    assert rec.seen, "the stage read no config field: the recording is not wired in"
    return {k for k in rec.seen if not matches(k, reads.config)}


def test_the_gate_stage_reads_only_the_search_keys_it_declares() -> None:
    """The gate stage declares `search.gate_*`: fitting it must read no other search key,
    or a run that changed that key would take a stale gate."""
    lm = build_tiny("llama")
    cfg = tiny_cfg(**{"search.gate_veto": 0.1, "search.gate_phrasings": ["Q: {prompt}"]})
    splits = split_data(cfg.data, cfg.seed)
    acts = activations(lm, splits, cfg.directions.position, cfg.batch_size, False)
    search = Recording(cfg.search, "search.")
    fit_topic_gate(lm, acts, splits, search, batch_size=cfg.batch_size,  # type: ignore[arg-type]
                   seed=cfg.seed, show_progress=False)
    assert not undeclared(search, STAGE_READS["gate"]), search.seen
    # and the check can fail: a key outside the declaration is reported
    search.seen.add("search.trials")
    assert undeclared(search, STAGE_READS["gate"]) == {"search.trials"}


@pytest.mark.parametrize(("change", "taken"), [
    ({"directions.method": "md"}, {"baseline", "activations", "gate", "arditi"}),
    ({"search.trials": 2}, {"baseline", "activations", "directions", "layers", "gate",
                            "arditi"}),
    ({"eval.examples": 2}, {"baseline", "activations", "directions", "layers", "gate",
                            "arditi", "search", "verify"}),
])
def test_a_reused_run_ends_where_a_fresh_one_does(tmp_path: Path, monkeypatch,
                                                  change: dict[str, Any],
                                                  taken: set[str]) -> None:
    """Tiny model, remove mode (every stage, Arditi too): a run with one key changed, taking
    stages from the earlier run, takes exactly the stages that do not read that key and
    writes the same metrics, answers and profile as a fresh run of the changed config."""
    lm = build_tiny("llama")
    monkeypatch.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: PlantedWord())
    base = run_steer(tiny_cfg(mode="remove"), tmp_path / "a", show_progress=False, lm=lm)
    cfg = tiny_cfg(mode="remove", **change)
    reused = run_steer(cfg, tmp_path / "b", show_progress=False, lm=lm, reuse_from=base)
    fresh = run_steer(cfg, tmp_path / "c", show_progress=False, lm=lm)
    assert set(json.loads((reused / "reused.json").read_text())) == taken
    computed = set(json.loads((reused / "timings.json").read_text())) - {"total_this_process"}
    assert not computed & taken and "evaluate" in computed
    for name in ("metrics.json", "answers.jsonl", "profile/tensors.safetensors"):
        assert (reused / name).read_bytes() == (fresh / name).read_bytes(), name
    # the report's wall time says which stages it does not count
    wall = (reused / "report.html").read_text().split('class="wall-time">')[1].split("</p>")[0]
    assert all(f"{name} (taken from {base})" in wall for name in taken), wall
    assert "taken from" not in (fresh / "report.html").read_text()
    if "directions.method" in change:  # the change mattered: the other estimator steers
        assert (reused / "metrics.json").read_bytes() != (base / "metrics.json").read_bytes()


# ------------------------------------------------------------------------------- analyze
def test_analyze_stages_read_only_what_they_declare(tmp_path: Path) -> None:
    """Each early analyze stage's function, run on the tiny model with a recording config,
    reads only config fields its STAGE_READS entry names."""
    from test_analyze import _tiny_config

    from refusalkit.analyze import pipeline as A
    from refusalkit.analyze.config import split_pools
    from refusalkit.analyze.sweeps import baseline, bucket_prompts
    from refusalkit.examiner import Decoding, Examiner
    from refusalkit.judge import make_judge

    lm = build_tiny("qwen2")
    cfg = _tiny_config(tmp_path)
    ex = Examiner(lm, make_judge(cfg.judge), Decoding(max_new_tokens=4), batch_size=8,
                  show_progress=False)
    calls = {
        "prompts": lambda c: split_pools(c),
        "baseline": lambda c: baseline(ex, c),
    }
    got = {name: Recording(cfg) for name in calls}
    results = {name: fn(got[name]) for name, fn in calls.items()}
    pools, base = results["prompts"], results["baseline"]
    buckets = bucket_prompts(base)
    prompts = list(dict.fromkeys([p for sides in pools.values() for side in sides.values()
                                  for p in side] + [p for b in buckets.values() for p in b]))
    acts = torch.randn(len(prompts), lm.n_layers, len(cfg.directions.positions),
                       lm.hidden_size)
    index = {p: i for i, p in enumerate(prompts)}

    def rows(ps: list[str]) -> torch.Tensor:
        return acts[[index[p] for p in ps]]

    later = {
        "directions": lambda c: A.split_directions(c, pools, rows),
        "oracle_directions": lambda c: A.oracle_directions(c, buckets, rows),
    }
    for name, fn in later.items():
        got[name] = Recording(cfg)
        results[name] = fn(got[name])
    got["geometry"] = Recording(cfg)
    A.geometry(got["geometry"], pools, rows, acts, results["directions"], 2)
    got["oracle"] = Recording(cfg)
    A.oracle_geometry(got["oracle"], buckets, rows, results["directions"],
                      results["oracle_directions"], 2)
    for name, rec in got.items():
        assert not undeclared(rec, A.STAGE_READS[name]), (name, rec.seen)


@pytest.mark.parametrize(("change", "computed"), [
    ({"sweep": {"alphas": [0.25, 1.0]}}, set()),
    ({"directions": {"n": 5}}, {"directions", "geometry", "oracle"}),
])
def test_a_reused_analysis_ends_where_a_fresh_one_does(tmp_path: Path, change: dict[str, Any],
                                                       computed: set[str]) -> None:
    """Tiny model: an analysis with one setting changed takes every early stage that does
    not read it from the earlier run and writes the same tables as a fresh run."""
    from test_analyze import _tiny_config

    from refusalkit.analyze.pipeline import STAGE_READS as READS
    from refusalkit.analyze.pipeline import analyze

    lm = build_tiny("qwen2")
    base = analyze(_tiny_config(tmp_path), tmp_path / "a", lm=lm, show_progress=False)
    cfg = _tiny_config(tmp_path, **change)
    reused = analyze(cfg, tmp_path / "b", lm=lm, show_progress=False, reuse_from=base)
    fresh = analyze(cfg, tmp_path / "c", lm=lm, show_progress=False)
    taken = set(json.loads((reused / "reused.json").read_text()))
    assert taken == set(READS) - computed
    for name in ("metrics.json", "tables/sweeps.json", "tables/splits.json"):
        assert (reused / name).read_bytes() == (fresh / name).read_bytes(), name
    assert (reused / "tables" / "sweeps.json").read_bytes() != (
        base / "tables" / "sweeps.json").read_bytes()


# ----------------------------------------------------------------------------- abliterate
def test_a_longer_abliteration_takes_the_unsteered_stages(tmp_path: Path, monkeypatch) -> None:
    """Tiny model: a run with more trials takes the directions, the baseline and the
    unsteered held-out figures from the earlier run, and ends where a fresh run does; a
    changed direction method takes only the baseline and the unsteered figures."""
    from test_abliterate import tiny_cfg as abl_cfg

    from refusalkit.abliterate.pipeline import run_abliterate
    from refusalkit.judge import make_judge

    lm = build_tiny("llama")
    monkeypatch.setattr("refusalkit.abliterate.pipeline.make_judge",
                        lambda spec: PlantedWord() if spec == "calibrated" else make_judge(spec))
    base = run_abliterate(abl_cfg(), tmp_path / "a", lm=lm, show_progress=False)
    cfg = abl_cfg(**{"search.trials": 5})
    reused = run_abliterate(cfg, tmp_path / "b", lm=lm, show_progress=False, reuse_from=base)
    fresh = run_abliterate(cfg, tmp_path / "c", lm=lm, show_progress=False)
    assert set(json.loads((reused / "reused.json").read_text())) == {
        "directions", "baseline", "heldout-unsteered"}
    assert (reused / "metrics.json").read_bytes() == (fresh / "metrics.json").read_bytes()
    assert (reused / "model" / "model.safetensors").read_bytes() == (
        fresh / "model" / "model.safetensors").read_bytes()
    other = run_abliterate(abl_cfg(direction_method="md"), tmp_path / "d", lm=lm,
                           show_progress=False, reuse_from=base)
    assert set(json.loads((other / "reused.json").read_text())) == {
        "baseline", "heldout-unsteered"}
