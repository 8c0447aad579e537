"""Errors that reach the user as one line, and the wrapper that turns them into exit status 2."""
from __future__ import annotations

import sys
from typing import Callable


class UsageError(Exception):
    """Bad input from the user: a flag, a data file, a checkpoint. The message names the problem."""


class RunFailure(Exception):
    """The run cannot go on for a reason outside the program and its input (the disk filled, a file
    could not be written): one line on stderr and exit status 1; what was saved before it is kept."""


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind exc, which may be exc itself or one it was raised from or while handling
    (torch.save on a full disk raises a RuntimeError of its zip writer while handling the OSError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's main(argv); bad input (UsageError, ValueError) becomes one line on stderr
    and exit status 2 instead of a traceback, a RunFailure one line and exit status 1."""
    try:
        return main(argv)
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
