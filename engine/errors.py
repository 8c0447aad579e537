"""Errors that reach the user as one line, and the wrapper that turns them into exit status 2."""
from __future__ import annotations

import sys
from typing import Callable


class UsageError(Exception):
    """Bad input from the user: a flag, a data file, a checkpoint. The message names the problem."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's main(argv); bad input (UsageError, ValueError) becomes one line on stderr
    and exit status 2 instead of a traceback."""
    try:
        return main(argv)
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
