"""dolm-train-cunit through the real executable: simulate -> fit, outputs, bad input."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest

EXE = "dolm-train-cunit"
FAST = ["--rounds", "5", "--steps-per-round", "80", "--threads", "1"]
ENV = {**os.environ, "DOLM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def run(*args, cwd=None):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=300)


@pytest.fixture(scope="module")
def collider(tmp_path_factory):
    d = tmp_path_factory.mktemp("cunit")
    data = d / "collider.parquet"
    r = run("simulate", "--graph", "collider", "--n-obs", 600, "--n-per-target", 200,
            "--n-test", 100, "--test-pairs", 1, "--standardize", "--seed", 1, "-o", data)
    assert r.returncode == 0, r.stderr
    return d, data


def test_simulate_writes_a_variable_table_with_truth(collider):
    _, data = collider
    df = pd.read_parquet(data)
    assert list(df.columns) == ["A", "B", "C", "target", "regime", "split"]
    assert set(df["target"].dropna()) >= {"A", "B", "C"}
    assert set(df["split"]) == {"train", "test"}
    train = df[df["split"] == "train"]
    assert len(train) == 600 + 3 * 200
    # standardised per column
    assert np.allclose(df[["A", "B", "C"]].std(ddof=0), 1.0, atol=1e-6)
    r = subprocess.run(["dolm-validate", str(data)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fit_recovers_the_collider_and_writes_every_output(collider):
    d, data = collider
    out = d / "fit"
    r = run("fit", data, "-o", out, *FAST)
    assert r.returncode == 0, r.stderr
    assert "F1 1.000" in r.stderr
    dag = json.loads((out / "dag.json").read_text())
    assert dag["dolm"]["schema"]["name"] == "dag"
    edges = {(e["source"], e["target"]) for e in dag["edges"]}
    assert edges == {("A", "C"), ("B", "C")}
    m = pd.read_parquet(out / "metrics.parquet")
    val = {(g, k): v for g, k, v, reg in zip(m["group"], m["metric"], m["value"], m["regime"],
                                             strict=True) if pd.isna(reg) or reg == "all"}
    assert val[("structure", "f1")] == 1.0 and val[("structure", "shd")] == 0.0
    assert val[("counterfactual", "cf_corr")] > 0.95
    assert np.isfinite(val[("likelihood", "int_nll")])
    assert (m["group"] == "history").any()
    for f in ("dag.json", "metrics.parquet", "checkpoint.safetensors"):
        v = subprocess.run(["dolm-validate", str(out / f)], capture_output=True, text=True,
                           env=ENV)
        assert v.returncode == 0, f + v.stdout + v.stderr
    # the checkpoint loads back into the same network
    import torch
    from dolm_tools.train_cunit import checkpoint

    net, nodes, extra = checkpoint.load(str(out / "checkpoint.safetensors"))
    assert nodes == ["A", "B", "C"] and extra["mechanism"] == "linear"
    assert (net.unit.adjacency(hard=True).numpy() == np.array([[0, 0, 1], [0, 0, 1],
                                                                [0, 0, 0]])).all()
    assert torch.isfinite(net.log_scale).all()
    # outputs are not overwritten without --force
    r2 = run("fit", data, "-o", out, *FAST)
    assert r2.returncode == 3 and "--force" in r2.stderr


def test_fit_reads_a_users_csv_with_a_true_dag(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for regime in ["", "", "", "a", "b", "c"]:  # 300 observational rows, 100 per do()
        n = 100
        a = rng.normal(size=n)
        b = rng.normal(size=n) if regime == "b" else 1.5 * a + rng.normal(size=n)
        c = rng.normal(size=n) if regime == "c" else -b + rng.normal(size=n)
        rows.append(pd.DataFrame({"a": a, "b": b, "c": c, "do": regime}))
    df = pd.concat(rows)
    a, b, c, target = df["a"], df["b"], df["c"], df["do"]
    pd.DataFrame({"a": a, "b": b, "c": c, "do": target}).to_csv(tmp_path / "t.csv",
                                                                index=False)
    (tmp_path / "true.json").write_text(json.dumps(
        {"nodes": ["a", "b", "c"], "edges": [{"source": "a", "target": "b"},
                                             {"source": "b", "target": "c"}]}))
    r = run("fit", tmp_path / "t.csv", "--target-column", "do", "--true-dag",
            tmp_path / "true.json", "-o", tmp_path / "out", *FAST)
    assert r.returncode == 0, r.stderr
    assert "F1 1.000" in r.stderr


def test_check_gradients_passes_and_the_ablation_fails():
    r = run("check-gradients", "--targets", "2;1,4", "--mechanism", "linear")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.strip().splitlines()[1:]]
    assert len(rows) == 6 and all(row[-1] == "True" for row in rows)
    assert all(float(row[3]) == 0.0 for row in rows)
    r = run("check-gradients", "--no-gradient-blocking", "--mechanism", "linear")
    assert r.returncode == 1


# ------------------------------------------------------------------ bad input -> exit 3


def _write(tmp_path, df, name="bad.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False) if name.endswith(".csv") else df.to_parquet(p)
    return p


def _good(n=50):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"x": rng.normal(size=n), "y": rng.normal(size=n)})


@pytest.mark.parametrize(
    "case, expect",
    [
        ("non-numeric", ["column 'y'", "not numeric"]),
        ("unknown-target", ["column 'target'", "'zz'", "not a variable"]),
        ("nan", ["column 'x'", "missing"]),
        ("few-rows", ["2 rows for 3 variables"]),
    ],
)
def test_bad_tables_exit_3_with_a_named_error(tmp_path, case, expect):
    df = _good()
    if case == "non-numeric":
        df["y"] = ["a"] * len(df)
    elif case == "unknown-target":
        df["target"] = [None] * (len(df) - 1) + ["x,zz"]
    elif case == "nan":
        df.loc[3, "x"] = np.nan
    elif case == "few-rows":
        df = df.iloc[:2].assign(z=[1.0, 2.0])
    path = _write(tmp_path, df, "bad.parquet" if case == "nan" else "bad.csv")
    r = run("fit", path, "-o", tmp_path / "out", *FAST)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    for piece in expect:
        assert piece in r.stderr, r.stderr
    assert str(path) in r.stderr


def test_cyclic_graph_specs_exit_3(tmp_path):
    cyc = {"nodes": ["x", "y", "z"], "edges": [{"source": "x", "target": "y"},
                                               {"source": "y", "target": "z"},
                                               {"source": "z", "target": "x"}]}
    (tmp_path / "cyc.json").write_text(json.dumps(cyc))
    r = run("simulate", "--dag", tmp_path / "cyc.json", "-o", tmp_path / "d.parquet")
    assert r.returncode == 3 and "cyclic" in r.stderr and "cyc.json" in r.stderr, r.stderr
    data = _write(tmp_path, _good().assign(z=np.arange(50.0)), "ok.csv")
    r = run("fit", data, "--true-dag", tmp_path / "cyc.json", "-o", tmp_path / "out", *FAST)
    assert r.returncode == 3 and "cyclic" in r.stderr, r.stderr
    # a dag spec that is fine simulates
    cyc["edges"] = cyc["edges"][:2]
    (tmp_path / "ok.json").write_text(json.dumps(cyc))
    r = run("simulate", "--dag", tmp_path / "ok.json", "--n-obs", 50, "--n-per-target", 10,
            "-o", tmp_path / "d.parquet")
    assert r.returncode == 0, r.stderr


def test_regimes_without_rows_or_with_two_target_sets_exit_3(tmp_path):
    df = _good().assign(z=np.arange(50.0))
    df["target"] = [None] * 40 + ["x"] * 10
    df["regime"] = pd.Categorical(["obs"] * 40 + ["do(x)"] * 10,
                                  categories=["obs", "do(x)", "do(y)"])
    r = run("fit", _write(tmp_path, df, "empty.parquet"), "-o", tmp_path / "out", *FAST)
    assert r.returncode == 3 and "'do(y)'" in r.stderr and "no rows" in r.stderr, r.stderr
    df["regime"] = ["obs"] * 40 + ["do(x)"] * 9 + ["obs"]
    r = run("fit", _write(tmp_path, df, "mixed.csv"), "-o", tmp_path / "out", *FAST)
    assert r.returncode == 3 and "regime 'obs'" in r.stderr and "row 49" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_mlp_with_too_few_rows_per_parameter_exits_3(tmp_path):
    path = _write(tmp_path, _good(200).assign(z=np.arange(200.0)), "small.csv")
    # 3 variables, --hidden 16: 3*16 + 2*16 + 1 = 81 parameters per node -> 162 rows
    r = run("fit", path, "--mechanism", "mlp", "-o", tmp_path / "out", *FAST)
    assert r.returncode == 0, r.stderr
    r = run("fit", path, "--mechanism", "mlp", "--hidden", 40, "-o", tmp_path / "o2", *FAST)
    assert r.returncode == 3 and "--mechanism mlp" in r.stderr and "402 rows" in r.stderr, \
        r.stderr
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------ unknown targets


def test_fit_learns_unknown_targets_behind_opaque_regime_names(tmp_path):
    data = tmp_path / "d.parquet"
    r = run("simulate", "--graph", "complex", "--n-obs", 600, "--n-per-target", 150,
            "--int-shift", 2, "--standardize", "--seed", 3, "-o", data)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(data)
    # regime names that say nothing about the targets (the target column stays, only to
    # score the learned targets against)
    names = {f"do({v})": f"env{k}" for k, v in enumerate("DFABEC")}
    df["regime"] = df["regime"].map(lambda x: names.get(x, x))
    df.to_parquet(tmp_path / "opaque.parquet")
    import pyarrow.parquet as pq

    truth = json.loads(pq.read_schema(data).metadata[b"dolm.extra"])["true_dag"]
    (tmp_path / "true.json").write_text(json.dumps(truth))
    r = run("fit", tmp_path / "opaque.parquet", "--targets", "unknown", "--true-dag",
            tmp_path / "true.json", "-o", tmp_path / "fit", *FAST)
    assert r.returncode == 0, r.stderr

    m = pd.read_parquet(tmp_path / "fit" / "metrics.parquet")
    val = {(g, k): v for g, k, v in zip(m["group"], m["metric"], m["value"], strict=True)}
    assert val[("structure", "f1")] == 1.0
    assert val[("targets", "target_f1")] == 1.0 and val[("targets", "n_targets_true")] == 6
    extra = json.loads(pq.read_schema(tmp_path / "fit" / "metrics.parquet")
                       .metadata[b"dolm.extra"])
    assert extra["learned_targets"] == {"obs": [], **{v: [k[3]] for k, v in names.items()}}
    r = run("fit", tmp_path / "opaque.parquet", "--targets", "unknown",
            "--observational-regime", "baseline", "-o", tmp_path / "o2", *FAST)
    assert r.returncode == 3 and "--observational-regime baseline" in r.stderr, r.stderr
    r = run("fit", tmp_path / "opaque.parquet", "--targets", "unknown", "--ignore-targets",
            "-o", tmp_path / "o2", *FAST)
    assert r.returncode == 3 and "--ignore-targets" in r.stderr, r.stderr
    one = _write(tmp_path, _good(), "one.csv")
    r = run("fit", one, "--targets", "unknown", "-o", tmp_path / "o3", *FAST)
    assert r.returncode == 3 and "two or more regimes" in r.stderr, r.stderr
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
