"""One exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line and exits non-zero; every other exception is a
bug and keeps its traceback (shown with `--debug`).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""
