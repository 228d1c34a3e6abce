"""`refusalkit abliterate MODEL --out DIR`: a copy of a model that stops refusing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer


def _ask(front: list[dict[str, Any]], heldout: dict[str, Any]) -> int | None:
    """Show the front and let the user pick a trial (Enter keeps the rule's choice)."""
    typer.echo("Pareto front (dev figures chose it; held-out figures where measured):")
    typer.echo(f"{'trial':>6} {'dev refusals':>13} {'dev KL':>8}   held out")
    for r in front:
        h = heldout.get(str(r["number"]))
        extra = (", ".join(f"{k} {v}/{h['n']}" for k, v in h["refusals"].items())
                 + f", KL {h['kl']:.4f}") if h else "—"
        typer.echo(f"{r['number']:>6} {r['refusals']:>6}/{r['n']:<6} {r['kl']:>8.4f}   {extra}")
    numbers = {r["number"] for r in front}
    while True:
        raw = typer.prompt("trial to save (Enter: fewest dev refusals within the KL budget)",
                           default="", show_default=False).strip()
        if not raw:
            return None
        if raw.isdigit() and int(raw) in numbers:
            return int(raw)
        typer.echo(f"not a trial on the front; choose one of {sorted(numbers)}")


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    @app.command("abliterate")
    def abliterate_cmd(
        ctx: typer.Context,
        model: str | None = typer.Argument(None, help="Model spec (default: the config's)."),
        out: Path = typer.Option(Path("runs/abliterate"), "--out",
                                 help="Run folder; the checkpoint goes to OUT/model."),
        config: Path | None = typer.Option(None, "--config", help="TOML config."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
        reuse_from: Path | None = typer.Option(
            None, "--reuse-from", help="An earlier run folder: copy its directions, baseline "
            "and unsteered held-out stages where their inputs are the same."),
        trials: int | None = typer.Option(None, "--trials", help="Search trials."),
        judge: str | None = typer.Option(None, "--judge",
                                         help="Judge spec (keyword:heretic = Heretic's markers)."),
        kl_max: float | None = typer.Option(None, "--kl-max", help="KL budget for the choice."),
        trial: int | None = typer.Option(None, "--trial",
                                         help="Save this trial instead of the rule's choice."),
        gguf: bool = typer.Option(False, "--gguf", help="Also write OUT/model.gguf."),
        reproduce_file: Path | None = typer.Option(
            None, "--reproduce", help="Remake the checkpoint of a run's reproduce.json "
            "into --out (no search)."),
        seed: int | None = typer.Option(None, "--seed"),
        set_: list[str] = typer.Option([], "--set", help="Any config key: --set a.b=value."),
        print_config: bool = typer.Option(False, "--print-config",
                                          help="Print the documented config and exit."),
    ) -> None:
        """Remove refusal from a model (directional-ablation kernels, judged refusals vs KL,
        Pareto front) and save it as a Hugging Face checkpoint."""
        opts = options(ctx)
        if reproduce_file is not None:
            from refusalkit.abliterate.reproduce import reproduce

            result = reproduce(reproduce_file, out, show_progress=opts.progress)
            if opts.json:
                typer.echo(json.dumps(result))
            elif not opts.quiet:
                same = "bit-identical" if result["checkpoint_match"] else "NOT bit-identical"
                typer.echo(f"wrote {out} ({same} to the original checkpoint)")
            return
        from refusalkit.abliterate.config import AbliterateConfig
        from refusalkit.config import parse_set

        overrides = {"model": model, "search.trials": trials, "judge.spec": judge,
                     "kl_max": kl_max, "seed": seed, **parse_set(set_)}
        cfg = AbliterateConfig.load(config, overrides)
        if print_config:
            typer.echo(cfg.to_toml())
            return
        from refusalkit.abliterate.pipeline import run_abliterate

        def progress(number: int, r: dict[str, Any]) -> None:
            if opts.quiet or opts.json:
                return
            what = ("pruned" if r.get("pruned")
                    else f"refusals {r['refusals']}/{r['n']}")
            typer.echo(f"trial {number}: KL {r['kl']:.4f}, {what}", err=True)

        interactive = trial is None and sys.stdin.isatty() and not opts.json
        path = run_abliterate(cfg, out, resume=resume, trial=trial,
                              chooser=_ask if interactive else None, gguf=gguf,
                              show_progress=opts.progress, on_trial=progress,
                              reuse_from=reuse_from)
        metrics = json.loads((path / "metrics.json").read_text())
        if opts.json:
            typer.echo(json.dumps({"run": str(path), **metrics}))
            return
        if not opts.quiet:
            if reuse_from is not None:
                from refusalkit.runs import reuse_line

                typer.echo(reuse_line(path, reuse_from))
            c = metrics["chosen"]
            before, after = metrics["heldout_refusal_before"], metrics["heldout_refusal_after"]
            judged = ", ".join(f"{s} {before[s]:.0%} → {after[s]:.0%}" for s in after)
            typer.echo(f"trial {c['number']} ({c['by']}): held-out refusal {judged}; "
                       f"KL {metrics['heldout_kl']:.4f}\n"
                       f"checkpoint: {path / 'model'}\nreport:     {path / 'report.html'}")
