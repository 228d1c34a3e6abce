"""Refusal Steering end to end (paper A): judge → activations → directions → layer ranking →
multi-layer search → held-out evaluation against baselines → profile, metrics and report.

Every stage is a RunDir stage, so an interrupted run resumes where it stopped. Mode
`remove` subtracts the target refusal direction (refusal on the topic goes, safety refusal
stays); mode `induce` adds a refusal direction on one topic, optionally behind a topic gate.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import capture
from refusalkit.artifacts import dataset_record, model_record
from refusalkit.directions import get_method, per_layer
from refusalkit.errors import UserError
from refusalkit.evaluate import Judged, judge_gated, judge_prompts, refusal_rate
from refusalkit.gates import gate_of, gate_open
from refusalkit.geometry import auc
from refusalkit.interventions import Gate, Profile, save_profile
from refusalkit.judge import JudgementCache, make_judge
from refusalkit.judge.guard import guarded
from refusalkit.judge.protocol import THRESHOLD
from refusalkit.models import LoadedModel, load_model
from refusalkit.quality import assess
from refusalkit.quality import rates as quality_rates
from refusalkit.runs import RunDir, check_run_folder, run_manifest
from refusalkit.scoring import refusal_log_odds, refusal_token_ids
from refusalkit.steer.baselines import arditi_baseline, arditi_profile
from refusalkit.steer.choose import choose, proxy_agreement
from refusalkit.steer.config import SteerConfig
from refusalkit.steer.data import split_data
from refusalkit.steer.evaluate import evaluate_all
from refusalkit.steer.fit import (
    BASELINE_METHODS,
    classes,
    fit_topic_gate,
    gaps_levels,
    search_space,
)
from refusalkit.steer.report import write_report
from refusalkit.steer.search import (
    build_profile,
    pareto_candidates,
    proxy_sets,
    run_study,
    trial_record,
)


def _judged_rows(js: list[Judged]) -> list[dict[str, Any]]:
    return [asdict(j) for j in js]


def run_steer(cfg: SteerConfig, out: str | Path, *, resume: bool = False,
              show_progress: bool = True, lm: LoadedModel | None = None) -> Path:
    """Run the whole pipeline into the run folder `out`; returns its path."""
    t_start = time.perf_counter()
    data = split_data(cfg)
    check_run_folder(out, resume)  # fail before the (slow) model load
    # Looping output counts as refusal whatever the judge: steering pushed too far loops, and
    # must not pass for steering that works (judge/guard.py).
    judge = guarded(make_judge(cfg.judge.spec))
    lm = lm or load_model(cfg.model)
    manifest = run_manifest("steer", cfg.model_dump(mode="json"), model=model_record(lm),
                            datasets=[dataset_record(k, v) for k, v in data.items()],
                            seeds={"seed": cfg.seed})
    with RunDir(out, manifest, resume=resume) as run:
        return _pipeline(cfg, run, lm, judge, data, show_progress, t_start)


def _pipeline(cfg: SteerConfig, run: RunDir, lm: LoadedModel, judge: Any,
              data: dict[str, list[str]], show_progress: bool, t_start: float) -> Path:
    cache = JudgementCache(run.file("judgements.sqlite"))
    jk = {"mode": cfg.judge.mode, "k": cfg.judge.k, "max_new_tokens": cfg.judge.max_new_tokens,
          "cache": cache, "seed": cfg.seed, "batch_size": cfg.batch_size,
          "show_progress": show_progress}
    remove = cfg.mode == "remove"
    all_layers = list(range(lm.n_layers))

    # 1. baseline behaviour on the fitting sets
    def baseline() -> dict[str, Any]:
        return {name: _judged_rows(judge_prompts(lm, data[name], judge, **jk))
                for name in ("target_fit", "safety_fit", "neutral")}

    base = run.stage("baseline", baseline)
    c_target = torch.tensor([r["confidence"] for r in base["target_fit"]])
    c_safety = torch.tensor([r["confidence"] for r in base["safety_fit"]])

    # 2. activations at every layer, last prompt token
    pos = [cfg.directions.position]

    def activations() -> dict[str, torch.Tensor]:
        acts = {name: capture(lm, data[name], all_layers, pos, batch_size=cfg.batch_size,
                              show_progress=show_progress)[:, :, 0]
                for name in ("target_fit", "safety_fit", "neutral")}
        return acts

    acts = run.tensor_stage("activations", activations)

    # 3. directions per layer
    def directions() -> dict[str, torch.Tensor]:
        refused, complied, w_r, w_c = classes(acts, c_target, remove, c_safety)

        def estimate(method: str) -> torch.Tensor:
            kwargs: dict[str, Any] = {}
            if method in ("rmd", "wrmd"):
                kwargs["lam"] = cfg.directions.lam
            if method == "wrmd":
                kwargs.update(w_refused=w_r, w_complied=w_c, neutral=acts["neutral"])
            return per_layer(get_method(method), refused, complied, **kwargs)

        dirs = estimate(cfg.directions.method)
        gaps = torch.tensor(gaps_levels(acts, dirs, c_target, remove, c_safety)[0])
        # the other estimator of the md / wrmd pair, steered the same way as a baseline
        return {"directions": dirs, "gaps": gaps,
                **{m: estimate(m) for m in BASELINE_METHODS if m != cfg.directions.method}}

    dirs = run.tensor_stage("directions", directions)

    # 4. layer ranking: separability and correlation with c(x)
    def layers() -> list[dict[str, Any]]:
        refused, complied, _, _ = classes(acts, c_target, remove, c_safety)
        rows = []
        for i in all_layers:
            v = dirs["directions"][i]
            proj = acts["target_fit"][:, i] @ v
            corr = (torch.corrcoef(torch.stack([proj, c_target]))[0, 1]
                    if remove and c_target.std() > 0 else torch.tensor(float("nan")))
            energy = v.double() ** 2
            rows.append({"layer": i, "auc": auc(refused[:, i] @ v, complied[:, i] @ v),
                         "corr_c": float(corr), "gap": float(dirs["gaps"][i]),
                         "participation_ratio": float(1.0 / (energy ** 2).sum())})
        return rows

    layer_rows = run.stage("layers", layers)

    # 5. topic gate, then automatic multi-layer selection
    gate = None
    if cfg.search.gate != "off":
        gate_rec = run.stage("gate", lambda: fit_topic_gate(lm, acts, data, cfg, show_progress))
        gate = Gate(gate_rec["layer"], torch.tensor(gate_rec["vector"]), gate_rec["threshold"],
                    gate_rec["pool"])
    space = search_space(lm, cfg)
    levels = gaps_levels(acts, dirs["directions"], c_target, remove, c_safety)[1]
    conf = [r["confidence"] for r in base["target_fit"]]
    refused_idx = [i for i, c in enumerate(conf) if c > THRESHOLD]
    answered_idx = [i for i, c in enumerate(conf) if c < -THRESHOLD]
    pick = refused_idx if remove else answered_idx or list(range(len(data["target_fit"])))
    target_proxy = [data["target_fit"][i] for i in pick][: cfg.data.n_proxy]
    if remove:
        keep_proxy = [r["prompt"] for r in base["safety_fit"] if r["confidence"] > THRESHOLD]
    else:
        keep_proxy = list(data["neutral"])
    keep_proxy = keep_proxy[: cfg.data.n_proxy] or data["safety_fit"][: cfg.data.n_proxy]
    if not target_proxy:
        raise UserError("the model does not refuse any target prompt at baseline; nothing to "
                        "remove (check the target sets or use mode = \"induce\")")

    def search() -> dict[str, Any]:
        sets = proxy_sets(lm, target_proxy, keep_proxy, data["neutral_proxy"], gate,
                          leak=gate_rec["leak"] if gate is not None else 0.0,
                          batch_size=cfg.batch_size)
        study = run_study(lm, dirs["directions"], dirs["gaps"].tolist(), space, sets,
                          trials=cfg.search.trials, storage=run.file("study.sqlite"),
                          seed=cfg.seed, gate=gate, levels=levels)
        trials = [trial_record(t) for t in study.trials if t.values is not None]
        assert sets.target_base is not None
        unsteered = float(refusal_log_odds(sets.target_base, refusal_token_ids(lm)).mean())
        base_obj = -space.sign * unsteered
        return {"trials": trials, "unsteered_target": unsteered,
                "candidates": pareto_candidates(study, cfg.search.kl_max, cfg.search.verify,
                                                base_objective=base_obj)}

    searched = run.stage("search", search)

    # 5b. generate + judge only the promising candidates
    def verify() -> dict[str, Any]:
        rows, tokens = [], 0
        t_idx = pick[: cfg.search.verify_prompts]
        t_set = [data["target_fit"][i] for i in t_idx]
        t_base = [Judged(**base["target_fit"][i]) for i in t_idx]
        k_rows = {r["prompt"]: r for r in base["safety_fit" if remove else "neutral"]}
        k_base = [Judged(**k_rows[p]) if p in k_rows else None for p in keep_proxy]
        # every candidate shares the one gate: decide once per set
        t_open = gate_open(lm, gate, t_set) if gate is not None else None
        k_open = gate_open(lm, gate, keep_proxy) if gate is not None else None
        for cand in searched["candidates"]:
            prof = build_profile(cand["params"], dirs["directions"], dirs["gaps"].tolist(),
                                 space, gate, levels)
            gated = gate_of(prof) is not None
            jt, ot = judge_gated(lm, t_set, judge, prof, t_base, t_open if gated else None, **jk)
            if all(k_base):
                jkp, ok = judge_gated(lm, keep_proxy, judge, prof, k_base,
                                      k_open if gated else None, **jk)
            else:  # keep prompts without a baseline judgement: judge them all
                jkp = judge_prompts(lm, keep_proxy, judge, profile=prof, **jk)
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
                "chosen": choose(rows, base, remove, cfg.search.safety_keep, keep_proxy)}

    verified = run.stage("verify", verify)
    chosen = verified["chosen"]
    profile = build_profile(chosen["params"], dirs["directions"], dirs["gaps"].tolist(), space,
                            gate, levels)
    profile = Profile(profile.ops, meta={"method": cfg.directions.method, "mode": cfg.mode,
                                         "params": chosen["params"]})
    save_profile(profile, run.file("profile"), lm)

    # 6. held-out evaluation, with the baselines users would otherwise use
    baselines: dict[str, Profile] = {}
    if cfg.eval.baselines:
        for m in BASELINE_METHODS:
            if m in dirs:
                gaps, lv = gaps_levels(acts, dirs[m], c_target, remove, c_safety)
                baselines[f"{m}_steering"] = build_profile(chosen["params"], dirs[m], gaps,
                                                           space, gate, lv)
        if remove:
            rec = run.stage("arditi", lambda: arditi_baseline(lm, acts, data, base, cfg))
            baselines["arditi_ablation"] = arditi_profile(rec, lm)

    metrics = run.stage("evaluate", lambda: evaluate_all(lm, data, judge, profile, baselines,
                                                         jk, cfg))
    metrics.update({
        "mode": cfg.mode, "method": cfg.directions.method, "operator": cfg.search.operator,
        "chosen_layers": profile.layers,
        "chosen_strengths": {str(k): v for k, v in profile.ops[0].strengths.items()},
        "gated": bool(chosen["params"].get("gate", False)),
        "search_generated_tokens": verified["generated_tokens"],
        "proxy_rank_agreement": verified.get("proxy_rank_agreement"),
        "search_trials": len(searched["trials"]),
    })
    if gate is not None:
        metrics["gate"] = {k: v for k, v in gate_rec.items() if k not in ("vector", "layers")}
    timings = run.read_json("timings.json") if run.file("timings.json").is_file() else {}
    metrics["stage_seconds"] = {k: v for k, v in timings.items() if k != "total_this_process"}
    run.write_json("metrics.json", metrics)
    run.write_json("timings.json", {**timings,
                                    "total_this_process": time.perf_counter() - t_start})
    write_report(run, layer_rows, searched, verified, metrics)
    return run.path
