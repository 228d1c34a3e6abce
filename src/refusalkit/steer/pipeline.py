"""Refusal Steering end to end (paper A): judge → activations → directions → layer ranking →
multi-layer search → verification → held-out evaluation against baselines → profile, metrics
and report.

Every stage is a RunDir stage, so an interrupted run resumes where it stopped. Mode
`remove` subtracts the target refusal direction (refusal on the topic goes, safety refusal
stays); mode `induce` adds a refusal direction on one topic, optionally behind a topic gate.
What differs between the modes lives in steer/mode.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refusalkit.artifacts import dataset_record, model_record
from refusalkit.evaluate import Judged, refusal_rate
from refusalkit.examiner import Decoding, Examiner
from refusalkit.interventions import Gate, Profile, save_profile
from refusalkit.judge import JudgementCache, make_judge
from refusalkit.judge.guard import guarded
from refusalkit.models import LoadedModel, load_model
from refusalkit.prompts import write_jsonl
from refusalkit.quality import assess
from refusalkit.quality import rates as quality_rates
from refusalkit.runs import Reads, RunDir, check_run_folder, run_manifest
from refusalkit.scoring import refusal_log_odds, refusal_token_ids
from refusalkit.steer.baselines import arditi_baseline, arditi_profile
from refusalkit.steer.choose import proxy_agreement
from refusalkit.steer.config import SteerConfig
from refusalkit.steer.data import FITTING, Splits, split_data
from refusalkit.steer.evaluate import evaluate_all
from refusalkit.steer.fit import (
    Fit,
    activations,
    confidences,
    directions,
    fit_of,
    fit_topic_gate,
    gaps_levels,
    gate_of_record,
    layer_table,
    search_space,
)
from refusalkit.steer.mode import Mode, ProxyPrompts, mode_of
from refusalkit.steer.report import write_report
from refusalkit.steer.search import (
    SearchSpace,
    build_profile,
    pareto_candidates,
    proxy_sets,
    run_study,
    trial_record,
)

# What each stage reads (besides the model), so `--reuse-from` can take a stage from an
# earlier run that had the same inputs: a changed estimator keeps the baseline, activations,
# gate and Arditi stages (10 min of the 0.5B acceptance run, 23 of the 1.5B one); a changed
# judge keeps the activations and the gate. The fitting stages name what their functions
# read (tests/test_reuse.py holds the gate's to it); search and verify read every section
# but `eval`, evaluate everything.
_GATE_SETS = ("target_fit", "gate_target", "gate_topic", "neutral", "safety_fit",
              "gate_negatives")
_CHOOSING = ("model", "mode", "seed", "batch_size", "data", "judge", "directions", "search")
STAGE_READS: dict[str, Reads] = {
    "baseline": Reads(("model", "seed", "batch_size", "judge"), FITTING),
    "activations": Reads(("model", "batch_size", "directions.position"), FITTING),
    "directions": Reads(("mode", "directions"), after=("baseline", "activations")),
    "layers": Reads(("mode",), after=("baseline", "activations", "directions")),
    "gate": Reads(("model", "seed", "batch_size", "search.gate_*", "data.neutral",
                   "data.n_fit", "data.n_proxy", "data.n_gate", "data.gate_sources"),
                  _GATE_SETS, after=("activations",)),
    "arditi": Reads(("seed",), ("safety_fit", "neutral", "neutral_proxy"),
                    after=("baseline", "activations")),
    "search": Reads(_CHOOSING, ("*",), after=("baseline", "activations", "directions",
                                                "gate")),
    "verify": Reads(_CHOOSING, ("*",), after=("baseline", "activations", "directions", "gate",
                                                "search")),
    "evaluate": Reads(("*",), ("*",), after=("baseline", "activations", "directions", "gate",
                                            "arditi", "search", "verify")),
}


def run_steer(cfg: SteerConfig, out: str | Path, *, resume: bool = False,
              show_progress: bool = True, lm: LoadedModel | None = None,
              reuse_from: str | Path | None = None) -> Path:
    """Run the whole pipeline into the run folder `out`; returns its path. With
    `reuse_from` (an earlier run's folder) every stage whose inputs are unchanged there is
    copied instead of computed (STAGE_READS)."""
    t_start = time.perf_counter()
    with steer_state(cfg, out, resume=resume, show_progress=show_progress, lm=lm,
                     reuse_from=reuse_from) as state:
        state.run_stages()
        run = state.run
        timings = run.read_json("timings.json") if run.file("timings.json").is_file() else {}
        run.write_json("timings.json", {**timings,
                                        "total_this_process": time.perf_counter() - t_start})
        return run.path


@contextmanager
def steer_state(cfg: SteerConfig, out: str | Path, *, resume: bool = False,
                show_progress: bool = True, lm: LoadedModel | None = None,
                reuse_from: str | Path | None = None) -> Iterator[Steer]:
    """The run folder open with its examiner and splits: for the whole pipeline, or for a
    study (bench/bench_tradeoff.py) that reuses the fitting stages and sweeps profiles."""
    splits = split_data(cfg.data, cfg.seed)
    check_run_folder(out, resume, reuse_from)  # fail before the (slow) model load
    # Looping output counts as refusal whatever the judge: steering pushed too far loops, and
    # must not pass for steering that works (judge/guard.py).
    judge = guarded(make_judge(cfg.judge.spec))
    lm = lm or load_model(cfg.model)
    manifest = run_manifest("steer", cfg.model_dump(mode="json"), model=model_record(lm),
                            datasets=[dataset_record(k, v) for k, v in splits.named().items()],
                            seeds={"seed": cfg.seed})
    with RunDir(out, manifest, resume=resume, reuse_from=reuse_from,
                defaults=type(cfg).defaults()) as run:
        decoding = Decoding(cfg.judge.mode, cfg.judge.k, cfg.judge.max_new_tokens, cfg.seed)
        ex = Examiner(lm, judge, decoding, cache=JudgementCache(run.file("judgements.sqlite")),
                      batch_size=cfg.batch_size, show_progress=show_progress)
        yield Steer(cfg, mode_of(cfg.mode), run, ex, splits)


@dataclass
class Steer:
    """The run's inputs; each stage below reads them and what earlier stages returned."""

    cfg: SteerConfig
    mode: Mode
    run: RunDir
    ex: Examiner
    splits: Splits

    def run_stages(self) -> None:
        run, cfg, ex = self.run, self.cfg, self.ex
        base, fit, layer_rows, gate_rec = self.fitted()
        gate = gate_of_record(gate_rec)
        space = search_space(ex.lm, cfg.search, self.mode)
        proxies = self.mode.proxies(self.splits.target_fit, self.splits.neutral,
                                    self.splits.safety_fit, base, cfg.data.n_proxy)
        searched = run.stage("search", lambda: self.search(fit, space, proxies, gate,
                                                            gate_rec), STAGE_READS["search"])
        verified = run.stage("verify", lambda: self.verify(
            fit, space, proxies, gate, base, searched["candidates"]), STAGE_READS["verify"])
        profile = self.profile(fit, space, gate, verified["chosen"]["params"])
        baselines = self.baselines(fit, space, gate, verified["chosen"]["params"], base)
        evaluated = run.stage("evaluate", lambda: evaluate_all(
            ex, self.splits, profile, baselines, cfg.eval.examples), STAGE_READS["evaluate"])
        examples = evaluated.get("_examples", [])
        write_jsonl(run.file("answers.jsonl"), evaluated.get("_answers", []))
        kl = evaluated.get("_kl", [])  # absent in runs evaluated before it existed
        if kl:
            write_jsonl(run.file("kl.jsonl"), kl)
        metrics = self.metrics(evaluated, profile, verified, searched, gate_rec)
        run.write_json("metrics.json", metrics)
        write_report(run, layer_rows, searched, verified, metrics, examples, kl)

    def fitted(self) -> tuple[dict[str, Any], Fit, list[dict[str, Any]],
                              dict[str, Any] | None]:
        """Stages 1-4: baseline judgements, activations, directions with the layer table, and
        the topic gate's record (None when the config turns it off)."""
        run, cfg, ex = self.run, self.cfg, self.ex
        reads = STAGE_READS
        base = run.stage("baseline", self.baseline, reads["baseline"])
        acts = run.tensor_stage("activations", lambda: activations(
            ex.lm, self.splits, cfg.directions.position, cfg.batch_size, ex.show_progress),
            reads["activations"])
        c_target = confidences(base, "target_fit")
        cl = self.mode.classes(acts, c_target, confidences(base, "safety_fit"))
        fit = fit_of(acts, c_target, cl, run.tensor_stage(
            "directions", lambda: directions(acts, cl, self.mode, cfg.directions),
            reads["directions"]), self.mode)
        layer_rows = run.stage("layers", lambda: layer_table(fit, self.mode), reads["layers"])
        gate_rec = (run.stage("gate", lambda: fit_topic_gate(
            ex.lm, acts, self.splits, cfg.search, batch_size=cfg.batch_size, seed=cfg.seed,
            show_progress=ex.show_progress), reads["gate"])
                    if cfg.search.gate != "off" else None)
        return base, fit, layer_rows, gate_rec

    # 1. baseline behaviour on the fitting sets
    def baseline(self) -> dict[str, Any]:
        named = self.splits.named()
        return {name: [asdict(j) for j in self.ex.answers(named[name])] for name in FITTING}

    # 5. the proxy search (cheap objectives, no generation)
    def search(self, fit: Fit, space: SearchSpace, proxies: ProxyPrompts, gate: Gate | None,
               gate_rec: dict[str, Any] | None) -> dict[str, Any]:
        cfg, lm = self.cfg, self.ex.lm
        sets = proxy_sets(self.ex, proxies.target, proxies.keep, self.splits.neutral_proxy,
                          gate, leak=gate_rec["leak"] if gate_rec is not None else 0.0)
        study = run_study(lm, fit.directions, fit.gaps, space, sets, trials=cfg.search.trials,
                          storage=self.run.file("study.sqlite"), seed=cfg.seed, gate=gate,
                          levels=fit.levels)
        trials = [trial_record(t) for t in study.trials if t.values is not None]
        assert sets.target_base is not None
        unsteered = float(refusal_log_odds(sets.target_base, refusal_token_ids(lm)).mean())
        return {"trials": trials, "unsteered_target": unsteered,
                "candidates": pareto_candidates(study, cfg.search.kl_max, cfg.search.verify,
                                                base_objective=-space.sign * unsteered)}

    # 6. generate and judge only the promising candidates, then choose
    def verify(self, fit: Fit, space: SearchSpace, proxies: ProxyPrompts, gate: Gate | None,
               base: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any]:
        cfg, ex = self.cfg, self.ex
        t_idx = proxies.pick[: cfg.search.verify_prompts]
        t_set = [self.splits.target_fit[i] for i in t_idx]
        ex.remember(t_set, [Judged(**base["target_fit"][i]) for i in t_idx])
        k_rows = {r["prompt"]: r for r in base[self.mode.keep_set]}
        k_base = [Judged(**k_rows[p]) if p in k_rows else None for p in proxies.keep]
        if all(k_base):
            ex.remember(proxies.keep, k_base)  # type: ignore[arg-type]
        rows, tokens = [], 0
        for cand in candidates:
            prof = build_profile(cand["params"], fit.directions, fit.gaps, space, gate,
                                 fit.levels)
            jt, ot = ex.gated_answers(t_set, prof)
            if all(k_base):
                jkp, ok = ex.gated_answers(proxies.keep, prof)
            else:  # keep prompts without a baseline judgement: judge them all
                jkp = ex.answers(proxies.keep, prof)
                ok = torch.ones(len(jkp), dtype=torch.bool)
            tokens += sum(j.tokens for j, o in zip(jt + jkp, ot.tolist() + ok.tolist(),
                                                   strict=True) if o)
            useful = quality_rates([assess(j.prompt, j.response, j.confidence, j.on_topic)
                                    for j in jt])["useful"]
            rows.append({**cand, "target_refusal": refusal_rate(jt), "target_useful": useful,
                         "keep_refusal": refusal_rate(jkp),
                         "gate_open_target": float(ot.double().mean())})
        return {"rows": rows, "generated_tokens": tokens,
                "proxy_rank_agreement": proxy_agreement(rows),
                "chosen": self.mode.choose(rows, base, cfg.search.safety_keep, proxies.keep)}

    def profile(self, fit: Fit, space: SearchSpace, gate: Gate | None,
                params: dict[str, Any]) -> Profile:
        """The chosen profile, saved into the run folder with what made it."""
        prof = build_profile(params, fit.directions, fit.gaps, space, gate, fit.levels)
        prof = Profile(prof.ops, meta={"method": self.cfg.directions.method,
                                       "mode": self.mode.name, "params": params})
        save_profile(prof, self.run.file("profile"), self.ex.lm)
        return prof

    # 7. the baselines users would otherwise use, evaluated beside the chosen profile
    def baselines(self, fit: Fit, space: SearchSpace, gate: Gate | None,
                  params: dict[str, Any], base: dict[str, Any]) -> dict[str, Profile]:
        out: dict[str, Profile] = {}
        if not self.cfg.eval.baselines:
            return out
        for m, dirs in fit.others.items():
            gaps, levels = gaps_levels(fit.classes, self.mode, dirs)
            out[f"{m}_steering"] = build_profile(params, dirs, gaps, space, gate, levels)
        if self.mode.arditi_baseline:
            rec = self.run.stage("arditi", lambda: arditi_baseline(
                self.ex.lm, fit.acts, self.splits, base, self.cfg.seed), STAGE_READS["arditi"])
            out["arditi_ablation"] = arditi_profile(rec, self.ex.lm)
        return out

    def metrics(self, evaluated: dict[str, Any], profile: Profile, verified: dict[str, Any],
                searched: dict[str, Any], gate_rec: dict[str, Any] | None) -> dict[str, Any]:
        """metrics.json, built once: the held-out figures and what the run chose. Timings
        stay in timings.json, so two runs' metrics are identical."""
        cfg, params = self.cfg, verified["chosen"]["params"]
        metrics = {k: v for k, v in evaluated.items() if not k.startswith("_")}
        metrics.update({
            "mode": self.mode.name, "method": cfg.directions.method,
            "operator": cfg.search.operator, "phase": cfg.search.phase,
            "chosen_layers": profile.layers,
            "chosen_strengths": {str(k): v for k, v in profile.ops[0].strengths.items()},
            "gated": bool(params.get("gate", False)),
            "search_generated_tokens": verified["generated_tokens"],
            "proxy_rank_agreement": verified.get("proxy_rank_agreement"),
            "search_trials": len(searched["trials"]),
        })
        if gate_rec is not None:
            metrics["gate"] = {k: v for k, v in gate_rec.items()
                               if k not in ("vector", "veto", "layers")}
        return metrics
