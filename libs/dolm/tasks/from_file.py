"""from-file: a user's JSONL / JSON / CSV / Parquet table turned into a prompts table.

``mapping`` maps prompts columns to the file's columns (``{"prompt": "text",
"target": "answer"}``; on the command line ``--map prompt=text --map target=answer``). A
prompts column that is not mapped is taken from a file column of the same name when there
is one. ``prompt`` is required; ``prompt_id`` defaults to ``<file stem>-<row>``. Other
file columns are kept as they are. ``choices`` may be a list or a JSON list string;
``spans``/``cf_spans`` a dict or a JSON string.

Every problem is an ``InputError`` naming the file and the column.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from dolm.errors import InputError
from dolm.tasks.base import CORE_COLUMNS, Family, Option

_STR_COLUMNS = ("prompt", "target", "foil", "cf_prompt", "cf_target", "cf_foil", "group_id",
                "split", "text", "family")


def read_user_table(path: str | Path) -> pd.DataFrame:
    """Read JSONL (.jsonl/.ndjson), JSON (a list of objects), CSV/TSV or Parquet."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    suffix = p.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(p, lines=True, dtype=False)
        if suffix == ".json":
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise InputError(f"{p}: expected a list of objects (or an object holding "
                                     "one list)")
                data = lists[0]
            return pd.DataFrame(data)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                               keep_default_na=False)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
    except InputError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors
        raise InputError(f"{p}: could not read as {suffix.lstrip('.')} ({e})") from e
    raise InputError(f"{p}: expected a .jsonl, .json, .csv, .tsv or .parquet file, "
                     f"found {suffix or 'no suffix'}")


def parse_mapping(items) -> dict[str, str]:
    """``["prompt=text", ...]`` (or a dict) -> {prompts column: file column}."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        items = [s for s in items.split(",") if s]
    out = {}
    for it in items:
        if "=" not in it:
            raise InputError(f"--map: expected COLUMN=FILE_COLUMN, found {it!r}")
        dst, src = (s.strip() for s in it.split("=", 1))
        if not dst or not src:
            raise InputError(f"--map: expected COLUMN=FILE_COLUMN, found {it!r}")
        out[dst] = src
    return out


def _to_list(v, where):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, str):
        if v == "":
            return None
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            v = v.split("|")
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InputError(f"{where}: expected a list of strings, found {v!r}")
    return v


def _to_spans(v, where):
    if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: expected a JSON object of [start, end) spans") from e
    if not isinstance(v, dict) or not all(
        isinstance(s, (list, tuple)) and len(s) == 2 for s in v.values()
    ):
        raise InputError(f"{where}: expected an object name -> [start, end), found {v!r}")
    return json.dumps({k: [int(a), int(b)] for k, (a, b) in v.items()})


def from_file(path, mapping=None, split: str = "eval", family: str = "from-file") -> pd.DataFrame:
    """Read and validate a user's file into prompts rows (core columns + the file's)."""
    p = Path(path)
    raw = read_user_table(p)
    mapping = parse_mapping(mapping)
    unknown = sorted(set(mapping) - set(CORE_COLUMNS))
    if unknown:
        raise InputError(f"--map {unknown[0]}=...: expected a prompts column "
                         f"({', '.join(CORE_COLUMNS)})")
    for dst, src in mapping.items():
        if src not in raw.columns:
            raise InputError(f"{p}: column {src!r} (mapped to {dst}) not found; the file has "
                             f"{', '.join(map(str, raw.columns)) or 'no columns'}")
    out = pd.DataFrame(index=raw.index)
    used = set()
    for col in CORE_COLUMNS:
        src = mapping.get(col, col if col in raw.columns else None)
        if src is not None:
            out[col] = raw[src]
            used.add(src)
    if "prompt" not in out.columns:
        raise InputError(f"{p}: no prompt column; expected a column 'prompt' or --map "
                         f"prompt=COLUMN (the file has {', '.join(map(str, raw.columns))})")
    if len(raw) == 0:
        raise InputError(f"{p}: expected at least one row, found none")
    where = {c: f"{p}: column {mapping.get(c, c)!r}" for c in CORE_COLUMNS}
    bad = out["prompt"].map(lambda v: not isinstance(v, str) or v == "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{where['prompt']}: row {i}: expected a non-empty string, "
                         f"found {out['prompt'].iloc[i]!r}")
    if "prompt_id" in out.columns:
        out["prompt_id"] = out["prompt_id"].map(str)
    else:
        out["prompt_id"] = [f"{p.stem}-{i:05d}" for i in range(len(out))]
    dup = out["prompt_id"].duplicated()
    if dup.any():
        raise InputError(f"{where['prompt_id']}: expected unique ids, found "
                         f"{out['prompt_id'][dup].iloc[0]!r} twice")
    for col in _STR_COLUMNS:
        if col in out.columns:
            out[col] = out[col].map(
                lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                or v == "" else str(v)
            )
    if "choices" in out.columns:
        out["choices"] = out["choices"].map(lambda v: _to_list(v, where["choices"]))
    for col in ("spans", "cf_spans"):
        if col in out.columns:
            out[col] = out[col].map(lambda v, c=col: _to_spans(v, where[c]))
    if "split" in out.columns:
        badsplit = ~out["split"].isin(["eval", "train"]) & out["split"].notna()
        if badsplit.any():
            raise InputError(f"{where['split']}: expected eval or train, found "
                             f"{out['split'][badsplit].iloc[0]!r}")
    else:
        out["split"] = split
    if "family" not in out.columns:
        out["family"] = family
    for c in raw.columns:
        if c not in used and c not in out.columns:
            out[c] = raw[c]
    return out.reset_index(drop=True)


def _generate(split, seed, tokenizer, path, map, family_name):  # noqa: A002
    if path is None:
        raise InputError("from-file: expected a file (the PATH argument)")
    return from_file(path, map, split=split, family=family_name)


FAMILY = Family(
    name="from-file",
    help="A user's JSONL/JSON/CSV/Parquet file, columns mapped onto the prompts table.",
    options=[
        Option("path", "str", None, "the file to read"),
        Option("map", "str_list", None, "COLUMN=FILE_COLUMN pairs (prompt=text,target=answer)"),
        Option("family_name", "str", "from-file", "value of the family column"),
    ],
    fn=_generate,
)
