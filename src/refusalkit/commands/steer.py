"""`refusalkit steer CONFIG.toml`: the Refusal Steering pipeline as one command."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    @app.command("steer")
    def steer_cmd(
        ctx: typer.Context,
        config: Path | None = typer.Argument(None, help="TOML config (defaults if omitted)."),
        out: Path = typer.Option(Path("runs/steer"), "--out", help="Run folder."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
        reuse_from: Path | None = typer.Option(
            None, "--reuse-from", help="An earlier run folder: copy each stage whose inputs "
            "(the config keys, prompt sets and earlier stages it reads) are the same there."),
        model: str | None = typer.Option(None, "--model", help="Overrides model."),
        mode: str | None = typer.Option(None, "--mode", help="remove | induce."),
        method: str | None = typer.Option(None, "--method", help="md | rmd | wrmd | pca."),
        judge: str | None = typer.Option(None, "--judge", help="Judge spec."),
        trials: int | None = typer.Option(None, "--trials", help="Search trials."),
        seed: int | None = typer.Option(None, "--seed"),
        set_: list[str] = typer.Option([], "--set", help="Any config key: --set a.b=value."),
        print_config: bool = typer.Option(False, "--print-config",
                                          help="Print the documented config and exit."),
    ) -> None:
        """Remove (or induce) refusal on one topic while keeping safety refusals."""
        from refusalkit.config import parse_set
        from refusalkit.steer.config import SteerConfig

        overrides = {"model": model, "mode": mode, "directions.method": method,
                     "judge.spec": judge, "search.trials": trials, "seed": seed,
                     **parse_set(set_)}
        cfg = SteerConfig.load(config, overrides)
        if print_config:
            typer.echo(cfg.to_toml())
            return
        from refusalkit.steer.pipeline import run_steer

        opts = options(ctx)
        path = run_steer(cfg, out, resume=resume, show_progress=opts.progress,
                         reuse_from=reuse_from)
        metrics = json.loads((path / "metrics.json").read_text())
        if opts.json:
            typer.echo(json.dumps({"run": str(path), **metrics}))
            return
        if not opts.quiet:
            if reuse_from is not None:
                from refusalkit.runs import reuse_line

                typer.echo(reuse_line(path, reuse_from))
            typer.echo(
                f"target refusal {metrics['target_refusal_before']:.0%} → "
                f"{metrics['target_refusal_after']:.0%}, safety refusal "
                f"{metrics['safety_refusal_before']:.0%} → {metrics['safety_refusal_after']:.0%}, "
                f"over-refusal {metrics['overrefusal_before']:.0%} → "
                f"{metrics['overrefusal_after']:.0%}, KL {metrics['kl_harmless']:.3f}\n"
                f"report:  {path / 'report.html'}\nprofile: {path / 'profile'}")
            typer.echo(before_after(path / "examples.jsonl", 3))


def before_after(examples: Path, n: int) -> str:
    """n before/after pairs from the held-out target set, with the judge's flags, so the
    end of a run shows answers and not only rates."""
    if not examples.is_file():
        return ""
    rows = [json.loads(line) for line in examples.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    rows = [r for r in rows if r.get("dataset") == "target_eval"][:n]

    def clip(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= 160 else text[:157] + "..."

    out = [f"\n{len(rows)} held-out target answers, before → after:"]
    for r in rows:
        flags = f"{r.get('before_label')} → {r.get('after_label')}"
        if r.get("after_style"):
            flags += f" ({r['after_style']})"
        if r.get("after_useful") is not None:
            flags += ", useful" if r["after_useful"] else ", not a useful answer"
        if r.get("suspicious"):
            flags += " [suspicious: barely on topic]"
        out += [f"\n  Q: {clip(r['prompt'])}", f"  before: {clip(r['before'])}",
                f"  after:  {clip(r['after'])}", f"  judged: {flags}"]
    return "\n".join(out)
