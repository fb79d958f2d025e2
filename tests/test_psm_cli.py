"""dolm-psm as a user runs it: the real executable, its files, and its refusals (exit 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from dolm.formats import read_table, validate_file


def exe(name: str) -> str:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else (shutil.which(name) or name)


def psm(*args, cwd=None):
    return subprocess.run([exe("dolm-psm"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def units(n=600, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    fmt = np.where(rng.random(n) < 0.5, "a", "b")
    lp = -0.8 + 0.8 * x1 - 0.5 * x2 + 0.3 * (fmt == "b")
    t = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    y = x1 - 0.5 * x2 + 1.0 * t + rng.normal(size=n)
    return pd.DataFrame({"uid": [f"u{i:04d}" for i in range(n)], "x1": x1, "x2": x2,
                         "fmt": fmt, "t": t, "y": y})


def test_csv_run_writes_valid_files(tmp_path):
    csv = tmp_path / "units.csv"
    units().to_csv(csv, index=False)
    out = tmp_path / "res.json"
    r = psm(csv, "-t", "t", "-y", "y", "-c", "x*,fmt", "--id", "uid", "-k", "2", "--replace",
            "--refute-sims", "3", "--balance-terms", "squares,interactions", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "unpenalised logistic regression on standardised covariates" in r.stderr
    files = [out] + [tmp_path / f"res.{k}.parquet" for k in ("pairs", "balance", "units")]
    for f in files:
        assert validate_file(str(f))[1] == [], f
    s = json.loads(out.read_text())
    assert s["dolm"]["schema"]["name"] == "psm_summary"
    c = s["contrasts"][0]
    assert c["propensity"]["penalty"] == "none" and c["propensity"]["standardized"]
    assert {e["estimand"] for e in c["effects"]} == {"ATT", "ATC", "ATE", "naive"}
    att = next(e for e in c["effects"] if e["estimand"] == "ATT")
    assert att["ci_low"] < 1.0 < att["ci_high"]
    assert [r["refuter"] for r in c["refutation"]["results"]] == [
        "placebo_treatment", "random_common_cause", "data_subset"]
    assert c["sensitivity"]["ATT"]["rosenbaum"]["gamma_critical"] > 1
    pairs, meta = read_table(str(files[1]))
    assert meta.schema == "psm_pairs" and pairs.treated_id.str.startswith("u").all()
    assert pairs.groupby(["estimand", "set_id"]).size().max() == 2
    bal, _ = read_table(str(files[2]))
    assert {"fmt[a]", "fmt[b]", "x1", "x2", "distance", "x1^2", "x1*fmt[b]"} <= set(bal.variable)
    assert "fmt[a]*fmt[b]" not in set(bal.variable)
    # existing outputs are kept without --force
    r2 = psm(csv, "-t", "t", "-y", "y", "-c", "x1", "-o", out, "--no-refute")
    assert r2.returncode == 3 and "--force" in r2.stderr


def test_parquet_dag_multilevel_dropna_stdout(tmp_path):
    df = units(900, 1)
    arm = np.where(df.t == 1, np.where(df.x2 > 0, "polite", "fewshot"), "direct")
    df = df.assign(arm=arm)
    df.loc[[4, 9], "y"] = np.nan
    pq = tmp_path / "u.parquet"
    df.to_parquet(pq)
    dag = tmp_path / "dag.json"
    dag.write_text(json.dumps({
        "nodes": ["x1", "fmt", "arm", "y", "uid_noise"],
        "edges": [{"source": "x1", "target": "arm"}, {"source": "x1", "target": "y"},
                  {"source": "fmt", "target": "arm"}, {"source": "arm", "target": "y"},
                  {"source": "uid_noise", "target": "y"}],
        "latent": ["uid_noise"],
    }))
    r = psm(pq, "-t", "arm", "-y", "y", "--dag", dag, "--reference", "direct", "--dropna",
            "--no-refute", "--estimand", "ATT", "-o", "-", "--pairs", tmp_path / "p.parquet")
    assert r.returncode == 0, r.stderr
    assert "dropped 2 rows" in r.stderr
    s = json.loads(r.stdout)
    assert s["covariates_from"] == "dag" and s["dag"]["adjustment_set"] == ["x1"]
    assert s["dropped_missing"] == {"rows": 2, "by_column": {"y": 2}}
    assert [c["contrast"] for c in s["contrasts"]] == ["fewshot vs direct", "polite vs direct"]
    assert validate_file(str(tmp_path / "p.parquet")) == ("psm_pairs", [])
    assert not (tmp_path / "u.balance.parquet").exists()  # -o - writes no siblings


@pytest.fixture(scope="module")
def bad_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    df = units(200, 2)
    df["const"] = 3.0
    df["ynan"] = df.y
    df.loc[[5, 17, 30], "ynan"] = np.nan
    df["sep"] = df.t * 10.0 + np.random.default_rng(0).normal(size=len(df))
    df["tfmt"] = np.where(df.t == 1, df.fmt, "c")  # stratum 'a'/'b' hold no controls
    df.to_csv(d / "bad.csv", index=False)
    (d / "dag.json").write_text(json.dumps({
        "nodes": ["t", "y", "age"],
        "edges": [{"source": "age", "target": "t"}, {"source": "age", "target": "y"},
                  {"source": "t", "target": "y"}]}))
    return d


BAD = [
    (["-t", "x1", "-y", "y", "-c", "x2"], "--treatment 'x1': expected a binary or categorical"),
    (["-t", "t", "-y", "ynan", "-c", "x1"], "column 'ynan': 3 missing (rows 5, 17, 30)"),
    (["-t", "t", "-y", "y", "-c", "x1,const"], "covariate 'const' is constant"),
    (["-t", "t", "-y", "y", "-c", "x1", "--caliper", "0"], "--caliper"),
    (["-t", "t", "-y", "y", "--dag", "{dir}/dag.json"], "'age'"),
    (["-t", "t", "-y", "y", "-c", "sep"], "no common support"),
    (["-t", "t", "-y", "y", "-c", "x1,nope"], "'nope' not in"),
    (["-t", "t", "-y", "y", "-c", "x1", "--exact", "tfmt"], "--exact tfmt: stratum (tfmt) = ("),
    (["-t", "t", "-y", "y", "-c", "x1", "--caliper-on", "x2"], "--caliper-on: expected COLUMN=SDS"),
    (["-t", "t", "-y", "y", "-c", "x1", "--pool-short", "refuse", "-k", "3"],
     "pass --replace, or --pool-short"),
    (["-t", "t", "-y", "y", "-c", "x1", "--method", "full", "--max-pairs", "100"],
     "--method full: "),
    (["-t", "t", "-y", "y", "-c", "x1", "--balance-terms", "cubes"],
     "--balance-terms: expected 'squares' and/or 'interactions', found 'cubes'"),
]


def test_bad_input_exits_3_naming_the_fault(bad_csv):
    from concurrent.futures import ThreadPoolExecutor

    def one(case):
        i, (args, _) = case
        args = [a.format(dir=bad_csv) for a in args]
        return psm(bad_csv / "bad.csv", *args, "--no-refute", "-o", bad_csv / f"out{i}.json")

    with ThreadPoolExecutor(4) as pool:  # independent processes: run them side by side
        results = list(pool.map(one, enumerate(BAD)))
    for i, ((_, needle), r) in enumerate(zip(BAD, results, strict=True)):
        assert r.returncode == 3, (needle, r.returncode, r.stderr)
        assert needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not (bad_csv / f"out{i}.json").exists()


def test_matchit_options_through_the_executable(tmp_path):
    csv = tmp_path / "units.csv"
    units(400, 3).to_csv(csv, index=False)
    out = tmp_path / "m.json"
    r = psm(csv, "-t", "t", "-y", "y", "-c", "x1,x2", "--distance", "ps", "--ties", "data",
            "--m-order", "smallest", "--discard", "none", "--exact", "fmt", "--caliper", "0.5",
            "--caliper-on", "x1=1", "-k", "2", "--estimand", "ATT", "--no-refute", "-o", out)
    assert r.returncode == 0, r.stderr
    assert validate_file(str(out))[1] == []
    s = json.loads(out.read_text())
    m = s["contrasts"][0]["matching"]
    assert m["distance"] == "propensity score" and m["ties"] == "data"
    assert m["directions"]["ATT"]["m_order"] == "smallest" and m["exact"] == ["fmt"]
    pairs = read_table(str(tmp_path / "m.pairs.parquet"))[0]
    df = units(400, 3)
    # exact on fmt, within the x1 caliper (1 SD) and the propensity caliper
    assert (df.fmt.to_numpy()[pairs.treated_row] == df.fmt.to_numpy()[pairs.control_row]).all()
    dx = np.abs(df.x1.to_numpy()[pairs.treated_row] - df.x1.to_numpy()[pairs.control_row])
    assert dx.max() <= df.x1.std()
    assert (pairs.distance <= m["caliper_width"]).all()
    assert pairs.groupby("treated_row").size().max() == 2


@pytest.mark.parametrize("method", ["ipw", "subclass", "cem"])
def test_refuters_run_the_reported_method(tmp_path, method):
    """The DoWhy refuters (on by default) re-estimate with the run's own --method; they
    used to ask weighting and stratification runs for matched pairs (KeyError, exit 1).
    Their pairs table is empty but typed (it was written with null columns, invalid)."""
    pq = tmp_path / "units.parquet"
    units().to_parquet(pq)
    out = tmp_path / "psm.json"
    r = psm(pq, "-t", "t", "-y", "y", "-c", "x1,x2,fmt", "--method", method, "--estimand",
            "ATE", "--refute-sims", "5", "-o", out)
    assert r.returncode == 0, r.stderr
    c = json.loads(out.read_text())["contrasts"][0]
    ref = c["refutation"]
    assert ref["estimand"] == "ATE" and ref["results"]
    est = next(e["estimate"] for e in c["effects"] if e["estimand"] == "ATE")
    by = {x["refuter"]: x for x in ref["results"]}
    # the refuters' own estimate on the full data is the reported one: the same method
    assert all(x["estimate"] == pytest.approx(est, abs=1e-9) for x in by.values())
    assert abs(by["placebo_treatment"]["new_effect"]) < 0.4  # truth 0; the effect is 1
    assert by["random_common_cause"]["new_effect"] == pytest.approx(est, abs=0.1)


def test_refuters_on_a_subsample_are_recorded_and_printed(tmp_path):
    """--refute-max-units: a larger contrast is refuted on a subsample, said on stderr and
    in the summary (the default keeps every table of up to 20,000 units whole)."""
    pq = tmp_path / "units.parquet"
    units().to_parquet(pq)
    out = tmp_path / "psm.json"
    r = psm(pq, "-t", "t", "-y", "y", "-c", "x1,x2", "--estimand", "ATT", "--refute-sims", "3",
            "--refute-max-units", "300", "-o", out)
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert s["options"]["refute_max_units"] == 300
    ref = s["contrasts"][0]["refutation"]
    assert ref["sample"]["n_units"] == 300 and ref["sample"]["of_units"] == 600
    assert "random subsample of 300 of 600 units" in r.stderr
    assert "placebo_treatment" in r.stderr
