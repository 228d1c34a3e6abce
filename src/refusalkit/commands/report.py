"""`refusalkit report RUN_DIR`: rebuild report.html from a run folder's files."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from refusalkit.commands.context import options

    @app.command("report")
    def report_cmd(
        ctx: typer.Context,
        run_dir: Path = typer.Argument(..., help="A run folder (holds manifest.json)."),
        title: str | None = typer.Option(None, "--title", help="Page title."),
    ) -> None:
        """Rebuild the self-contained report.html of a run folder (no model needed)."""
        from refusalkit.report import build_report

        path = build_report(run_dir, title=title)
        opts = options(ctx)
        if opts.json:
            typer.echo(json.dumps({"report": str(path)}))
        elif not opts.quiet:
            typer.echo(f"wrote {path}")
