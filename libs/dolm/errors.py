"""Errors a dolm tool maps to exit codes (DESIGN.md: 1 runtime failure, 3 invalid input)."""


class DolmError(Exception):
    """Base class; ``exit_code`` is what the tool exits with."""

    exit_code = 1


class InputError(DolmError):
    """Invalid input a user can fix: a file, column, option or value. Exit code 3.

    The message names the file/column/option at fault and what was expected.
    """

    exit_code = 3


class DolmRuntimeError(DolmError):
    """A runtime failure that is not the user's input (exit code 1)."""

    exit_code = 1
