"""Run Heretic 1.4's search and re-measure its Pareto front on held-out prompts.

Runs inside Heretic's own virtual environment (bench_abliterate.py makes it), so nothing
here imports refusalkit. It uses Heretic's own Model (loading, LoRA abliteration, greedy
generation, first-token log-probs) and Evaluator (its marker judge and KL); the search
loop is Heretic's `main.run` without the interactive parts: the same TPE sampler settings,
the same parameter ranges and the same objective. Usage: python heretic_driver.py JOB.json
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    sys.argv = sys.argv[:1]  # Heretic's settings parse the command line
    import optuna
    import torch
    import torch.nn.functional as F
    from heretic.config import DatasetSpecification, Settings
    from heretic.evaluator import Evaluator
    from heretic.model import AbliterationParameters, Model
    from heretic.utils import load_prompts

    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    t0 = time.perf_counter()

    def spec(name: str) -> DatasetSpecification:
        return DatasetSpecification(dataset=job["files"][name])

    settings = Settings(
        model=job["model"], n_trials=job["trials"], n_startup_trials=job["startup"],
        seed=job["seed"], batch_size=job["batch_size"],
        max_response_length=job["max_new_tokens"], system_prompt=job["system_prompt"],
        response_prefix="", dtypes=["float32"], device_map="cpu",
        good_prompts=spec("harmless_fit"), bad_prompts=spec("harmful_fit"),
        good_evaluation_prompts=spec("harmless_search"),
        bad_evaluation_prompts=spec("harmful_search"))
    model = Model(settings)
    good = load_prompts(settings, settings.good_prompts)
    bad = load_prompts(settings, settings.bad_prompts)
    evaluator = Evaluator(settings, model)
    directions = F.normalize(model.get_residuals_mean(bad) - model.get_residuals_mean(good),
                             p=2, dim=1)
    last = len(model.get_layers()) - 1
    comps = model.get_abliterable_components()

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        scope = trial.suggest_categorical("direction_scope", ["global", "per layer"])
        index = trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
        params = {}
        for c in comps:
            top = trial.suggest_float(f"{c}.max_weight", 0.8, 1.5)
            pos = trial.suggest_float(f"{c}.max_weight_position", 0.6 * last, 1.0 * last)
            low = trial.suggest_float(f"{c}.min_weight", 0.0, 1.0)
            dist = trial.suggest_float(f"{c}.min_weight_distance", 1.0, 0.6 * last)
            params[c] = AbliterationParameters(max_weight=top, max_weight_position=pos,
                                               min_weight=low * top, min_weight_distance=dist)
        index_used = None if scope == "per layer" else index
        trial.set_user_attr("direction_index", index_used)
        trial.set_user_attr("parameters", {k: asdict(v) for k, v in params.items()})
        model.reset_model()
        model.abliterate(directions, index_used, params)
        score, kl, refusals = evaluator.get_score()
        trial.set_user_attr("kl_divergence", kl)
        trial.set_user_attr("refusals", refusals)
        print(f"heretic trial {trial.number}: KL {kl:.4f}, refusals {refusals}/"
              f"{len(evaluator.bad_prompts)}", file=sys.stderr, flush=True)
        return score

    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(n_startup_trials=settings.n_startup_trials,
                                           n_ei_candidates=128, multivariate=True,
                                           seed=settings.seed),
        directions=["minimize", "minimize"])
    study.optimize(objective, n_trials=settings.n_trials)
    search_s = time.perf_counter() - t0

    # Heretic's own Pareto rule (main.run): by refusals, keep each strictly lower KL
    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                  key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"]))
    front, best_kl = [], math.inf
    for t in done:
        if t.user_attrs["kl_divergence"] < best_kl:
            best_kl = t.user_attrs["kl_divergence"]
            front.append(t)

    held_bad = load_prompts(settings, spec("harmful_eval"))
    held_good = load_prompts(settings, spec("harmless_eval"))
    model.reset_model()
    base_logp = model.get_logprobs_batched(held_good)
    records = [{"trial": "unsteered", "kl": 0.0,
                "responses": model.get_responses_batched(held_bad, skip_special_tokens=True)}]
    picks = [t for t in front if t.user_attrs["kl_divergence"] <= job["kl_eval_max"]]
    for t in picks[: job["eval_front"]]:
        model.reset_model()
        model.abliterate(directions, t.user_attrs["direction_index"],
                         {k: AbliterationParameters(**v)
                          for k, v in t.user_attrs["parameters"].items()})
        logp = model.get_logprobs_batched(held_good)
        kl = F.kl_div(logp, base_logp, reduction="batchmean", log_target=True).item()
        records.append({"trial": t.number, "dev_kl": t.user_attrs["kl_divergence"],
                        "dev_refusals": t.user_attrs["refusals"], "kl": kl,
                        "responses": model.get_responses_batched(
                            held_bad, skip_special_tokens=True)})
        print(f"heretic front trial {t.number}: held-out KL {kl:.4f}", file=sys.stderr,
              flush=True)
    out = {"prompts": [p.user for p in held_bad], "records": records,
           "front": [{"trial": t.number, "kl": t.user_attrs["kl_divergence"],
                      "refusals": t.user_attrs["refusals"]} for t in front],
           "trials": [{"trial": t.number, "kl": t.user_attrs["kl_divergence"],
                       "refusals": t.user_attrs["refusals"]} for t in done],
           "n_dev": len(evaluator.bad_prompts), "search_s": search_s,
           "wall_s": time.perf_counter() - t0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(job["out"]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
