"""Errors that reach the user as one line (the CLI prints them and exits with status 2)."""


class UsageError(Exception):
    """Bad input from the user: a flag, a data file, a checkpoint. The message names the problem."""
