"""`refusalkit abliterate`: a copy of a model that stops refusing, with as little damage as
the search can find (Heretic's job, judged by a judge that sees babble).

Stages (each stored in the run folder, so an interrupted run resumes where it stopped):
1. `data` — seeded, disjoint prompt lists: fit, dev (search) and held-out (eval) sets;
2. `directions` — per-layer difference of means, harmful minus harmless, at the last prompt
   token, and how well each layer's direction separates the two (AUC);
3. `baseline` — the unsteered model judged on the dev harmful prompts;
4. `search` — the Optuna study over ablation kernels (resumable per trial);
5. `heldout-N` — the Pareto front (and the unsteered model) re-measured on held-out prompts,
   judged by the default judge and the comparison judges: what the report states;
Then the chosen trial (`choice.json`: flag, interactive pick, or the dev rule), the checkpoint
with its model card, the reproduce file, metrics and the report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusalkit.abliterate.config import AbliterateConfig
from refusalkit.abliterate.search import (
    answer_rows,
    choose,
    components,
    pareto_front,
    refusal_count,
    run_search,
    score_kernel,
    seed_params,
    trial_records,
)
from refusalkit.activations import capture
from refusalkit.artifacts import dataset_record, model_record
from refusalkit.directions import get_method, per_layer
from refusalkit.errors import UserError
from refusalkit.evaluate import Judged, assess_answers, judge_prompts
from refusalkit.geometry import layer_auc
from refusalkit.judge import JudgementCache, make_judge
from refusalkit.kernels import Kernel, kernel_hooks
from refusalkit.models import LoadedModel, load_model
from refusalkit.prompts import load_prompts
from refusalkit.quality import rates
from refusalkit.runs import Reads, RunDir, check_run_folder, run_manifest
from refusalkit.scoring import kl_divergence, last_logprobs
from refusalkit.steer.search import spread

Chooser = Callable[[list[dict[str, Any]], dict[str, Any]], int | None]

# What the unsteered stages read besides the model, so `--reuse-from` can take them from an
# earlier run (a longer search keeps the directions, the baseline and the unsteered held-out
# figures). The model's behaviour also depends on the reasoning switch and the system prompt;
# the search and each trial's held-out measure read nearly everything and are computed.
_MODEL = ("model", "reasoning", "system_prompt", "batch_size")
STAGE_READS: dict[str, Reads] = {
    "directions": Reads((*_MODEL, "direction_method"), ("harmful_fit", "harmless_fit")),
    "baseline": Reads((*_MODEL, "judge.spec", "judge.max_new_tokens"), ("harmful_search",)),
    "heldout-unsteered": Reads((*_MODEL, "judge"), ("harmful_eval",)),
}


@dataclass(frozen=True)
class Splits:
    harmful_fit: list[str]
    harmless_fit: list[str]
    harmful_search: list[str]
    harmless_search: list[str]
    harmful_eval: list[str]
    harmless_eval: list[str]

    def records(self) -> list[dict[str, Any]]:
        return [dataset_record(k, v) for k, v in vars(self).items()]


def split_data(cfg: AbliterateConfig) -> Splits:
    """Seeded prompt lists; a set drawn from the same source as another reads past its rows,
    so fit, dev and held-out prompts never overlap."""
    d, seed = cfg.data, cfg.seed
    taken: dict[str, int] = {}

    def take(spec: str, n: int) -> list[str]:
        offset = taken.get(spec, 0)
        taken[spec] = offset + n
        return load_prompts(spec).take(n, seed=seed, offset=offset).prompts

    return Splits(take(d.harmful_fit, d.n_fit), take(d.harmless_fit, d.n_fit),
                  take(d.harmful_search, d.n_search), take(d.harmless_search, d.n_search_kl),
                  take(d.harmful_eval, d.n_eval), take(d.harmless_eval, d.n_eval_kl))


def fit_directions(lm: LoadedModel, splits: Splits, batch_size: int, show_progress: bool,
                   method: str) -> dict[str, torch.Tensor]:
    """Per-layer refusal directions (resid_pre of each layer, last prompt token) and AUCs."""
    layers = list(range(lm.n_layers))
    pos = capture(lm, splits.harmful_fit, layers, (-1,), batch_size=batch_size,
                  show_progress=show_progress)[:, :, 0]
    neg = capture(lm, splits.harmless_fit, layers, (-1,), batch_size=batch_size,
                  show_progress=show_progress)[:, :, 0]
    directions = per_layer(get_method(method), pos, neg)
    aucs = torch.tensor(layer_auc(pos, neg, directions), dtype=torch.float64)
    return {"directions": directions, "auc": aucs}


def best_layers(aucs: Sequence[float], cfg: AbliterateConfig, n_layers: int,
                k: int = 2) -> list[int]:
    """The k layers in the direction range whose directions separate best (deeper on ties)."""
    lo, hi = cfg.search.direction_range
    last = n_layers - 1
    allowed = [i for i in range(n_layers) if lo * last <= i <= hi * last] or list(range(n_layers))
    return sorted(allowed, key=lambda i: (-round(float(aucs[i]), 6), -i))[:k]


def run_abliterate(cfg: AbliterateConfig, out: str | Path, *, resume: bool = False,
                   lm: LoadedModel | None = None, trial: int | None = None,
                   chooser: Chooser | None = None, gguf: bool = False,
                   show_progress: bool = True, on_trial: Callable[..., None] | None = None,
                   reuse_from: str | Path | None = None) -> Path:
    """Search, choose, and write the abliterated checkpoint into run folder `out` (taking
    the stages STAGE_READS names from `reuse_from` where their inputs are unchanged)."""
    from refusalkit.abliterate.output import finish

    splits = split_data(cfg)
    check_run_folder(out, resume, reuse_from)  # before the slow model load
    judge = make_judge(cfg.judge.spec)
    compare = {spec: make_judge(spec) for spec in cfg.judge.compare if spec != cfg.judge.spec}
    lm = lm or load_model(cfg.model, reasoning=cfg.reasoning,
                           system_prompt=cfg.system_prompt)
    if gguf:  # fail before the search, not after it
        from refusalkit.abliterate.gguf_out import source_gguf

        source_gguf(lm)
    manifest = run_manifest("abliterate", cfg.model_dump(mode="json"), model=model_record(lm),
                            datasets=splits.records(), seeds={"seed": cfg.seed})
    with RunDir(out, manifest, resume=resume, reuse_from=reuse_from,
                defaults=type(cfg).defaults()) as run:
        cache = JudgementCache(run.file("judgements.sqlite"))
        fit = run.tensor_stage("directions", lambda: fit_directions(
            lm, splits, cfg.batch_size, show_progress, cfg.direction_method),
            STAGE_READS["directions"])
        directions = fit["directions"]
        jk = {"max_new_tokens": cfg.judge.max_new_tokens, "cache": cache,
              "batch_size": cfg.batch_size}

        def judged(prompts: list[str], kernel: Kernel | None) -> list[Judged]:
            if kernel is None:
                return judge_prompts(lm, prompts, judge, **jk)  # type: ignore[arg-type]
            with kernel_hooks(lm, kernel, directions):
                return judge_prompts(lm, prompts, judge, **jk)  # type: ignore[arg-type]

        base = run.stage("baseline", lambda: answer_rows(judged(splits.harmful_search, None)),
                         STAGE_READS["baseline"])
        if not refusal_count(base):
            raise UserError(
                f"'{lm.name}' refuses none of the {len(base)} dev harmful prompts "
                f"({cfg.data.harmful_search}) by judge {cfg.judge.spec}; there is no refusal "
                "to remove — check the model, the prompts or the judge")
        # the study runs inside the stage, so the run's timings count the search itself
        records = run.stage("search", lambda: trial_records(
            _search(run, lm, cfg, splits, fit, judge, cache, on_trial)))
        front = pareto_front(records)
        if not front:
            raise UserError(f"every one of the {len(records)} trials was pruned (KL above "
                            f"search.kl_prune = {cfg.search.kl_prune}); raise it or search "
                            "gentler kernels (search.max_weight)")
        auto, within = choose(front, cfg.kl_max)
        measure = make_measure(lm, cfg, splits, judged, directions, compare)
        heldout = _heldout(run, cfg, front, auto, measure)
        picked = _pick(front, auto, within, trial, chooser, heldout, records,
                       run.file("choice.json"))
        run.write_json("choice.json", picked)
        if str(picked["number"]) not in heldout:  # picked by hand off the measured set
            rec = next(r for r in records if r["number"] == picked["number"])
            heldout[str(picked["number"])] = heldout_stage(run, measure, rec)
        return finish(run, lm, cfg, splits, fit, records, front, heldout, picked, base,
                      gguf=gguf)


def _search(run: RunDir, lm: LoadedModel, cfg: AbliterateConfig, splits: Splits,
            fit: dict[str, torch.Tensor], judge: Any, cache: JudgementCache,
            on_trial: Callable[..., None] | None) -> Any:
    """The Optuna study (run or resumed): each trial's kernel scored by judged refusals on
    the dev harmful prompts and KL on the dev harmless ones, seeded with informed points."""
    directions = fit["directions"]
    search_base = last_logprobs(lm, splits.harmless_search, batch_size=cfg.batch_size)

    def evaluate(kernel: Kernel) -> Any:
        return score_kernel(lm, kernel, directions, harmful=splits.harmful_search,
                            harmless=splits.harmless_search, harmless_base=search_base,
                            judge=judge, cache=cache, max_new_tokens=cfg.judge.max_new_tokens,
                            batch_size=cfg.batch_size, kl_prune=cfg.search.kl_prune)

    seeds = seed_params(best_layers(fit["auc"].tolist(), cfg, lm.n_layers), cfg.search,
                        lm.n_layers, components(lm)) if cfg.search.seeds else []
    return run_search(lm, directions, cfg.search, trials=cfg.search.trials,
                      storage=run.file("study.sqlite"), seed=cfg.seed, seeds=seeds,
                      evaluate=evaluate, on_trial=on_trial, kl_max=cfg.kl_max)


def make_measure(lm: LoadedModel, cfg: AbliterateConfig, splits: Splits,
                 judged: Callable[[list[str], Kernel | None], list[Judged]],
                 directions: torch.Tensor, compare: dict[str, Any]
                 ) -> Callable[[Kernel | None], dict[str, Any]]:
    """Held-out figures of a kernel (None: the unsteered model): refusals on the held-out
    harmful prompts by every judge (one generation, judged several ways), what the answers
    are worth (useful, on-topic, loop and language-match rates by the default judge; each
    answer's perplexity under the unsteered model) and KL on the held-out ordinary prompts."""
    base_logp: list[torch.Tensor] = []
    ppl_cache: dict[tuple[str, str], float | None] = {}  # unsteered model, across kernels

    def measure(kernel: Kernel | None) -> dict[str, Any]:
        js = judged(splits.harmful_eval, kernel)
        rows = answer_rows(js)
        prompts = [r["prompt"] for r in rows]
        responses = [r["response"] for r in rows]
        refusals = {cfg.judge.spec: refusal_count(rows)}
        for spec, j in compare.items():
            refusals[spec] = sum(x.is_refusal for x in j.judge(prompts, responses))
        kl = 0.0
        if kernel is not None:
            if not base_logp:
                base_logp.append(last_logprobs(lm, splits.harmless_eval,
                                               batch_size=cfg.batch_size))
            with kernel_hooks(lm, kernel, directions):
                logp = last_logprobs(lm, splits.harmless_eval, batch_size=cfg.batch_size)
            kl = float(kl_divergence(base_logp[0], logp).mean())
        qs = assess_answers(lm, js, batch_size=cfg.batch_size, cache=ppl_cache)
        for r, q in zip(rows, qs, strict=True):
            r["quality"] = q.flags()
        return {"refusals": refusals, "n": len(rows), "kl": kl, "answers": rows,
                "quality": rates(qs)}

    return measure


def heldout_stage(run: RunDir, measure: Callable[[Kernel | None], dict[str, Any]],
                  rec: dict[str, Any] | None) -> dict[str, Any]:
    if rec is None:
        return run.stage("heldout-unsteered", lambda: measure(None),
                         STAGE_READS["heldout-unsteered"])
    kernel = Kernel.from_json(rec["kernel"])
    return run.stage(f"heldout-{rec['number']}", lambda: measure(kernel))


def heldout_picks(front: list[dict[str, Any]], auto: dict[str, Any], kl_max: float,
                  n: int) -> list[dict[str, Any]]:
    """Which front trials are re-measured held out: the automatic choice, the strongest trial
    (fewest dev refusals) within 2 × kl_max, and the rest spread over that KL range, at most
    `n` (the automatic choice always). Dev KL understates held-out KL and dev refusals are few, so
    the strongest near-budget trial must be measured: a spread by count alone could drop it for
    the automatic choice (the head-to-head run measured only three gentle trials that way)."""
    near = [r for r in front if r["kl"] <= 2 * kl_max] or front[:1]
    strongest = min(near, key=lambda r: (r["refusals"], r["kl"], r["number"]))
    must = ([auto] + ([strongest] if strongest is not auto else []))[: max(1, n)]
    rest = [r for r in near if all(r is not m for m in must)]
    picks = must + spread(rest, max(0, n - len(must)))
    return sorted(picks, key=lambda r: r["number"])


def _heldout(run: RunDir, cfg: AbliterateConfig, front: list[dict[str, Any]],
             auto: dict[str, Any], measure: Callable[[Kernel | None], dict[str, Any]]
             ) -> dict[str, Any]:
    """The unsteered model and the front trials `heldout_picks` names, held out."""
    out = {"unsteered": heldout_stage(run, measure, None)}
    for rec in heldout_picks(front, auto, cfg.kl_max, cfg.eval_front):
        out[str(rec["number"])] = heldout_stage(run, measure, rec)
    return out


def _pick(front: list[dict[str, Any]], auto: dict[str, Any], within: bool, trial: int | None,
          chooser: Chooser | None, heldout: dict[str, Any],
          records: list[dict[str, Any]], previous: Path) -> dict[str, Any]:
    """--trial wins; on resume an earlier pick stands; else the interactive chooser, else the
    rule (fewest dev refusals within the KL budget)."""
    if trial is None and previous.is_file():
        return json.loads(previous.read_text())
    if trial is not None:
        match = [r for r in records if r["number"] == trial and not r["pruned"]]
        if not match:
            numbers = ", ".join(str(r["number"]) for r in front)
            raise UserError(f"trial {trial} is not a completed trial of this run; the Pareto "
                            f"front holds trials {numbers}")
        return {"number": trial, "by": "flag", "within_budget": None}
    if chooser is not None:
        number = chooser(front, heldout)
        if number is not None:
            return {"number": int(number), "by": "interactive", "within_budget": None}
    return {"number": auto["number"], "by": "rule", "within_budget": within}
