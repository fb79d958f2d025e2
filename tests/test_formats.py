"""dolm.formats: schema checks, provenance chains, atomic writes, corrupt-file detection."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
from dolm.errors import InputError
from dolm.formats import (
    Run,
    json_safe,
    read_json,
    read_meta,
    read_table,
    validate_file,
    write_table,
)
from dolm.formats.h5 import finish_h5, open_h5_for_write, read_h5_meta
from dolm.formats.schema import check_table, load_schema


def effects_df(n: int = 5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "tool": "patch",
            "intervention": "denoise",
            "site": "resid_pre.0",
            "layer": np.arange(n, dtype=np.int64),
            "metric": "logit_diff",
            "value": np.linspace(0, 1, n),
        }
    )


def test_roundtrip_and_provenance_chain(tmp_path):
    r1 = Run("first", argv=["dolm-first"], seed=1)
    p1 = tmp_path / "a.parquet"
    write_table(effects_df(), p1, "effects", r1)
    r2 = Run("second", argv=["dolm-second"], seed=2)
    df, meta = read_table(p1, schema="effects", run=r2)
    assert meta.schema == "effects" and meta.version == 1
    assert list(df["layer"]) == [0, 1, 2, 3, 4]
    p2 = tmp_path / "b.parquet"
    write_table(df, p2, "effects", r2)
    chain = read_meta(p2).provenance
    assert [e["tool"] for e in chain] == ["first", "second"]
    assert chain[1]["inputs"][0]["sha256"] is not None
    assert chain[1]["seed"] == 2 and chain[1]["duration_s"] >= 0
    # re-reading the same parent twice does not duplicate its entry
    r3 = Run("third", argv=[])
    read_table(p2, run=r3)
    read_table(p1, run=r3)
    assert [e["tool"] for e in r3.chain()] == ["first", "second", "third"]


def test_missing_column_wrong_type_and_enum(tmp_path):
    schema = load_schema("effects")
    import pyarrow as pa

    bad = pa.table({"prompt_id": ["a"], "tool": ["x"], "intervention": ["y"], "metric": ["m"]})
    problems = check_table(bad, schema, "t")
    assert any("missing required column 'value'" in p for p in problems)
    bad2 = pa.table(
        {"prompt_id": ["a"], "tool": ["x"], "intervention": ["y"], "metric": ["m"], "value": ["no"]}
    )
    assert any("column 'value' has type string" in p for p in check_table(bad2, schema, "t"))
    bad3 = pa.table(
        {
            "prompt_id": ["a"],
            "tool": ["x"],
            "intervention": ["y"],
            "metric": ["m"],
            "value": [1.0],
            "layer": [-1],
        }
    )
    assert any("below the minimum 0" in p for p in check_table(bad3, schema, "t"))
    nulls = pa.table(
        {
            "prompt_id": ["a", None],
            "tool": ["x", "x"],
            "intervention": ["y", "y"],
            "metric": ["m", "m"],
            "value": [1.0, 2.0],
        }
    )
    assert any("1 missing value" in p for p in check_table(nulls, schema, "t"))


def test_no_overwrite_without_force_and_atomic(tmp_path):
    p = tmp_path / "e.parquet"
    write_table(effects_df(), p, "effects", None)
    with pytest.raises(InputError, match="--force"):
        write_table(effects_df(), p, "effects", None)
    write_table(effects_df(3), p, "effects", None, force=True)
    assert len(read_table(p)[0]) == 3
    # no temporary files are left behind
    assert [f.name for f in tmp_path.iterdir()] == ["e.parquet"]
    # the file has the mode of a plainly written file (umask 022: 0o644), not 0o600
    import os

    old = os.umask(0o022)
    try:
        write_table(effects_df(), tmp_path / "m.parquet", "effects", None)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.parquet").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert plain.stat().st_mode & 0o777 == 0o644


def test_truncated_parquet_and_hdf5(tmp_path):
    p = tmp_path / "e.parquet"
    write_table(effects_df(), p, "effects", None)
    data = p.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt Parquet"):
        read_table(cut)
    name, problems = validate_file(cut)
    assert problems and "truncated" in problems[0]

    h = tmp_path / "x.h5"
    import h5py

    with h5py.File(h, "w") as fh:
        fh.create_dataset("a", data=np.zeros((100, 100)))
    hd = h.read_bytes()
    (tmp_path / "cut.h5").write_bytes(hd[: len(hd) // 3])
    name, problems = validate_file(tmp_path / "cut.h5")
    assert problems and ("corrupt" in problems[0] or "truncated" in problems[0])


def test_h5_partial_then_rename(tmp_path):
    import h5py

    target = tmp_path / "acts.h5"
    r = Run("t", argv=[])
    # a generic HDF5 schema written on the fly for this test
    schema_dir = tmp_path / "schemas"
    schema_dir.mkdir()
    (schema_dir / "arr.v1.schema.json").write_text(
        json.dumps(
            {
                "x-dolm": {"kind": "hdf5", "same_rows": True},
                "type": "object",
                "required": ["datasets"],
                "properties": {"datasets": {"type": "object", "required": ["x", "y"]}},
            }
        )
    )
    os.environ["DOLM_SCHEMAS"] = str(schema_dir)
    from dolm.formats import schema as sch

    sch.available_schemas.cache_clear()
    sch.load_schema.cache_clear()
    try:
        fh = open_h5_for_write(target, "arr", r)
        fh.create_dataset("x", data=np.arange(4))
        assert not target.exists() and (tmp_path / "acts.h5.partial").exists()
        fh.create_dataset("y", data=np.arange(4))
        finish_h5(fh, target, "arr", r)
        assert target.exists() and not (tmp_path / "acts.h5.partial").exists()
        meta = read_h5_meta(str(target))
        assert meta.schema == "arr" and meta.provenance[-1]["tool"] == "t"
        with h5py.File(target, "a") as f2:
            del f2["y"]
            f2.create_dataset("y", data=np.arange(5))
        _, problems = validate_file(target)
        assert any("same number of rows" in p for p in problems)
    finally:
        del os.environ["DOLM_SCHEMAS"]
        sch.available_schemas.cache_clear()
        sch.load_schema.cache_clear()


def test_csv_user_table_checked_against_requested_schema(tmp_path):
    p = tmp_path / "u.csv"
    effects_df().drop(columns=["value"]).to_csv(p, index=False)
    with pytest.raises(InputError, match="missing required column 'value'"):
        read_table(p, schema="effects")
    with pytest.raises(InputError, match="not found"):
        read_table(tmp_path / "nope.parquet")


def test_wrong_schema_refused(tmp_path):
    p = tmp_path / "e.parquet"
    write_table(effects_df(), p, "effects", None)
    with pytest.raises(InputError, match="is a 'effects' file, expected a 'prompts' file"):
        read_table(p, schema="prompts")


def test_validate_cli_exit_codes(tmp_path):
    good = tmp_path / "e.parquet"
    write_table(effects_df(), good, "effects", None)
    r = subprocess.run(["dolm-validate", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "ok (effects)" in r.stdout
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:100])
    r = subprocess.run(["dolm-validate", str(good), str(cut)], capture_output=True, text=True)
    assert r.returncode == 3 and "cut.parquet: INVALID" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        ["dolm-validate", str(tmp_path / "missing.h5")], capture_output=True, text=True
    )
    assert r.returncode == 3 and "not found" in r.stderr


def test_json_roundtrip(tmp_path):
    from dolm.formats import write_json

    schema_dir = tmp_path / "schemas"
    schema_dir.mkdir()
    (schema_dir / "thing.v2.schema.json").write_text(
        json.dumps({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}})
    )
    os.environ["DOLM_SCHEMAS"] = str(schema_dir)
    from dolm.formats import schema as sch

    sch.available_schemas.cache_clear()
    sch.load_schema.cache_clear()
    try:
        p = tmp_path / "t.json"
        write_json({"n": 3}, p, "thing", Run("x", argv=[]))
        obj, meta = read_json(p, schema="thing")
        assert obj["n"] == 3 and meta.schema == "thing" and meta.version == 2
        p.write_text(json.dumps({"n": "three", "dolm": obj["dolm"]}))
        with pytest.raises(InputError, match="at n: 'three' is not of type 'integer'"):
            read_json(p)
    finally:
        del os.environ["DOLM_SCHEMAS"]
        sch.available_schemas.cache_clear()
        sch.load_schema.cache_clear()


def test_json_safe_nan_inf_and_numpy_scalars():
    obj = {1: (np.float32(0.5), np.int64(3), np.bool_(True)), "x": [float("nan"), -np.inf, "s"]}
    out = json_safe(obj)
    assert out == {"1": [0.5, 3, True], "x": [None, None, "s"]}
    assert [type(v) for v in out["1"]] == [float, int, bool]
    json.dumps(out, allow_nan=False)
