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
    """A runtime failure that is not the user's input (exit code 1).

    ``hard_exit``: the process holds a native library in a state it cannot tear down
    (HDF5 after a failed write crashes at exit); the tool reports the error and ends
    with ``os._exit`` instead of the interpreter's shutdown.
    """

    exit_code = 1
    hard_exit = False
