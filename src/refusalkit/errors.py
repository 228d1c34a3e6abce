"""One exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; every other exception is a
bug and keeps its traceback (shown with `--debug`).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


def json_error(exc: ValueError) -> str:
    """A JSON parse error as 'what, at line L column C': `exc.msg` alone drops the position,
    which is what a user needs to find the broken spot in a hand-edited file."""
    msg = getattr(exc, "msg", str(exc))
    line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    if line is None:
        return str(msg)
    # json's messages often end in "at" ("Unterminated string starting at")
    return f"{str(msg).removesuffix(' at')} at line {line}, column {col}"
