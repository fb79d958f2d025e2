"""``--where``: a small, safe row filter over a table's columns.

The grammar is deliberately narrow (nothing in it can call a function or reach an
attribute, unlike ``DataFrame.query(engine="python")``)::

    expr       := or
    or         := and (("or" | "|") and)*
    and        := not (("and" | "&") not)*
    not        := ("not" | "~") not | atom
    atom       := "(" expr ")" | comparison
    comparison := operand (op operand)*          a chain: 0.25 <= p <= 0.75
    op         := == != < <= > >= in "not in"
    operand    := column | literal | "[" literal ("," literal)* "]"
    column     := a name ([A-Za-z_][A-Za-z0-9_.]*) or `any text` in backticks
    literal    := number | 'text' | "text" | true | false | True | False | null | None

A lone column is allowed where it holds booleans. Anything else is refused with an
:class:`~dolm.errors.InputError` naming ``--where`` and what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dolm.errors import InputError

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<tick>`[^`]+`)
      | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,|&|\||~)
      | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)
_WORDS = {"and", "or", "not", "in"}
_CONST = {"true": True, "True": True, "false": False, "False": False, "null": None,
          "None": None}
_CMP = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")


@dataclass(frozen=True)
class _Tok:
    kind: str  # num str col op word const
    value: Any
    pos: int


def _tokens(text: str, option: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        if text[i:].strip() == "":
            break
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            raise InputError(f"{option} {text!r}: unexpected {text[i:].strip()[:20]!r} at "
                             f"character {i + 1} (expected column comparisons joined with "
                             "and/or/not, e.g. \"n_x >= 2 and family == 'bayes'\")")
        start = m.start(m.lastgroup or 0)
        kind = m.lastgroup
        raw = m.group(kind)
        if kind == "num":
            value: Any = float(raw) if re.search(r"[.eE]", raw) else int(raw)
            out.append(_Tok("num", value, start))
        elif kind == "str":
            body = raw[1:-1]
            out.append(_Tok("str", re.sub(r"\\(.)", r"\1", body), start))
        elif kind == "tick":
            out.append(_Tok("col", raw[1:-1], start))
        elif kind == "op":
            out.append(_Tok("op", raw, start))
        elif raw in _WORDS:
            out.append(_Tok("word", raw, start))
        elif raw in _CONST:
            out.append(_Tok("const", _CONST[raw], start))
        else:
            out.append(_Tok("col", raw, start))
        i = m.end()
    return out


class _Parser:
    def __init__(self, text: str, df: Any, option: str):
        self.text, self.df, self.option = text, df, option
        self.toks = _tokens(text, option)
        self.i = 0

    # -- helpers
    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _is(self, kind: str, *values: Any) -> bool:
        t = self._peek()
        return t is not None and t.kind == kind and (not values or t.value in values)

    def _fail(self, expected: str) -> InputError:
        t = self._peek()
        found = "the end" if t is None else repr(self.text[t.pos:].split()[0] if
                                                 self.text[t.pos:].split() else t.value)
        where = "" if t is None else f" at character {t.pos + 1}"
        return InputError(f"{self.option} {self.text!r}: expected {expected}, found "
                          f"{found}{where}")

    def _take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    # -- grammar
    def parse(self) -> Any:
        if not self.toks:
            raise InputError(f"{self.option}: empty expression")
        value = self._or()
        if self._peek() is not None:
            raise self._fail("and/or or the end of the expression")
        return self._as_mask(value, self.text)

    def _or(self) -> Any:
        left = self._and()
        while self._is("word", "or") or self._is("op", "|"):
            self._take()
            left = self._as_mask(left, "or") | self._as_mask(self._and(), "or")
        return left

    def _and(self) -> Any:
        left = self._not()
        while self._is("word", "and") or self._is("op", "&"):
            self._take()
            left = self._as_mask(left, "and") & self._as_mask(self._not(), "and")
        return left

    def _not(self) -> Any:
        if self._is("word", "not") or self._is("op", "~"):
            self._take()
            return ~self._as_mask(self._not(), "not")
        return self._atom()

    def _atom(self) -> Any:
        if self._is("op", "("):
            self._take()
            value = self._or()
            if not self._is("op", ")"):
                raise self._fail("')'")
            self._take()
            return value
        left = self._operand()
        result = None
        while True:
            op = self._cmp_op()
            if op is None:
                break
            right = self._operand()
            mask = self._compare(left, op, right)
            result = mask if result is None else result & mask
            left = right
        return left if result is None else result

    def _cmp_op(self) -> str | None:
        t = self._peek()
        if t is None:
            return None
        if t.kind == "op" and t.value in _CMP:
            self._take()
            return str(t.value)
        if t.kind == "word" and t.value == "in":
            self._take()
            return "in"
        if t.kind == "word" and t.value == "not" and self.i + 1 < len(self.toks):
            nxt = self.toks[self.i + 1]
            if nxt.kind == "word" and nxt.value == "in":
                self.i += 2
                return "not in"
        return None

    def _operand(self) -> Any:
        t = self._peek()
        if t is None:
            raise self._fail("a column, a value or '('")
        if t.kind == "col":
            self._take()
            if t.value not in self.df.columns:
                cols = ", ".join(map(str, list(self.df.columns)[:20]))
                raise InputError(f"{self.option} {self.text!r}: no column {t.value!r} "
                                 f"(columns: {cols})")
            return ("col", t.value, self.df[t.value])
        if t.kind in ("num", "str", "const"):
            self._take()
            return ("lit", t.value)
        if t.kind == "op" and t.value == "[":
            self._take()
            items = []
            while True:
                v = self._peek()
                if v is None or v.kind not in ("num", "str", "const"):
                    raise self._fail("a literal in the list")
                items.append(self._take().value)
                if self._is("op", ","):
                    self._take()
                    continue
                if self._is("op", "]"):
                    self._take()
                    break
                raise self._fail("',' or ']'")
            return ("list", items)
        raise self._fail("a column, a value or '('")

    def _compare(self, left: Any, op: str, right: Any) -> Any:
        import pandas as pd

        if left[0] != "col" and right[0] != "col":
            raise InputError(f"{self.option} {self.text!r}: a comparison needs a column on "
                             "one side")
        if op in ("in", "not in"):
            if left[0] != "col" or right[0] != "list":
                raise InputError(f"{self.option} {self.text!r}: '{op}' needs a column on the "
                                 "left and a [list] on the right")
            mask = left[2].isin(right[1])
            return ~mask if op == "not in" else mask
        if "list" in (left[0], right[0]):
            raise InputError(f"{self.option} {self.text!r}: a [list] goes only after in / "
                             "not in")
        flip = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
        col, lit = (left, right) if left[0] == "col" else (right, left)
        if left[0] != "col":
            op = flip.get(op, op)
        series = col[2]
        other = lit[2] if lit[0] == "col" else lit[1]
        if lit[0] == "lit" and other is None:
            if op not in ("==", "!="):
                raise InputError(f"{self.option} {self.text!r}: null compares only with "
                                 "== or !=")
            return series.isna() if op == "==" else series.notna()
        try:
            if op == "==":
                out = series == other
            elif op == "!=":
                out = series != other
            elif op == "<":
                out = series < other
            elif op == "<=":
                out = series <= other
            elif op == ">":
                out = series > other
            else:
                out = series >= other
        except (TypeError, ValueError) as exc:
            raise InputError(f"{self.option} {self.text!r}: cannot compare column "
                             f"{col[1]!r} ({series.dtype}) with {other!r}: {exc}") from None
        return pd.Series(out, index=self.df.index).fillna(False).astype(bool)

    def _as_mask(self, value: Any, context: str) -> Any:
        import pandas as pd

        if isinstance(value, tuple):
            if value[0] == "col" and pd.api.types.is_bool_dtype(value[2].dtype):
                return value[2].fillna(False).astype(bool)
            what = f"column {value[1]!r}" if value[0] == "col" else repr(value[1])
            raise InputError(f"{self.option} {self.text!r}: {what} is not a condition "
                             "(expected a comparison such as col >= 1, or a boolean column)")
        return value


def filter_rows(df: Any, where: str, option: str = "--where") -> Any:
    """The rows of ``df`` matching ``where`` (see the module docstring for the grammar)."""
    mask = _Parser(where, df, option).parse()
    return df[mask.to_numpy(dtype=bool)]


__all__ = ["filter_rows"]
