"""The abliteration search: Optuna over ablation kernels, two objectives, one Pareto front.

Each trial is a `Kernel` (direction layer or scope, one peak per writer component, optionally
an embedding weight). It is scored by judged refusals on the dev harmful prompts and
next-token KL on dev ordinary prompts, both minimised; a trial whose KL is beyond
`kl_prune` is pruned before anything is generated. The study lives in SQLite inside the run
folder, so an interrupted search resumes at the next trial.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from refusalkit.abliterate.config import AbliterateSearch
from refusalkit.evaluate import Judged, judge_prompts
from refusalkit.judge import Judge, JudgementCache
from refusalkit.judge.protocol import classify
from refusalkit.kernels import Kernel, Peak, kernel_hooks, layer_modules
from refusalkit.models import LoadedModel
from refusalkit.scoring import kl_divergence, last_logprobs


@dataclass(frozen=True)
class TrialScore:
    refusals: int  # judged refusals among the n harmful prompts
    n: int
    kl: float
    answers: list[dict[str, Any]]


def components(lm: LoadedModel) -> list[str]:
    """The writer components this model has (attn, mlp), in a fixed order."""
    found = {c for layer in range(lm.n_layers) for c, _ in layer_modules(lm.arch, layer)}
    return sorted(found)


def kernel_from_params(params: dict[str, Any], comps: Sequence[str],
                       preserve_norms: bool = False) -> Kernel:
    """The kernel a trial's parameters describe (min weight is sampled as a fraction of the
    peak, since multivariate TPE cannot sample a range that depends on another parameter)."""
    peaks = {}
    for c in comps:
        top = float(params[f"{c}.max_weight"])
        peaks[c] = Peak(top, float(params[f"{c}.position"]),
                        float(params[f"{c}.min_fraction"]) * top, float(params[f"{c}.distance"]))
    direction = None if params.get("scope", "global") == "per_layer" else float(
        params["direction"])
    return Kernel(direction, peaks, float(params.get("embed", 0.0)), preserve_norms)


def suggest(trial: optuna.Trial, space: AbliterateSearch, n_layers: int,
            comps: Sequence[str]) -> dict[str, Any]:
    last = n_layers - 1
    params: dict[str, Any] = {}
    params["scope"] = (trial.suggest_categorical("scope", list(space.scopes))
                       if len(space.scopes) > 1 else space.scopes[0])
    lo, hi = space.direction_range
    params["direction"] = trial.suggest_float("direction", lo * last, hi * last)
    for c in comps:
        params[f"{c}.max_weight"] = trial.suggest_float(f"{c}.max_weight", *space.max_weight)
        params[f"{c}.position"] = trial.suggest_float(
            f"{c}.position", space.peak_range[0] * last, space.peak_range[1] * last)
        params[f"{c}.min_fraction"] = trial.suggest_float(f"{c}.min_fraction", 0.0, 1.0)
        params[f"{c}.distance"] = trial.suggest_float(f"{c}.distance", 1.0,
                                                      max(1.0 + 1e-6, space.max_distance * last))
    if space.embed:
        params["embed"] = trial.suggest_float("embed", 0.0, 1.0)
    return params


def seed_params(best_layers: Sequence[int], space: AbliterateSearch, n_layers: int,
                comps: Sequence[str]) -> list[dict[str, Any]]:
    """Informed first trials, all derived from where the direction separates best (L, then
    the runner-up L2) and the depth: Arditi's flat kernel (weight 1 at every layer) on L; a
    peak a quarter of the depth past L falling to a quarter weight over a third of the depth
    (later writers carry less of what ordinary answers need, Heretic's experience); the flat
    kernel at the lowest allowed weight; and the flat kernel on L2. Values are clipped into
    the search ranges, so Optuna's model sees them as ordinary points."""
    last = n_layers - 1
    lo_w = space.max_weight[0]

    def clip(x: float, lo: float, hi: float) -> float:
        return min(max(x, lo), hi)

    def point(layer: int, weight: float, peak: float, low: float, dist: float) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if len(space.scopes) > 1:
            p["scope"] = "global"
        p["direction"] = clip(layer, space.direction_range[0] * last,
                              space.direction_range[1] * last)
        for c in comps:
            p[f"{c}.max_weight"] = clip(weight, *space.max_weight)
            p[f"{c}.position"] = clip(peak, space.peak_range[0] * last,
                                      space.peak_range[1] * last)
            p[f"{c}.min_fraction"] = low
            p[f"{c}.distance"] = clip(dist, 1.0, max(1.0, space.max_distance * last))
        if space.embed:
            p["embed"] = 0.0
        return p

    first = best_layers[0]
    out = [point(first, 1.0, first, 1.0, last),
           point(first, 1.0, first + 0.25 * last, 0.25, last / 3),
           point(first, lo_w, first, 1.0, last)]
    out += [point(layer, 1.0, layer, 1.0, last) for layer in best_layers[1:]]
    return out


def score_kernel(lm: LoadedModel, kernel: Kernel, directions: torch.Tensor, *,
                 harmful: Sequence[str], harmless: Sequence[str], harmless_base: torch.Tensor,
                 judge: Judge, cache: JudgementCache | None, max_new_tokens: int,
                 batch_size: int, kl_prune: float | None = None) -> TrialScore | float:
    """Judged refusals on `harmful` and mean next-token KL on `harmless` under the kernel;
    just the KL (a float) when it exceeds `kl_prune`."""
    with kernel_hooks(lm, kernel, directions):
        logp = last_logprobs(lm, harmless, batch_size=batch_size)
        kl = float(kl_divergence(harmless_base, logp).mean())
        if kl_prune is not None and kl > kl_prune:
            return kl
        judged = judge_prompts(lm, harmful, judge, max_new_tokens=max_new_tokens, cache=cache,
                               batch_size=batch_size)
    answers = answer_rows(judged)
    return TrialScore(refusal_count(answers), len(judged), kl, answers)


def answer_rows(judged: Sequence[Judged]) -> list[dict[str, Any]]:
    """Judged answers as the JSON rows trials and stages store."""
    return [{"prompt": j.prompt, "response": j.response, "confidence": j.confidence,
             "style": j.style, "on_topic": j.on_topic} for j in judged]


def refusal_count(rows: Sequence[dict[str, Any]]) -> int:
    """Rows whose confidence classifies as refusal (c > the protocol's threshold)."""
    return sum(classify(r["confidence"]) == "refusal" for r in rows)


def sampled_kl(score: TrialScore, floor: float) -> float:
    """The KL objective the sampler sees: the measured KL, or below `floor` the floor scaled
    by the refusal fraction (gentle trials then compete on refusals, not on being inert)."""
    return score.kl if score.kl >= floor else floor * score.refusals / max(1, score.n)


def bracket_params(done: Sequence[tuple[dict[str, Any], float]], target: float
                   ) -> dict[str, Any] | None:
    """Parameters expected to land at KL `target`: between the completed trial with the
    highest KL at or below it and the one with the lowest KL above it (same scope), at the
    secant in √KL (KL grows about quadratically with a small weight change, so √KL is near
    linear along the line), kept within the middle 60 % of the segment: where KL bends more
    than that, the plain secant keeps landing on one side and creeps (the head-to-head's
    three aimed trials, aiming at 0.09: 0.102, 0.1004, 0.0989), and the clip shrinks the
    bracket by a fifth or more each step. None when no such pair exists or a trial already
    lies within target / 9 of it (a tenth of the budget, for the search's 0.9 × kl_max)."""
    if any(abs(kl - target) <= target / 9 for _, kl in done):
        return None
    above = [(p, kl) for p, kl in done if kl > target]
    if not above:
        return None
    hi, kl_hi = min(above, key=lambda x: x[1])
    below = [(p, kl) for p, kl in done if kl <= target and p.keys() == hi.keys()
             and p.get("scope") == hi.get("scope")]
    if not below:
        return None
    lo, kl_lo = max(below, key=lambda x: x[1])
    t = (target ** 0.5 - kl_lo ** 0.5) / (kl_hi ** 0.5 - kl_lo ** 0.5)
    t = min(max(t, 0.2), 0.8)
    return {k: v if isinstance(v, str) else v + t * (hi[k] - v) for k, v in lo.items()}


def run_search(lm: LoadedModel, directions: torch.Tensor, space: AbliterateSearch, *,
               trials: int, storage: Path, seed: int, seeds: list[dict[str, Any]],
               evaluate: Callable[[Kernel], TrialScore | float],
               on_trial: Callable[[int, dict[str, Any]], None] | None = None,
               kl_max: float | None = None) -> optuna.Study:
    """Run (or resume) the study until it holds `trials` finished (complete or pruned)
    trials; objectives are (refusals, KL), both minimised. Once the seeds are done, up to
    `space.bracket` trials aim at 0.9 × `kl_max` (see `bracket_params`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    comps = components(lm)
    sampler = optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=min(space.startup, trials))
    study = optuna.create_study(study_name="abliterate", storage=f"sqlite:///{storage}",
                                load_if_exists=True, directions=["minimize", "minimize"],
                                sampler=sampler)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if not study.trials:  # a fresh study: queue the informed points first
        for p in seeds[:trials]:
            study.enqueue_trial(p, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = suggest(trial, space, lm.n_layers, comps)
        kernel = kernel_from_params(params, comps, space.preserve_norms)
        trial.set_user_attr("kernel", kernel.to_json())
        result = evaluate(kernel)
        if isinstance(result, float):
            trial.set_user_attr("kl", result)
            if on_trial is not None:
                on_trial(trial.number, {"kl": result, "pruned": True})
            raise optuna.TrialPruned(f"KL {result:.3f} above the prune limit")
        trial.set_user_attr("kl", result.kl)
        trial.set_user_attr("refusals", result.refusals)
        trial.set_user_attr("n", result.n)
        trial.set_user_attr("answers", result.answers)
        if on_trial is not None:
            on_trial(trial.number, {"kl": result.kl, "refusals": result.refusals,
                                    "n": result.n})
        return float(result.refusals), sampled_kl(result, space.kl_floor)

    # A trial left RUNNING by a killed process is abandoned; it does not count.
    while True:
        now = study.get_trials(deepcopy=False)
        if sum(t.state in finished for t in now) >= trials:
            return study
        queued = any(t.state == optuna.trial.TrialState.WAITING for t in now)
        aimed = sum(bool(t.user_attrs.get("bracket")) for t in now)
        if not queued and kl_max is not None and aimed < space.bracket:
            point = bracket_params([(t.params, t.user_attrs["kl"]) for t in now
                                    if t.state == optuna.trial.TrialState.COMPLETE],
                                   0.9 * kl_max)
            if point is not None:
                study.enqueue_trial(point, user_attrs={"bracket": True})
        study.optimize(objective, n_trials=1, catch=())


def trial_records(study: optuna.Study) -> list[dict[str, Any]]:
    """Every finished trial as plain JSON (kernel, KL, refusals; pruned ones flagged)."""
    out = []
    for t in study.trials:
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        rec = {"number": t.number, "params": dict(t.params), "kernel": t.user_attrs["kernel"],
               "kl": t.user_attrs.get("kl"), "pruned": t.state == optuna.trial.TrialState.PRUNED}
        if not rec["pruned"]:
            rec.update(refusals=t.user_attrs["refusals"], n=t.user_attrs["n"],
                       answers=t.user_attrs.get("answers", []))
        out.append(rec)
    return out


def pareto_front(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated completed trials (fewer refusals or lower KL), by KL ascending."""
    done = [r for r in records if not r["pruned"]]
    front = [r for r in done
             if not any((o["refusals"] <= r["refusals"] and o["kl"] <= r["kl"])
                        and (o["refusals"] < r["refusals"] or o["kl"] < r["kl"]) for o in done)]
    return sorted(front, key=lambda r: (r["kl"], r["refusals"], r["number"]))


def choose(front: Sequence[dict[str, Any]], kl_max: float) -> tuple[dict[str, Any], bool]:
    """The trial with the fewest refusals within the KL budget, ties to the lower KL; when no
    trial is within it, the lowest-KL one. Returns (trial, within budget)."""
    ok = [r for r in front if r["kl"] <= kl_max]
    if ok:
        return min(ok, key=lambda r: (r["refusals"], r["kl"], r["number"])), True
    return min(front, key=lambda r: (r["kl"], r["number"])), False
