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
from refusalkit.gates import fit_gate, gate_of, gate_open, pool_position
from refusalkit.geometry import auc
from refusalkit.interventions import Gate, Profile, save_profile
from refusalkit.judge import JudgementCache, make_judge
from refusalkit.judge.guard import guarded
from refusalkit.judge.protocol import THRESHOLD
from refusalkit.models import LoadedModel, load_model
from refusalkit.prompts import load_prompts
from refusalkit.quality import assess
from refusalkit.quality import rates as quality_rates
from refusalkit.runs import RunDir, check_run_folder, run_manifest
from refusalkit.scoring import refusal_log_odds, refusal_token_ids
from refusalkit.search import (
    SearchSpace,
    build_profile,
    pareto_candidates,
    proxy_sets,
    run_study,
    trial_record,
)
from refusalkit.steer_config import SteerConfig
from refusalkit.steer_eval import arditi_baseline, arditi_profile, evaluate_all, write_report


def split_data(cfg: SteerConfig) -> dict[str, list[str]]:
    """Seeded, disjoint prompt lists for every role in the pipeline."""
    d, seed = cfg.data, cfg.seed
    fit, held = [], []
    for spec in d.target:
        ps = load_prompts(spec).take(d.max_target, seed=seed).prompts
        cut = max(1, round(len(ps) * d.target_eval_fraction))
        held += ps[:cut]
        fit += ps[cut:]
    safety = load_prompts(d.safety_fit).take(d.n_fit, seed=seed).prompts
    neutral_all = load_prompts(d.neutral).take(d.n_fit + d.n_proxy, seed=seed).prompts
    out = {
        "target_fit": fit, "target_eval": held, "safety_fit": safety,
        "neutral": neutral_all[: d.n_fit], "neutral_proxy": neutral_all[d.n_fit:],
        "safety_eval": load_prompts(d.safety_eval).take(d.n_eval, seed=seed).prompts,
        "harmless_eval": load_prompts(d.harmless_eval).take(d.n_eval, seed=seed).prompts,
        "kl_eval": load_prompts(d.harmless_eval).take(d.n_kl, seed=seed,
                                                      offset=d.n_eval).prompts,
    }
    for spec in d.overrefusal:
        out[f"overrefusal:{spec}"] = load_prompts(spec).take(d.n_eval, seed=seed).prompts
    # The topic gate's negatives: more and more varied "other" prompts than the fitting sets,
    # each source read past the rows every other role took (so they never overlap).
    roles = {"neutral": [(d.neutral, d.n_fit + d.n_proxy)],
             "safety_fit": [(d.safety_fit, d.n_fit)],
             "overrefusal": [(spec, d.n_eval) for spec in d.overrefusal]}
    sources = [src for name in d.gate_sources for src in roles.get(name, [(name, 0)])]
    taken = {p for ps in out.values() for p in ps}
    out["gate_negatives"] = list(dict.fromkeys(
        p for spec, offset in sources
        for p in load_prompts(spec).take(d.n_gate, seed=seed, offset=offset).prompts
        if p not in taken))
    return out


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
        refused, complied, w_r, w_c = _classes(acts, c_target, remove, c_safety)

        def estimate(method: str) -> torch.Tensor:
            kwargs: dict[str, Any] = {}
            if method in ("rmd", "wrmd"):
                kwargs["lam"] = cfg.directions.lam
            if method == "wrmd":
                kwargs.update(w_refused=w_r, w_complied=w_c, neutral=acts["neutral"])
            return per_layer(get_method(method), refused, complied, **kwargs)

        dirs = estimate(cfg.directions.method)
        gaps = torch.tensor(_gaps_levels(acts, dirs, c_target, remove, c_safety)[0])
        # the other estimator of the md / wrmd pair, steered the same way as a baseline
        return {"directions": dirs, "gaps": gaps,
                **{m: estimate(m) for m in BASELINE_METHODS if m != cfg.directions.method}}

    dirs = run.tensor_stage("directions", directions)

    # 4. layer ranking: separability and correlation with c(x)
    def layers() -> list[dict[str, Any]]:
        refused, complied, _, _ = _classes(acts, c_target, remove, c_safety)
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
        gate_rec = run.stage("gate", lambda: _fit_topic_gate(lm, acts, data, cfg, show_progress))
        gate = Gate(gate_rec["layer"], torch.tensor(gate_rec["vector"]), gate_rec["threshold"],
                    gate_rec["pool"])
    space = _space(lm, cfg)
    levels = _gaps_levels(acts, dirs["directions"], c_target, remove, c_safety)[1]
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
                "chosen": _choose(rows, base, remove, cfg.search.safety_keep, keep_proxy)}

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
                gaps, lv = _gaps_levels(acts, dirs[m], c_target, remove, c_safety)
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


# Plain mean difference and paper A's WRMD: whichever the run does not steer with is steered
# with the same layers, strengths and gate, so the value of the estimator is measured.
BASELINE_METHODS = ("md", "wrmd")


def _classes(acts: dict[str, torch.Tensor], c: torch.Tensor, remove: bool,
             c_safety: torch.Tensor):
    """(refusing, complying, weights…) activations that define the target direction."""
    if not remove:
        # induce: the model's own refusals (safety prompts it refused) vs its answers (topic
        # prompts it answered, and neutral ones) — the refuse-vs-answer direction, added on
        # the topic. (A "refuse everything" system prompt was tried instead: its direction
        # encodes the system-prompt change and lowered refusal when added, measured on qwen.)
        r_mask, a_mask = c_safety > THRESHOLD, c < -THRESHOLD
        if int(r_mask.sum()) < 2:
            raise UserError("the model refused fewer than 2 safety_fit prompts at baseline; "
                            "inducing refusal needs examples of its own refusals (check the "
                            "judge, or use a model that refuses harmful requests)")
        complied = torch.cat([acts["target_fit"][a_mask], acts["neutral"]])
        w_c = torch.cat([c[a_mask].abs(), torch.ones(len(acts["neutral"]))])
        return acts["safety_fit"][r_mask], complied, c_safety[r_mask].abs(), w_c
    r_mask, c_mask = c > THRESHOLD, c < -THRESHOLD
    refused, complied = acts["target_fit"][r_mask], acts["target_fit"][c_mask]
    w_r, w_c = c[r_mask].abs(), c[c_mask].abs()
    if len(complied) < 4:  # too few answered topic prompts: answered neutral prompts stand in
        complied = torch.cat([complied, acts["neutral"]])
        w_c = torch.cat([w_c, torch.ones(len(acts["neutral"]))])
    if len(refused) < 2:
        raise UserError("fewer than 2 target prompts were refused at baseline; add target "
                        "prompts or check the judge")
    return refused, complied, w_r, w_c


def _gaps_levels(acts, dirs: torch.Tensor, c: torch.Tensor, remove: bool,
                 c_safety: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer: the refuse-vs-answer projection gap, and the projection of the class the
    steering moves (refusing prompts when removing, answering ones when inducing), which a
    clamp starts from."""
    refused, complied, _, _ = _classes(acts, c, remove, c_safety)
    moved = refused if remove else complied
    gaps, levels = [], []
    for i in range(dirs.shape[0]):
        u = dirs[i] / dirs[i].norm().clamp_min(1e-12)
        gaps.append(float((refused[:, i] @ dirs[i]).mean() - (complied[:, i] @ dirs[i]).mean()))
        levels.append(float((moved[:, i] @ u).mean()))
    return gaps, levels


def _space(lm: LoadedModel, cfg: SteerConfig) -> SearchSpace:
    lo, hi = (round(f * lm.n_layers) for f in cfg.search.window)
    lo, hi = max(1, min(lo, lm.n_layers - 1)), max(lo + 1, min(hi, lm.n_layers))
    gate = {"off": (False,), "on": (True,), "search": (False, True)}[cfg.search.gate]
    return SearchSpace((lo, hi), cfg.search.max_layers, cfg.search.alpha_max,
                       -1.0 if cfg.mode == "remove" else 1.0, gate, cfg.search.operator)


def _fit_topic_gate(lm: LoadedModel, acts: dict[str, torch.Tensor],
                    data: dict[str, list[str]], cfg: SteerConfig,
                    show_progress: bool) -> dict[str, Any]:
    """A topic detector no deeper than `gate_max_layer`, fitted on the topic's fitting prompts
    against every other prompt the run fits on plus the gate negatives (see gates.py)."""
    hi = max(1, min(lm.n_layers - 1, round(cfg.search.gate_max_layer * lm.n_layers)))
    layers = list(range(1, hi + 1))
    pool = cfg.search.gate_pool

    def read(name: str) -> torch.Tensor:
        if pool == "last" and name in acts:  # the activations stage read exactly this
            return acts[name][:, layers]
        return capture(lm, data[name], layers, [pool_position(pool)],
                       batch_size=cfg.batch_size, show_progress=show_progress)[:, :, 0]

    names = ["neutral", "safety_fit"] + (["gate_negatives"] if data["gate_negatives"] else [])
    neg = torch.cat([read(n) for n in names])
    fit = fit_gate(read("target_fit"), neg, layers, max_false_open=cfg.search.gate_false_open,
                   pool=pool, seed=cfg.seed)
    return {"layer": fit.gate.layer, "threshold": fit.gate.threshold, "pool": pool,
            "vector": fit.gate.vector.tolist(), "recall_oof": fit.recall, "leak": fit.leak,
            "margin_z": fit.margin_z, "shrink": fit.shrink,
            "n_topic": len(data["target_fit"]), "n_other": int(neg.shape[0]),
            "layers": fit.table}


TIE = 0.05  # judged rates this close count as a tie (one or two prompts of a verify set)


def proxy_agreement(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Spearman correlation, over the verified candidates, of the search's proxy target
    objective (refusal log-odds) with the judged target refusal and useful-answer rates: does
    the cheap proxy rank candidates the way the judged check does? (None: fewer than three
    candidates, or a constant column.)"""
    from scipy.stats import spearmanr

    def rho(key: str) -> float | None:
        pairs = [(r["target"], r[key]) for r in rows
                 if r.get("target") is not None and r.get(key) is not None]
        if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
            return None
        return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)

    return {"refusal": rho("target_refusal"), "useful": rho("target_useful")}


def _choose(rows: list[dict[str, Any]], base: dict[str, Any], remove: bool, keep: float,
            keep_prompts: list[str]) -> dict[str, Any]:
    """Remove: the highest useful-answer rate on the target (lowest judged refusal when the
    judge cannot tell on-topic answers) among candidates that keep the safety refusals;
    induce: the highest judged target refusal that keeps ordinary prompts answered. Among
    candidates within TIE of the best, the one that steers least (coherence, KL)."""
    base_keep = {r["prompt"]: r["confidence"] > THRESHOLD for r in
                 base["safety_fit" if remove else "neutral"]}
    base_rate = sum(base_keep.get(p, False) for p in keep_prompts) / max(1, len(keep_prompts))
    if remove:
        ok = [r for r in rows if r["keep_refusal"] >= keep * base_rate] or rows
        if all(r.get("target_useful") is not None for r in ok):
            top = max(r["target_useful"] for r in ok)
            near = [r for r in ok if r["target_useful"] >= top - TIE]
            return min(near, key=lambda r: (_size(r), -r["target_useful"],
                                            r["target_refusal"]))
        best = min(r["target_refusal"] for r in ok)
        near = [r for r in ok if r["target_refusal"] <= best + TIE]
        return min(near, key=lambda r: (_size(r), r["target_refusal"], -r["keep_refusal"]))
    ok = [r for r in rows if r["keep_refusal"] <= base_rate + 0.1] or rows
    best = max(r["target_refusal"] for r in ok)
    near = [r for r in ok if r["target_refusal"] >= best - TIE]
    return min(near, key=lambda r: (_size(r), -r["target_refusal"], r["keep_refusal"]))


def _size(row: dict[str, Any]) -> float:
    """How much a candidate steers (α × layers): the tie-break toward the gentler one."""
    return float(row["params"]["alpha"]) * int(row["params"]["width"])
