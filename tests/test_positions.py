"""The one --positions language (dolm.positions): parsed and resolved in one place, used
by patch/ablate/lens (single spec), collect-acts (spec lists) and mediate (--position)."""

from __future__ import annotations

import numpy as np
import pytest
from dolm.errors import InputError
from dolm.positions import parse_positions, parse_spec, resolve

OFFSETS = np.array([[0, 0], [0, 3], [3, 9], [9, 12], [12, 15]])  # BOS, then four tokens
SPANS = {"subject": (3, 12), "odd_last": (12, 15)}


@pytest.mark.parametrize("spec, kind, want", [
    ("all", "all", [0, 1, 2, 3, 4]), ("LAST", "last", [4]), ("-1", "ints", [4]),
    ("0, 2,-1", "ints", [0, 2, 4]), ("subject", "span", [2, 3]),
    ("span:subject", "span", [2, 3]), ("subject_first", "span_first", [2]),
    ("subject_last", "span_last", [3]),
    ("odd_last", "span_last", [4]),  # a span literally named NAME_last wins
])
def test_every_spelling_parses_and_resolves(spec, kind, want):
    assert parse_spec(spec).kind == kind
    assert resolve(spec, 5, OFFSETS, SPANS, "p0").tolist() == want


def test_errors_name_the_option_and_the_prompt():
    with pytest.raises(InputError, match="--positions 7: out of range for prompt 'p0'"):
        resolve("7", 5, OFFSETS, SPANS, "p0")
    with pytest.raises(InputError, match="has no span 'verb'"):
        resolve("verb_last", 5, OFFSETS, SPANS, "p0")
    with pytest.raises(InputError, match="not a position spec"):
        parse_spec("a.b")
    with pytest.raises(InputError, match="found 'x'"):
        parse_positions("1,x")


def test_tools_share_the_parser():
    from dolm_tools.collect_acts import positions as collect_positions
    from dolm_tools.mediate.interventional import _parse_position

    assert collect_positions.resolve is resolve
    assert parse_positions("span:subject", allow_span=True) == ("span", "subject")
    assert parse_positions("0,-1") == ("list", [0, -1])
    assert _parse_position("last") == ("end", -1)
    assert _parse_position("-2") == ("end", -2)
    assert _parse_position("subject") == ("span", "subject")
    with pytest.raises(InputError, match="--position"):
        _parse_position("2")


def test_library_does_not_import_the_cli_layer():
    import ast
    import inspect

    import dolm.positions as mod

    tree = ast.parse(inspect.getsource(mod))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(n and n.startswith("dolm.cli") for n in names)
