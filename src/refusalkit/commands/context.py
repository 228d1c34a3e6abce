"""What every command reads from the command line's global flags (typer's context object).

Kept apart from cli.py, which discovers the command modules: the commands import this, never
cli.py, so the import graph has no cycle."""

from __future__ import annotations

from dataclasses import dataclass

import typer


@dataclass
class Options:
    """Global flags, passed to commands through typer's context object."""

    quiet: bool = False
    json: bool = False
    debug: bool = False

    @property
    def progress(self) -> bool:
        return not (self.quiet or self.json)


def options(ctx: typer.Context) -> Options:
    return ctx.obj if isinstance(ctx.obj, Options) else Options()
