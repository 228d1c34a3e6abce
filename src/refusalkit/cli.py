"""The `refusalkit` command line.

Each stage contributes its commands from a module in `refusalkit.commands` that defines
`register(app)`, so the CLI grows with the stages without one giant file. A `UserError`
anywhere becomes one line on stderr and exit code 2; `--debug` shows the traceback instead.
The global flags (--quiet, --json, --debug) work before or after the command name.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from refusalkit.commands.context import Options
from refusalkit.errors import UserError

GLOBAL_FLAGS = ("--quiet", "-q", "--json", "--debug")


def hoist_global_flags(group: Any, ctx: Any, args: list[str]) -> list[str]:
    """Move global flags given after the command name in front of it, so `refusalkit models
    --json` means `refusalkit --json models`. A command's own option of the same name wins,
    option values and anything after `--` are left alone."""
    rest = list(args)
    head: list[str] = []
    hoisted: list[str] = []
    node = group
    while rest and hasattr(node, "get_command"):  # walk to the leaf command
        tok = rest.pop(0)
        if tok in GLOBAL_FLAGS and node is not group:  # `export --json abliterated`
            hoisted.append(tok)
            continue
        head.append(tok)
        if tok.startswith("-"):
            continue
        node = node.get_command(ctx, tok)
        if node is None:
            return list(args)  # unknown command: let click report it
    if node is group or node is None:
        return list(args)
    own = {o for p in node.params for o in (*p.opts, *p.secondary_opts)}
    takes_value = {o for p in node.params if not getattr(p, "is_flag", True)
                   and not getattr(p, "count", False) for o in p.opts}
    kept: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            kept.extend(rest[i:])
            break
        if tok in GLOBAL_FLAGS and tok not in own:
            hoisted.append(tok)
        else:
            kept.append(tok)
            if tok in takes_value and i + 1 < len(rest):
                kept.append(rest[i + 1])
                i += 1
        i += 1
    return hoisted + head + kept


class RefusalkitGroup(TyperGroup):
    """The top-level group: accepts the global flags anywhere on the command line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_flags(self, ctx, args))


# Plain (click) help rendering: rich markup would eat "[default: …]" in help texts and
# label every flag "<bool>".
app = typer.Typer(
    cls=RefusalkitGroup,
    help="Measure, explain and control refusal in open-weight language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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


def _register_commands() -> None:
    import refusalkit.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"refusalkit.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def _usage_error(exc: Exception) -> None:
    """Report one of click's usage errors (duck-typed: typer vendors its own click)."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, not an error
        text = exc.format_message()  # type: ignore[attr-defined]
        if text:
            print(text)
        sys.exit(0)
    print(f"error: {exc.format_message()}", file=sys.stderr)  # type: ignore[attr-defined]
    sys.exit(exc.exit_code or 2)  # type: ignore[attr-defined]


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
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            _usage_error(exc)
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
