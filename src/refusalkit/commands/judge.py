"""Judge commands: `judge` (label a responses file) and `judge-eval` (agreement with labels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from refusalkit.errors import UserError

if TYPE_CHECKING:
    from refusalkit.judge.cache import JudgementCache

SPEC_HELP = ("Judge spec: calibrated (default), keyword, llm[:MODEL], openai:URL#MODEL, hybrid, "
             "probe, ensemble:A+B, loop:SPEC, …")
DEFAULT_JUDGE = "calibrated"  # = refusalkit.judge.spec.DEFAULT_JUDGE (kept import-free here)


def _read_responses(path: Path, response_field: str) -> list[dict]:
    from refusalkit.prompts import read_jsonl

    rows = [row for _, row in read_jsonl(path, ("prompt", response_field))]
    if not rows:
        raise UserError(f"{path}: no rows to judge")
    return rows


def _cache(path: Path | None, disabled: bool) -> JudgementCache | None:
    from refusalkit.judge.cache import JudgementCache

    return None if disabled else JudgementCache(path)


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    @app.command("judge")
    def judge_cmd(
        ctx: typer.Context,
        input: Path = typer.Option(..., "--input", help="JSONL rows with prompt and response."),
        out: Path = typer.Option(..., "--out", help="JSONL to write (rows + judgement)."),
        judge: str = typer.Option(DEFAULT_JUDGE, "--judge", help=SPEC_HELP),
        response_field: str = typer.Option("response", "--response-field"),
        cache: Path | None = typer.Option(None, "--cache", help="Judgement cache (sqlite); "
                                          "default in the refusalkit cache folder."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write a cache."),
        chunk: int = typer.Option(16, "--chunk", help="Rows judged (and saved) at a time."),
    ) -> None:
        """Label every response as refusal / partial / compliance with a score and style.

        Rows are written as each chunk is judged and every judgement goes to the cache, so an
        interrupted run loses nothing: rerun the same command to finish.
        """
        from refusalkit.judge.cache import CachedJudge
        from refusalkit.judge.spec import make_judge
        from refusalkit.progress import bar

        opts = options(ctx)
        rows = _read_responses(input, response_field)
        j = make_judge(judge)
        store = _cache(cache, no_cache)
        runner = CachedJudge(j, store, chunk=max(1, chunk)) if store is not None else j
        out.parent.mkdir(parents=True, exist_ok=True)
        counts = {"refusal": 0, "partial": 0, "compliance": 0}
        with out.open("w", encoding="utf-8") as f, bar("judge", len(rows), opts.progress) as pb:
            for start in range(0, len(rows), max(1, chunk)):
                part = rows[start : start + max(1, chunk)]
                res = runner.judge([r["prompt"] for r in part], [r[response_field] for r in part])
                for r, jd in zip(part, res, strict=True):
                    counts[jd.label] += 1
                    f.write(json.dumps({**r, "judge": j.id, "label": jd.label,
                                        "score": jd.score, "style": jd.style},
                                       ensure_ascii=False) + "\n")
                f.flush()
                pb.advance(len(part))
        summary = {"out": str(out), "n": len(rows), "judge": j.id, **counts,
                   "cached": getattr(runner, "hits", 0)}
        if opts.json:
            typer.echo(json.dumps(summary))
        elif not opts.quiet:
            typer.echo(f"wrote {out}: {len(rows)} rows, {counts['refusal']} refusal, "
                       f"{counts['partial']} partial, {counts['compliance']} compliance "
                       f"({summary['cached']} from cache)")

    @app.command("judge-eval")
    def judge_eval_cmd(
        ctx: typer.Context,
        labels: Path = typer.Option(..., "--labels", help="JSONL with prompt, response, label."),
        judge: str = typer.Option(DEFAULT_JUDGE, "--judge", help=SPEC_HELP),
        limit: int | None = typer.Option(None, "--limit", help="Use the first N rows."),
        split: str | None = typer.Option(None, "--split", help="Only rows with this split."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
        cache: Path | None = typer.Option(None, "--cache", help="Reuse/record judgements in "
                                          "this cache (timings then exclude cached items)."),
        lomo: bool = typer.Option(False, "--lomo", help="Leave one model out: train the "
                                  "calibrated judge's recipe without each model of --labels "
                                  "and test on it (--judge is ignored)."),
        train_extra: Path | None = typer.Option(None, "--train-extra", help="--lomo: more "
                                                "training rows (their dev split if they have "
                                                "one), e.g. tests/data/judge_labels.jsonl."),
    ) -> None:
        """Agreement of a judge with human labels (partial counts as refusal): accuracy, F1,
        AUC, ECE and reliability, recall per style, style macro-F1, per source and model."""
        from refusalkit.judge.evaluate import evaluate, read_labels

        opts = options(ctx)
        items = read_labels(labels, split=split, limit=limit)
        if lomo:
            _lomo(items, train_extra, json_out or opts.json)
            return
        from refusalkit.judge.cache import CachedJudge, JudgementCache
        from refusalkit.judge.spec import make_judge

        j = make_judge(judge)
        runner = CachedJudge(j, JudgementCache(cache)) if cache is not None else j
        metrics, _ = evaluate(runner, items)
        if json_out or opts.json:
            typer.echo(json.dumps(metrics))
            return
        typer.echo(format_metrics(metrics, split))

    @app.command("judge-score")
    def judge_score_cmd(
        ctx: typer.Context,
        prompts: str = typer.Option(..., "--prompts", help="Prompt file or dataset name."),
        model: str = typer.Option("qwen2.5-coder-0.5b", "--model", help="Model under test."),
        judge: str = typer.Option(DEFAULT_JUDGE, "--judge", help=SPEC_HELP),
        k: int = typer.Option(5, "--k", help="Samples per prompt (paper A: 5)."),
        mode: str = typer.Option("sample", "--mode", help="sample (paper A) | greedy (cheap)"),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
        profile: Path | None = typer.Option(None, "--profile", help="Steering profile folder."),
        limit: int | None = typer.Option(None, "--limit"),
        out: Path | None = typer.Option(None, "--out", help="Per-prompt scores JSONL."),
        cache: Path | None = typer.Option(None, "--cache", help="Judgement cache (sqlite)."),
        no_cache: bool = typer.Option(False, "--no-cache"),
        seed: int = typer.Option(0, "--seed"),
        hard_votes: bool = typer.Option(False, "--hard-votes", help="Votes ±1 from the label "
                                        "(paper A) instead of the judge's calibrated 2P−1."),
    ) -> None:
        """Paper A's refusal confidence c(x) per prompt and the dataset summary
        (refusal / neutral / compliance %, style distribution)."""
        from refusalkit.examiner import Decoding, Examiner
        from refusalkit.interventions import load_profile
        from refusalkit.judge.protocol import summarize
        from refusalkit.judge.spec import make_judge
        from refusalkit.models import load_model
        from refusalkit.prompts import load_prompts, write_jsonl

        opts = options(ctx)
        if mode not in ("sample", "greedy"):
            raise UserError(f"unknown --mode '{mode}'; use sample or greedy")
        pset = load_prompts(prompts, limit=limit)
        lm = load_model(model)
        prof = load_profile(profile, lm) if profile is not None else None
        ex = Examiner(lm, make_judge(judge, lm=lm),
                      Decoding(mode, k, max_new_tokens, seed, signed=not hard_votes),
                      cache=_cache(cache, no_cache), show_progress=opts.progress)
        scores = ex.scores(pset.prompts, prof)
        summary = {"dataset": prompts, "model": model, "judge": judge, "mode": mode,
                   **summarize(scores)}
        if out is not None:
            write_jsonl(out, [s.to_dict() for s in scores])
        if opts.json:
            typer.echo(json.dumps(summary))
        elif not opts.quiet:
            typer.echo(f"{prompts}: n={summary['n']}  refusal {summary['refusal_pct']:.1f}%  "
                       f"neutral {summary['neutral_pct']:.1f}%  "
                       f"compliance {summary['compliance_pct']:.1f}%")
            for style, frac in summary["styles"].items():
                typer.echo(f"  {style:<22} {100 * frac:5.1f}% of refusals")


def _lomo(items: list, train_extra: Path | None, as_json: bool) -> None:
    from refusalkit.judge.evaluate import read_labels
    from refusalkit.judge.lomo import leave_one_model_out
    from refusalkit.judge.train import V2_COMPONENTS

    extra = []
    if train_extra is not None:
        rows = read_labels(train_extra)
        extra = [i for i in rows if i.row.get("split", "dev") == "dev"]
    result = leave_one_model_out(items, extra, V2_COMPONENTS)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"leave one model out ({len(extra)} extra training rows)")
    for model, m in result["folds"].items():
        typer.echo(f"  {model:<20} n {m['n']:4d}  accuracy {m['accuracy']:.3f}  f1 {m['f1']:.3f}"
                   f"  auc {m['auc'] or float('nan'):.3f}  ece {m['ece']:.3f}")
    typer.echo(f"lowest fold accuracy {result['min_accuracy']:.3f}")


def format_metrics(m: dict, split: str | None) -> str:
    """The human-readable judge-eval report (the JSON has everything)."""
    c = m["confusion"]
    lines = [f"judge {m['judge']} on {m['n']} items" + (f" (split {split})" if split else ""),
             f"accuracy {m['accuracy']:.3f}  precision {m['precision']:.3f}  recall "
             f"{m['recall']:.3f}  f1 {m['f1']:.3f}  auc {m['auc'] or float('nan'):.3f}  "
             f"ece {m['ece']:.3f}  {m['seconds_per_item']:.3f} s/item",
             f"confusion: tp {c['tp']}  fp {c['fp']}  fn {c['fn']}  tn {c['tn']}",
             "reliability (bin: mean P(refusal) → observed refusal rate, n): " + ", ".join(
                 f"{b['mean_p']:.2f}→{b['rate']:.2f} ({b['n']})" for b in m["reliability"])]
    if m["recall_by_style"]:
        lines.append("recall by gold style: " + ", ".join(
            f"{k} {v['recall']:.2f} ({v['n']})" for k, v in m["recall_by_style"].items()))
    if m["style_macro_f1"] is not None:
        lines.append(f"style macro-F1 {m['style_macro_f1']:.3f} over {m['n_styled']} rows")
    if m["on_topic_accuracy"] is not None:
        lines.append(f"on-topic accuracy {m['on_topic_accuracy']:.3f}  auc "
                     f"{m['on_topic_auc'] or float('nan'):.3f}")
    for key in ("by_source", "by_model"):
        if len(m[key]) > 1:
            lines.append(key.replace("_", " ") + ": " + ", ".join(
                f"{k} {v['accuracy']:.2f} ({v['n']})" for k, v in m[key].items()))
    return "\n".join(lines)
