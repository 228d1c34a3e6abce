"""The `refusalkit` command line.

Each stage contributes its commands from a module in `refusalkit.commands` that defines
`register(app)`, so the CLI grows with the stages without one giant file. A `UserError`
anywhere becomes one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass

import typer

from refusalkit.errors import UserError

app = typer.Typer(
    help="Measure, explain and control refusal in open-weight language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class Options:
    """Global flags, passed to commands through typer's context object."""

    quiet: bool = False
    json: bool = False
    debug: bool = False

    @property
    def progress(self) -> bool:
        return not (self.quiet or self.json)


@app.callback()
def main(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or chatter."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    from refusalkit.commands.core import quiet_libraries

    quiet_libraries()
    ctx.obj = Options(quiet=quiet, json=json_out, debug=debug)


def options(ctx: typer.Context) -> Options:
    return ctx.obj if isinstance(ctx.obj, Options) else Options()


def _register_commands() -> None:
    import refusalkit.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"refusalkit.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def run() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted; finished work is kept — rerun with --resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors from typer's bundled click: duck-typed, since typer vendors its own copy.
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code or 2)
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
