"""`refusalkit analyze CONFIG.toml`: refusal geometry across categories (paper B)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from refusalkit.errors import UserError


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    @app.command("analyze")
    def analyze_cmd(
        ctx: typer.Context,
        config: Path | None = typer.Argument(None, help="TOML config (e.g. "
                                             "configs/analyze.toml); flags override it."),
        out: Path | None = typer.Option(None, "--out", "--run-dir", help="Run folder to "
                                        "write (tables, figures, metrics.json, report.html)."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in "
                                    "--out, reusing its finished stages."),
        reuse_from: Path | None = typer.Option(
            None, "--reuse-from", help="An earlier run folder: copy each early stage "
            "(prompts … eval_baseline) whose inputs are the same there."),
        model: str | None = typer.Option(None, "--model", help="Model spec "
                                         "[default: qwen2.5-coder-0.5b]."),
        judge: str | None = typer.Option(None, "--judge", help="Judge spec [default: from "
                                         "the config]."),
        seed: int | None = typer.Option(None, "--seed", help="[default: 0]"),
        layer: str | None = typer.Option(None, "--layer", help="Analysis layer: index, "
                                         "fraction or middle [default: middle]."),
        sets: list[str] = typer.Option([], "--set", help="Override a config key: "
                                       "key.sub=value (e.g. sweep.alphas=[1.0])."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the "
                                          "documented config schema with defaults and exit."),
    ) -> None:
        """Per-split refusal directions, stability, cosine maps, behaviour buckets, where the
        signal lives, steering sweeps (RR/ORR), trade-off gap and refusal style."""
        from refusalkit.analyze.config import AnalyzeConfig
        from refusalkit.analyze.pipeline import analyze
        from refusalkit.commands.core import quiet_libraries
        from refusalkit.config import cli_overrides, load_config, render_config

        if print_config:
            typer.echo(render_config(AnalyzeConfig), nl=False)
            return
        if config is None:
            raise UserError("give a config file, e.g. refusalkit analyze configs/analyze.toml "
                            "(--print-config shows every key)")
        if out is None:
            raise UserError("give --out, the run folder to write")
        layer_value: int | float | str | None = layer
        if layer is not None and layer != "middle":
            try:
                layer_value = float(layer) if "." in layer else int(layer)
            except ValueError:
                raise UserError(f"--layer '{layer}' is not an index, a fraction or "
                                "'middle'") from None
        flags = {"model": model, "judge": judge, "seed": seed, "directions.layer": layer_value}
        cfg = load_config(config, AnalyzeConfig, cli_overrides(sets, flags))
        opts = options(ctx)
        if not opts.progress:
            quiet_libraries()
        path = analyze(cfg, out, resume=resume, show_progress=opts.progress,
                       reuse_from=reuse_from)
        metrics = json.loads((path / "metrics.json").read_text())
        if opts.json:
            typer.echo(json.dumps({"run_dir": str(path), "metrics": metrics}))
        elif not opts.quiet:
            if reuse_from is not None:
                from refusalkit.runs import reuse_line

                typer.echo(reuse_line(path, reuse_from))
            typer.echo(f"wrote {path / 'report.html'}")
            for key in ("stability_min", "cosine_median", "cos_HR-BC_BR-BC",
                        "tradeoff_max_gap", "style_p_value"):
                if key in metrics:
                    typer.echo(f"  {key}: {metrics[key]}")
