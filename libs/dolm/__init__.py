"""dolm: do() on language models — shared library for the dolm command-line tools."""

__version__ = "0.1.0"
