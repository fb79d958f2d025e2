"""The pipelines' helper scripts as the justfiles run them: join_units.py on real tool
outputs (the embedded model), its schema and provenance, and its refusals (exit 3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dolm.formats import read_table, validate_file

ROOT = Path(__file__).resolve().parents[1]


def exe(name: str) -> str:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else (shutil.which(name) or name)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    for design, n in (("experiment", 6), ("observational", 12)):
        p, o = d / f"{design}.prompts.parquet", d / f"{design}.outcomes.parquet"
        r = run(exe("dolm-gen-prompts"), "formats", "--design", design, "--n", n, "--seed", 1,
                "-o", p)
        assert r.returncode == 0, r.stderr
        r = run(exe("dolm-collect-acts"), p, "--model", "toy", "-o", o)
        assert r.returncode == 0, r.stderr
    return d


def test_join_units_writes_a_units_table_with_the_model_on_record(formats_run, tmp_path):
    d = formats_run
    out = tmp_path / "units.parquet"
    r = run(sys.executable, ROOT / "pipelines/join_units.py", d / "experiment.prompts.parquet",
            d / "experiment.outcomes.parquet", "-o", out)
    assert r.returncode == 0, r.stderr
    assert validate_file(str(out)) == ("units", [])
    units, meta = read_table(out, schema="units")
    prompts, _ = read_table(d / "experiment.prompts.parquet")
    outcomes, _ = read_table(d / "experiment.outcomes.parquet")
    assert len(units) == len(prompts) == 18  # 6 units x 3 formats
    assert list(units["prompt_id"]) == list(prompts["prompt_id"])
    # the outcome is the collect-acts outcome of the same prompt, as 0/1
    want = outcomes.set_index("prompt_id")["correct"].astype(float)
    np.testing.assert_array_equal(units["correct"].to_numpy(), want[units["prompt_id"]].to_numpy())
    assert set(units["correct"]) <= {0.0, 1.0}
    assert {"format", "difficulty", "unit_id"} <= set(units.columns)
    tools = [e["tool"] for e in meta.provenance]
    assert tools[-1] == "pipelines/join_units.py" and "collect-acts" in tools
    assert meta.model_entry()["spec"] == "toy"


def test_join_units_refuses_mismatched_inputs(formats_run, tmp_path):
    d = formats_run
    out = tmp_path / "units.parquet"
    r = run(sys.executable, ROOT / "pipelines/join_units.py", d / "experiment.prompts.parquet",
            d / "observational.outcomes.parquet", "-o", out)
    assert r.returncode == 3  # outcomes of another prompts table (prompts_sha256 differs)
    assert "observational.outcomes.parquet" in r.stderr and "another prompts table" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = run(sys.executable, ROOT / "pipelines/join_units.py", d / "experiment.prompts.parquet",
            d / "observational.outcomes.parquet", "-o", out, "--allow-other-prompts")
    assert r.returncode == 3 and "no outcome" in r.stderr and not out.exists()
    # an outcomes file where a prompts file belongs
    r = run(sys.executable, ROOT / "pipelines/join_units.py", d / "experiment.outcomes.parquet",
            d / "experiment.outcomes.parquet", "-o", out)
    assert r.returncode == 3 and "expected a 'prompts' file" in r.stderr
    assert not out.exists()
