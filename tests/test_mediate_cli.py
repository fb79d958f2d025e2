"""dolm-mediate statistical as a user runs it: the real executable, its files, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from dolm.formats import read_table, validate_file


def mediate(*args):
    local = os.path.join(os.path.dirname(sys.executable), "dolm-mediate")
    exe = local if os.path.exists(local) else (shutil.which("dolm-mediate") or "dolm-mediate")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("med")
    rng = np.random.default_rng(0)
    n = 1500
    cot = rng.random(n) < 0.5
    fmt = np.where(rng.random(n) < 0.5, "qa", "plain")
    cols = {f"attn_to.numbers.L{L}.H{H}": rng.normal(size=n) + (0.7 * cot if (L, H) == (1, 0)
                                                                else 0.0)
            for L in range(2) for H in range(2)}
    df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n)], "cot": cot, "fmt": fmt,
                       **cols, "dead": 0.0})
    lp = -0.3 + 0.3 * cot + 0.9 * df["attn_to.numbers.L1.H0"] + 0.2 * (fmt == "qa")
    df["correct"] = rng.random(n) < 1 / (1 + np.exp(-lp))
    df["logprob"] = lp + rng.normal(size=n)
    df["xnan"] = rng.normal(size=n)
    df.loc[[3, 11], "xnan"] = np.nan
    df.to_parquet(d / "outcomes.parquet")
    return d


def test_statistical_many_mediators_files(table):
    out = table / "med.parquet"
    r = mediate("statistical", table / "outcomes.parquet", "-t", "cot", "-y", "correct",
                "-m", "attn_to.numbers.*", "-m", "dead", "-c", "fmt", "--sims", "300",
                "-o", out)
    assert r.returncode == 0, r.stderr
    assert "skipping mediator 'dead': constant" in r.stderr
    for f in (out, table / "med.sensitivity.parquet", table / "med.summary.json"):
        assert validate_file(str(f))[1] == [], f
    eff, meta = read_table(str(out))
    assert meta.schema == "mediation" and set(eff.method) == {"statistical"}
    assert set(eff.mediator_model) == {"linear"} and set(eff.outcome_model) == {"logistic"}
    sig = eff[(eff.effect == "acme_average") & eff.significant].mediator.tolist()
    assert sig == ["attn_to.numbers.L1.H0"]
    s = json.loads((table / "med.summary.json").read_text())
    assert s["top"][0] == "attn_to.numbers.L1.H0" and s["n_mediators"] == 4
    assert s["covariates"] == ["fmt"] and s["treat_value"] == "1"
    # linear outcome: the rho sensitivity curves come with it
    r = mediate("statistical", table / "outcomes.parquet", "-t", "cot", "-y", "logprob",
                "-m", "attn_to.numbers.L1.H0", "--ci", "bootstrap", "--sims", "200",
                "-o", table / "lin.parquet")
    assert r.returncode == 0, r.stderr
    sens, _ = read_table(str(table / "lin.sensitivity.parquet"))
    assert len(sens) > 10 and sens.acme.iloc[0] > sens.acme.iloc[-1]
    assert "ACME = 0 at rho" in r.stderr


BAD = [
    (["-t", "logprob", "-y", "correct", "-m", "attn_to.*"], "distinct values"),
    (["-t", "cot", "-y", "correct", "-m", "attn_to.*", "-c", "xnan"],
     "column 'xnan': 2 missing (rows 3, 11)"),
    (["-t", "cot", "-y", "correct", "-m", "heads.*"], "pattern 'heads.*' matches no column"),
    (["-t", "cot", "-y", "correct", "-m", "dead"], "every mediator is constant"),
    (["-t", "cot", "-y", "correct", "-m", "attn_to.*", "-c", "dead"], "'dead' is constant"),
]


def test_bad_input_exits_3_naming_the_fault(table):
    def one(case):
        i, (args, _) = case
        return mediate("statistical", table / "outcomes.parquet", *args, "-o",
                       table / f"bad{i}.parquet")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, enumerate(BAD)))
    for i, ((_, needle), r) in enumerate(zip(BAD, results, strict=True)):
        assert r.returncode == 3, (needle, r.returncode, r.stderr)
        assert needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not (table / f"bad{i}.parquet").exists()


def test_moderated_mediation_and_a_post_treatment_moderator(tmp_path):
    # the mediator's effect on the outcome exists only where g == "b": the ACME is moderated
    rng = np.random.default_rng(3)
    n = 2000
    g = np.where(rng.random(n) < 0.5, "a", "b")
    t = (rng.random(n) < 0.5).astype(int)
    m = 0.8 * t + rng.normal(size=n)
    y = 0.3 * t + np.where(g == "b", 1.0, 0.0) * m + rng.normal(size=n)
    post = t + rng.normal(size=n) > 0.5  # caused by the treatment
    pd.DataFrame({"t": t, "m": m, "y": y, "g": g, "post": post.astype(int)}).to_csv(
        tmp_path / "u.csv", index=False)
    dag = tmp_path / "dag.json"
    dag.write_text(json.dumps({"nodes": ["t", "m", "y", "g", "post"], "edges": [
        {"source": "t", "target": "m"}, {"source": "m", "target": "y"},
        {"source": "t", "target": "y"}, {"source": "g", "target": "y"},
        {"source": "t", "target": "post"}, {"source": "post", "target": "y"}]}))
    out = tmp_path / "med.parquet"
    r = mediate("statistical", tmp_path / "u.csv", "-t", "t", "-y", "y", "-m", "m",
                "--moderator", "g", "--dag", dag, "--sims", 400, "-o", out)
    assert r.returncode == 0, r.stderr
    eff = read_table(str(out))[0]
    acme = eff[eff.effect == "acme_average"].set_index("mediator")
    a, b = acme.loc["m | g=a"], acme.loc["m | g=b"]
    assert a.ci_low <= 0 <= a.ci_high  # truth 0
    assert b.ci_low <= 0.8 <= b.ci_high and b.ci_low > 0.5  # truth 0.8
    bad = mediate("statistical", tmp_path / "u.csv", "-t", "t", "-y", "y", "-m", "m",
                  "--moderator", "post", "--dag", dag, "-o", tmp_path / "bad.parquet")
    assert bad.returncode == 3, bad.stderr
    assert "--moderator 'post': a descendant of the treatment 't'" in bad.stderr
    assert "t -> post" in bad.stderr and not (tmp_path / "bad.parquet").exists()
